"""Framework overhead: the real training loop against a bare forward/backward/AdamW loop.

    python bench/bench_train_loop.py [--arch resnet18] [--size 64] [--batch 64] [--batches 30]

Runs, in one process and on the same device/precision/memory format:

1. bare:      model(x) -> cross-entropy -> backward -> clip -> AdamW.step on one fixed batch
              already on the device (the ceiling; no data loading, no augmentation);
2. loop:      ``train.train()`` with ``augment.preset none`` (loader + Accelerate + EMA +
              schedule + metrics; the framework's own cost), decoding every epoch;
3. loop+aug:  ``train.train()`` with the jersey preset (what a user actually runs), decoding
              every epoch (``data.cache none``) and then with the decoded-image cache
              (``data.cache ram``: a gather, plus the JPEG re-encode on cached pixels).

The bare loop is timed before and after the two ``train()`` runs (their spread shows the
machine's noise). Each ``train()`` runs 2 epochs of ``--batches`` batches; the second epoch's
``train/img_per_s`` is used (the first pays one-time kernel set-up). Prints img/s and the
ratios loop/bare and loop+aug/bare measured in this run, and the runs' per-phase seconds of the
second epoch (``time/*``). Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from accelerate.state import AcceleratorState

import train as train_script
from classifier_training.data.synthetic import generate
from classifier_training.recipe import SyntheticConfig, parse_recipe
from classifier_training.runtime import resolve_mixed_precision, usable_cpus


def bare_loop(arch: str, size: int, batch: int, steps: int, device: torch.device) -> float:
    precision, _ = resolve_mixed_precision("auto")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    model = timm.create_model(arch, num_classes=42).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 42, (batch,), device=device)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = crit(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def framework_loop(
    args: argparse.Namespace, data: Path, out: Path, preset: str, cache: str
) -> dict[str, float]:
    AcceleratorState._reset_state(True)
    recipe = parse_recipe(
        [
            "--data.root", str(data), "--data.image_size", str(args.size),
            "--data.batch_size", str(args.batch), "--data.num_workers", str(args.workers),
            "--model.arch", args.arch, "--model.pretrained", "false",
            "--train.epochs", "2", "--train.max_batches_per_epoch", str(args.batches),
            "--train.output_dir", str(out), "--train.eval_test", "false",
            "--augment.preset", preset, "--data.cache", cache, "--logging.progress", "off",
            "--hooks.enabled",
            *args.extra,
        ]
    )  # fmt: skip
    train_script.train(recipe)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {k: float(v) for k, v in rows[-1].items() if isinstance(v, (int, float))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30, help="train batches per epoch")
    parser.add_argument("--workers", type=int, default=0 if usable_cpus() <= 2 else 8)
    parser.add_argument("extra", nargs="*", help="more recipe flags for the loop, after --")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        per_class = max(2, args.batch * args.batches // 42 + 1)
        generate(
            data,
            SyntheticConfig(
                train_per_class=per_class, valid_per_class=2, test_per_class=1, image_size=args.size
            ),
        )
        # The bare ceiling is timed before and after the loops; their spread is the noise floor.
        bare_before = bare_loop(args.arch, args.size, args.batch, args.batches, device)
        runs = {
            "train loop (no aug)": framework_loop(args, data, Path(tmp) / "a", "none", "none"),
            "loop + jersey aug": framework_loop(args, data, Path(tmp) / "b", "jersey", "none"),
            "loop + jersey + cache": framework_loop(args, data, Path(tmp) / "c", "jersey", "ram"),
        }
        bare_after = bare_loop(args.arch, args.size, args.batch, args.batches, device)
    bare = (bare_before + bare_after) / 2
    print(f"device {device}, {args.arch} {args.size}px batch {args.batch}, "
          f"{torch.get_num_threads()} threads, precision "
          f"{resolve_mixed_precision('auto')[0]}")  # fmt: skip
    print(f"bare fwd/bwd/AdamW       {bare:9.1f} img/s   (before {bare_before:.1f}, "
          f"after {bare_after:.1f})")  # fmt: skip
    for name, m in runs.items():
        ips = m["train/img_per_s"]
        phases = ", ".join(f"{p} {m[f'time/{p}_s']:.2f}" for p in ("data", "augment", "step"))
        print(f"{name:<25}{ips:9.1f} img/s   ratio {ips / bare:.3f}   ({phases} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
