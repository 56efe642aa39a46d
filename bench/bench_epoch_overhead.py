"""Epoch overhead: blocking seconds per epoch outside the training loop and evaluation.

    python bench/bench_epoch_overhead.py [--epochs 4] [--batches 4] [--size 64]

The quick start's shape (42 classes, the synthetic jersey set, ResNet18, every hook on), run
twice in this process with short epochs (``--batches`` train batches each), once with the hooks
drawing inline and the checkpoints written whole (``hooks.background inline``,
``train.checkpoint_background false``: how it was before) and once with the defaults (hooks in
the background worker, each checkpoint's fsync/hash/rename/ledger in a background thread).
Reads the ``time/*`` keys of ``metrics.jsonl`` and prints,
per epoch (mean over epochs 2.., the first pays one-time set-up):

    hooks      the hook round (what the hooks block)
    ckpt       writing the epoch's checkpoint
    blocking   epoch - train - eval (hooks + checkpoint + logging + reductions)

plus the hook work the worker did beside training. Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

import train as train_script
from classifier_training.recipe import parse_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
KEYS = ("time/hooks_s", "time/checkpoint_s", "time/blocking_s", "time/train_s", "time/eval_s")


def run(args: argparse.Namespace, data: Path, out: Path, background: bool) -> dict[str, float]:
    AcceleratorState._reset_state(True)
    recipe = parse_recipe(
        [
            "--recipe", str(RECIPE), "--data.root", str(data),
            "--data.image_size", str(args.size), "--train.epochs", str(args.epochs),
            "--train.max_batches_per_epoch", str(args.batches), "--train.output_dir", str(out),
            "--train.eval_test", "false", "--logging.progress", "off",
            "--hooks.background", "process" if background else "inline",
            "--train.checkpoint_background", str(background).lower(), *args.extra,
        ]
    )  # fmt: skip
    train_script.train(recipe)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    means = {k: statistics.fmean(float(r[k]) for r in later) for k in KEYS}
    means["epochs"] = len(later)
    return means


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4, help="train batches per epoch")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("extra", nargs="*", help="more recipe flags, after --")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic-jerseys"
        args.extra += ["--data.generate_if_missing", "true"]
        inline = run(args, data, Path(tmp) / "inline", False)
        background = run(args, data, Path(tmp) / "background", True)
    threads = torch.get_num_threads()
    print(f"42 classes, {args.size} px, every hook on, {args.batches} batches/epoch, "
          f"{threads} torch threads; mean per epoch over epochs 2..{args.epochs}")  # fmt: skip
    head = f"{'hooks s':>9}{'ckpt s':>9}{'blocking s':>12}{'train s':>9}{'eval s':>9}"
    print(f"{'hooks, checkpoints':<22}{head}")
    for name, m in (("inline (before)", inline), ("background (now)", background)):
        cells = [m["time/hooks_s"], m["time/checkpoint_s"], m["time/blocking_s"]]
        cells += [m["time/train_s"], m["time/eval_s"]]
        print(
            f"{name:<22}"
            + "".join(f"{v:{w}.3f}" for v, w in zip(cells, (9, 9, 12, 9, 9), strict=True))
        )
    saved = inline["time/blocking_s"] - background["time/blocking_s"]
    hooks = f"{inline['time/hooks_s']:.3f} -> {background['time/hooks_s']:.3f} s"
    ckpt = f"{inline['time/checkpoint_s']:.3f} -> {background['time/checkpoint_s']:.3f} s"
    print(f"blocking time saved per epoch: {saved:.3f} s (hooks {hooks}, checkpoint {ckpt})")
    print(f"blocking per epoch now: {background['time/blocking_s']:.3f} s (target <= 0.3 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
