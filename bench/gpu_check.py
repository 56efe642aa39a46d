"""One-shot check of the GPU path (run through ``bench/gpu_check.sh``).

    bash bench/gpu_check.sh [--out runs/gpu-check] [--size 224] [--per-class 100] [--epochs 3]
                            [--batch 256] [--workers N] [--arch resnet18]

In one go (about 5-10 minutes on one GPU at the defaults):

1. renders (or reuses) a synthetic jersey set at ``--size`` px in ``OUT/data`` (42 classes,
   ``--per-class`` train crops each, JPEG like the real crops);
2. times the bare-step ceiling: forward/backward/clip/AdamW on one batch already on the device,
   same model, batch, precision and memory format as the run (``bench_train_loop.bare_loop``);
3. trains end to end with the real CLI (``accelerate launch src/train.py``, the basketball_r18
   recipe from scratch, every hook on, the decoded-image cache on ``auto``) for ``--epochs``;
4. prints the start-up line, img/s of the training loop (last epoch), the ratio end-to-end /
   ceiling, the last epoch's per-phase timings, the GradScaler's skipped steps (fp16) and
   whether every loss was finite; exits 1 when a loss is not finite.

On a CPU it runs too (the tests do, at tiny sizes); the ratio is then the CPU's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_train_loop import bare_loop

from classifier_training.data.synthetic import generate
from classifier_training.recipe import SyntheticConfig
from classifier_training.runtime import usable_cpus

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "augment", "step", "eval", "checkpoint", "hooks", "blocking", "epoch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--per-class", type=int, default=100, help="train crops per class")
    parser.add_argument("--eval-per-class", type=int, default=8, help="valid/test crops per class")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(8, max(0, usable_cpus() - 2)))
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--ceiling-steps", type=int, default=30)
    parser.add_argument("extra", nargs="*", help="more train.py flags, after --")
    return parser.parse_args(argv)


def dataset(args: argparse.Namespace) -> Path:
    data: Path = args.out / f"data-{args.size}px-{args.per_class}-{args.eval_per_class}"
    if not (data / "dataset.json").is_file():
        start = time.perf_counter()
        cfg = SyntheticConfig(train_per_class=args.per_class, valid_per_class=args.eval_per_class,
                              test_per_class=args.eval_per_class, image_size=args.size)  # fmt: skip
        generate(data, cfg)
        print(f"rendered {data} in {time.perf_counter() - start:.0f} s", flush=True)
    return data


def train_end_to_end(args: argparse.Namespace, data: Path) -> tuple[Path, str]:
    run_dir = args.out / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
        "--num_machines", "1", "--dynamo_backend", "no",
        str(ROOT / "src" / "train.py"), "--recipe", str(ROOT / "recipes" / "basketball_r18.yaml"),
        "--data.root", str(data), "--data.image_size", str(args.size),
        "--data.batch_size", str(args.batch), "--data.num_workers", str(args.workers),
        "--model.arch", args.arch, "--model.pretrained", "false",
        "--train.epochs", str(args.epochs), "--train.early_stop_patience", "0",
        "--schedule.warmup_epochs", "1", "--train.output_dir", str(run_dir),
        "--train.overwrite", "true", "--logging.progress", "lines", "--logging.log_every", "50",
        *args.extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, check=False)
    sys.stdout.write(proc.stdout[-6000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"gpu_check: the training run failed (exit {proc.returncode})")
    runtime = next((x for x in proc.stdout.splitlines() if x.startswith("runtime:")), "")
    return run_dir, runtime


def report(args: argparse.Namespace, ceiling: float, run_dir: Path, runtime: str) -> bool:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    last = rows[-1]
    ips = float(last["train/img_per_s"])
    finite = all(math.isfinite(float(r["train/loss"])) for r in rows)
    skipped = sum(int(r.get("train/skipped_steps", 0)) for r in rows)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print("\n=== gpu_check ===")
    print(runtime)
    print(f"{device}, {args.arch} {args.size} px, batch {args.batch}, {args.workers} workers, "
          f"{args.epochs} epochs, {int(last['updates'])} updates")  # fmt: skip
    print(f"bare-step ceiling     {ceiling:10.0f} img/s")
    print(f"end to end (last ep.) {ips:10.0f} img/s   ratio {ips / ceiling:.3f}")
    times = "  ".join(f"{p} {float(last.get(f'time/{p}_s', 0.0)):.2f}" for p in PHASES)
    print(f"last epoch seconds:   {times}")
    print(f"GradScaler skipped steps: {skipped}; losses finite: {finite} "
          f"(last train/loss {float(last['train/loss']):.4f}, "
          f"val/acc_top1 {float(last.get('val/acc_top1', float('nan'))):.4f})")  # fmt: skip
    return finite


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    data = dataset(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer does on CUDA
    ceiling = bare_loop(args.arch, args.size, args.batch, args.ceiling_steps, device)
    print(f"bare-step ceiling: {ceiling:.0f} img/s", flush=True)
    run_dir, runtime = train_end_to_end(args, data)
    return 0 if report(args, ceiling, run_dir, runtime) else 1


if __name__ == "__main__":
    sys.exit(main())
