"""Training curves redrawn from ``metrics.jsonl`` after every epoch.

The epoch that just ended comes from ``ctx.metrics`` (the engine writes its line after the
hooks, with the hooks' time in it), earlier ones from the file, so the plots written at epoch k
include epoch k. Files (overwritten each epoch)::

    history/loss.png       train/loss, val/loss (+ val_raw, val_ema when present)
    history/accuracy.png   train/acc_top1, val/acc_top1, val/acc_top5 (+ raw / EMA top-1)
    history/lr.png         train/lr

When a resumed run replays an epoch, the last line of that epoch wins.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from classifier_training.hooks.base import FitContext, Hook
from classifier_training.io import save_figure

LOSS_KEYS = ("train/loss", "val/loss", "val_raw/loss", "val_ema/loss")
ACC_KEYS = (
    "train/acc_top1",
    "val/acc_top1",
    "val/acc_top5",
    "val_raw/acc_top1",
    "val_ema/acc_top1",
)
LR_KEYS = ("train/lr",)
_STYLE = {"train": "o-", "val": "s-", "val_raw": "^--", "val_ema": "v--"}


def read_history(path: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` ordered by epoch, one per epoch (the last line wins).

    A line that is not valid JSON (a crash mid-write) is ignored.
    """
    by_epoch: dict[float, dict[str, Any]] = {}
    if not path.is_file():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), (int, float)):
            by_epoch[float(row["epoch"])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_series(
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    title: str,
    ylabel: str,
    log_y: bool = False,
) -> Figure:
    """One line per key present in ``rows`` against the epoch."""
    fig = Figure(figsize=(10, 6), layout="constrained")
    ax = fig.add_subplot()
    for key in keys:
        points = [
            (float(r["epoch"]), float(r[key]))
            for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))
        ]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        style = _STYLE.get(key.split("/")[0], "o-")
        # val/* duplicates val_raw/* or val_ema/* (whichever the run selects): say so.
        label = f"{key} (selected weights)" if key.startswith("val/") else key
        ax.plot(xs, ys, style, label=label, markersize=4, linewidth=1.5)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    last = int(rows[-1]["epoch"]) if rows else 0
    ax.set_title(f"{title} (through epoch {last})")
    ax.grid(True, linestyle="--", alpha=0.6)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return fig


def write_history_figures(rows: list[dict[str, Any]], out: Path) -> None:
    """Draw and save the three curves into ``out``; runs in the background worker."""
    save_figure(plot_series(rows, LOSS_KEYS, "Loss", "loss"), out / "loss.png")
    save_figure(plot_series(rows, ACC_KEYS, "Accuracy", "accuracy"), out / "accuracy.png")
    save_figure(plot_series(rows, LR_KEYS, "Learning rate", "lr", log_y=True), out / "lr.png")


class HistoryHook(Hook):
    """Redraws loss, accuracy and learning-rate curves at every epoch end."""

    name = "history"

    def on_epoch_end(self, ctx: FitContext) -> None:
        rows = read_history(ctx.run_dir / "metrics.jsonl")
        current = ctx.metrics.get("epoch")
        if current is not None:  # this epoch's line is written after the hooks: take ctx's
            rows = [r for r in rows if float(r["epoch"]) < float(current)] + [dict(ctx.metrics)]
        if not rows:
            return
        # Drawn beside training; a newer epoch's curves replace a redraw that has not started.
        ctx.background.submit(
            write_history_figures, rows, ctx.run_dir / "history", replace="history"
        )
