"""Cost of the figures redrawn every epoch: the history curves and the sample-prediction grid.

    python bench/bench_figures.py                       # 10/100 epochs, 10/42 classes, 32 px
    python bench/bench_figures.py --size 96 --reps 5 --keep /tmp/figures

Times, in this process, what the background worker runs once per epoch:

- :func:`classifier_training.hooks.history.write_history_figures` (loss.png, accuracy.png,
  lr.png) on ``metrics.jsonl``-like rows of 10 and of 100 epochs, the learning rate drawn per
  update (``--updates`` per epoch) from the default recipe's schedule;
- :func:`classifier_training.hooks.sample_predictions.write_sample_predictions` with 16
  mistakes and one tile per class, at 10 and at 42 classes (``--size`` px tiles).

Prints CPU milliseconds per call (``time.process_time``, the median of ``--reps`` calls after
one warm-up call: the drawing is single-threaded, and CPU time does not count other load on a
shared machine) and the size of the PNGs. ``--keep DIR`` leaves the PNGs there to look at. To
compare two versions, run it once per checkout (``PYTHONPATH=OTHER/src``); run by hand, not a
test.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from classifier_training.hooks.history import LrPlan, lr_per_update, write_history_figures
from classifier_training.hooks.sample_predictions import Tile, write_sample_predictions
from classifier_training.recipe import Recipe


def history_rows(epochs: int, updates: int, lrs: list[float]) -> list[dict[str, Any]]:
    rows = []
    for e in range(1, epochs + 1):
        decay = 1.0 / (1.0 + 0.3 * e)
        rows.append(
            {
                "epoch": float(e),
                "updates": float(e * updates),
                "train/lr": lrs[e * updates],
                "train/loss": 2.0 * decay,
                "val/loss": 2.1 * decay,
                "val_ema/loss": 2.15 * decay,
                "train/acc_top1": 1.0 - 0.9 * decay,
                "val/acc_top1": 1.0 - 0.95 * decay,
                "val/acc_top5": 1.0 - 0.5 * decay,
                "val_ema/acc_top1": 1.0 - 0.96 * decay,
            }
        )
    return rows


def lr_plan(epochs: int, updates: int) -> tuple[list[dict[str, Any]], LrPlan]:
    recipe = Recipe()
    recipe.train.epochs = epochs
    lrs = lr_per_update(recipe, updates)
    rows = history_rows(epochs, updates, lrs)
    logged = [(float(r["updates"]), float(r["train/lr"])) for r in rows]
    warmup = round(recipe.schedule.warmup_epochs * updates)
    return rows, LrPlan(lrs, epochs * updates, updates, warmup, logged)


def tiles(classes: int, mistakes: int, size: int) -> tuple[list[Tile], list[Tile]]:
    rng = np.random.default_rng(0)
    names = [f"{i}" for i in range(classes)]

    def image() -> np.ndarray:  # coarse blocks: compresses like a photo, not like noise
        cells = rng.integers(0, 256, (max(1, size // 4), max(1, size // 4), 3), dtype=np.uint8)
        return np.kron(cells, np.ones((4, 4, 1), np.uint8))[:size, :size]

    wrong = [
        Tile(image(), names[i % classes], names[(i + 1) % classes], 0.99 - 0.01 * i)
        for i in range(mistakes)
    ]
    per_class = [Tile(image(), n, n if i % 4 else names[-1], 0.73) for i, n in enumerate(names)]
    return wrong, per_class


def per_call_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: fonts, caches, imports
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1000.0 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history-epochs", type=int, nargs="*", default=[10, 100])
    parser.add_argument("--updates", type=int, default=235, help="optimizer updates per epoch")
    parser.add_argument("--classes", type=int, nargs="*", default=[10, 42])
    parser.add_argument("--mistakes", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="tile image side, px")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="leave the PNGs in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        for epochs in args.history_epochs:
            rows, plan = lr_plan(epochs, args.updates)
            folder = out / f"history_{epochs}"
            ms = per_call_ms(
                functools.partial(write_history_figures, rows, plan, folder), args.reps
            )
            kib = sum(p.stat().st_size for p in folder.glob("*.png")) / 1024
            print(
                f"history, {epochs:3d} epochs          {ms:8.1f} CPU ms per call  ({kib:.0f} KiB)"
            )
        for classes in args.classes:
            wrong, first = tiles(classes, args.mistakes, args.size)
            path = out / f"sample_predictions_{classes}.png"
            title = f"Validation predictions, epoch 3 (ema weights): top-1 0.812 on {classes * 20}"
            draw = functools.partial(
                write_sample_predictions, wrong, first, title, 3 * args.mistakes, path
            )
            ms = per_call_ms(draw, args.reps)
            kib = path.stat().st_size / 1024
            print(
                f"sample grid, {classes:2d} classes + {args.mistakes} mistakes "
                f"{ms:8.1f} CPU ms per call  ({kib:.0f} KiB)"
            )


if __name__ == "__main__":
    main()
