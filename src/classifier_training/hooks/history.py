"""Training curves and a spreadsheet of the metrics, redrawn from ``metrics.jsonl`` every epoch.

The epoch that just ended comes from ``ctx.metrics`` (the engine writes its line after the
hooks, with the hooks' time in it), earlier ones from the file, so the plots written at epoch k
include epoch k. Files (overwritten each epoch)::

    history/loss.png       train/loss, val/loss (+ val_raw, val_ema when present)
    history/accuracy.png   train/acc_top1, val/acc_top1, val/acc_top5 (+ raw / EMA top-1)
    history/lr.png         learning rate per optimizer update (warmup visible)
    results.csv            metrics.jsonl as a table: one row per epoch, one column per key

The per-update learning rate is the recipe's schedule (:func:`classifier_training.optim.
build_scheduler`, a pure function of the update count, which is also how a resumed run rebuilds
it), drawn solid up to the updates done and dashed for the rest of the plan; the values logged at
each epoch end (``train/lr``) are drawn as dots on top, so any mismatch would show.

When a resumed run replays an epoch, the last line of that epoch wins.
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from classifier_training.hooks.base import FitContext, Hook
from classifier_training.io import atomic_write_text, save_figure
from classifier_training.recipe import Recipe

LOSS_KEYS = ("train/loss", "val/loss", "val_raw/loss", "val_ema/loss")
ACC_KEYS = (
    "train/acc_top1",
    "val/acc_top1",
    "val/acc_top5",
    "val_raw/acc_top1",
    "val_ema/acc_top1",
)
LR_KEYS = ("train/lr",)
FIGSIZE = (10.0, 6.0)  # inches; saved at DPI
DPI = 100
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


def new_axes() -> Axes:
    """A 10x6 in figure with one Axes and fixed margins (what the plots draw into).

    Fixed margins instead of a layout engine: constrained layout makes ``savefig`` draw the
    figure twice (a layout pass, then the render) and most of a draw is measuring text. The
    margins fit the widest labels these plots get (``10^{-6}``, ``0.0025`` ticks plus the y
    label on the left). The titles are placed at a fixed height (``y=1.0``), so drawing them
    does not measure the tick labels again to dodge an offset text.
    """
    w, h = FIGSIZE
    fig = Figure(figsize=FIGSIZE)
    # Its own Agg canvas: savefig then keeps one renderer, whose text-size and mathtext caches
    # (keyed by renderer) serve every redraw of a kept figure; a bare Figure gets a new one
    # per save.
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.9 / w, right=1 - 0.25 / w, bottom=0.6 / h, top=1 - 0.45 / h)
    return fig.add_subplot()


def _figure_of(ax: Axes) -> Figure:
    fig = ax.get_figure(root=True)
    assert isinstance(fig, Figure)
    return fig


_kept = threading.local()  # per thread: the figures write_history_figures redraws


def kept_axes(name: str) -> Axes:
    """This thread's Axes for figure ``name``, emptied; a new one (:func:`new_axes`) the first time.

    Redrawing into the same Axes every epoch keeps its Figure, spines and tick objects (their
    creation is a quarter of a fresh figure's cost); what a plot adds is removed: lines, texts,
    legend, data limits, and the colour cycle restarts, so the result equals a fresh figure's.
    """
    axes: dict[str, Axes] = _kept.__dict__.setdefault("axes", {})
    ax = axes.get(name)
    if ax is None:
        ax = axes[name] = new_axes()
        return ax
    for artist in [*ax.lines, *ax.texts, *ax.collections, *ax.patches]:
        artist.remove()
    if (legend := ax.get_legend()) is not None:
        legend.remove()
    ax.relim()
    ax.set_prop_cycle(None)
    return ax


def plot_series(
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    title: str,
    ylabel: str,
    log_y: bool = False,
    ax: Axes | None = None,
) -> Figure:
    """One line per key present in ``rows`` against the epoch, in ``ax`` (an empty Axes of
    :func:`new_axes`, or :func:`kept_axes`) or a new figure."""
    ax = new_axes() if ax is None else ax
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
    if ax.get_yscale() != ("log" if log_y else "linear"):  # unchanged: keep the ticks
        ax.set_yscale("log" if log_y else "linear")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    last = int(rows[-1]["epoch"]) if rows else 0
    ax.set_title(f"{title} (through epoch {last})", y=1.0)  # fixed height: see new_axes
    ax.grid(True, linestyle="--", alpha=0.6)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _figure_of(ax)


def lr_per_update(recipe: Recipe, updates_per_epoch: int) -> list[float]:
    """The recipe's learning rate for updates ``0 .. epochs * updates_per_epoch`` (inclusive)."""
    import torch

    from classifier_training.optim import build_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=recipe.optim.lr)
    scheduler = build_scheduler(
        recipe.schedule,
        optimizer,
        lr=recipe.optim.lr,
        epochs=recipe.train.epochs,
        updates_per_epoch=updates_per_epoch,
    )
    out = []
    for n in range(recipe.train.epochs * updates_per_epoch + 1):
        scheduler.step_update(n)
        out.append(float(optimizer.param_groups[0]["lr"]))
    return out


def plot_lr(
    schedule: Sequence[float],
    updates_done: int,
    updates_per_epoch: int,
    warmup_updates: int,
    logged: Sequence[tuple[float, float]],
    ax: Axes | None = None,
) -> Figure:
    """Learning rate against the update count: done (solid), planned (dashed), logged (dots).

    ``logged`` holds (update, lr) pairs read from ``metrics.jsonl``; ``warmup_updates`` marks
    the end of the warmup with a vertical line. ``ax``: as in :func:`plot_series`.
    """
    ax = new_axes() if ax is None else ax
    done = min(updates_done, len(schedule) - 1)
    xs = range(len(schedule))
    ax.plot(
        xs[: done + 1],
        schedule[: done + 1],
        "-",
        color="tab:blue",
        linewidth=1.5,
        label=f"schedule, updates done ({done})",
    )
    if done + 1 < len(schedule):
        ax.plot(
            xs[done:],
            schedule[done:],
            "--",
            color="tab:blue",
            alpha=0.4,
            linewidth=1,
            label="schedule, still to come",
        )
    if logged:
        lx, ly = zip(*logged, strict=True)
        ax.plot(lx, ly, "o", color="tab:red", markersize=4, label="train/lr logged at epoch end")
    if 0 < warmup_updates < len(schedule):
        ax.axvline(warmup_updates, color="grey", linestyle=":", linewidth=1)
        right = warmup_updates > 0.7 * len(schedule)
        ax.text(warmup_updates, max(schedule), "end of warmup " if right else " end of warmup",
                va="top", ha="right" if right else "left", fontsize=9)  # fmt: skip
    if ax.get_yscale() != "log":
        ax.set_yscale("log")
    ax.set_xlabel(f"optimizer update ({updates_per_epoch} per epoch)")
    ax.set_ylabel("learning rate")
    ax.set_title(f"Learning rate per update (through update {done})", y=1.0)
    ax.grid(True, linestyle="--", alpha=0.6)
    ax.legend()
    return _figure_of(ax)


def results_csv(rows: Sequence[dict[str, Any]]) -> str:
    """``rows`` as CSV: epoch and updates first, then every other key (per-class keys last)."""
    keys = {k for r in rows for k in r}

    def rank(key: str) -> tuple[int, str]:
        first = {"epoch": 0, "updates": 1}
        return (first.get(key, 3 if "/acc_class/" in key else 2), key)

    columns = sorted(keys, key=rank)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in columns})
    return buf.getvalue()


@dataclass(frozen=True)
class LrPlan:
    """What :func:`plot_lr` needs: the schedule and where the run is on it."""

    schedule: list[float]
    updates_done: int
    updates_per_epoch: int
    warmup_updates: int
    logged: list[tuple[float, float]]


def write_history_figures(rows: list[dict[str, Any]], lr: LrPlan | None, out: Path) -> None:
    """Draw and save the three curves into ``out`` (plain inputs -> files); ``lr`` None draws
    the logged per-epoch learning rate instead of the per-update one."""
    loss = plot_series(rows, LOSS_KEYS, "Loss", "loss", ax=kept_axes("loss"))
    save_figure(loss, out / "loss.png", dpi=DPI)
    accuracy = plot_series(rows, ACC_KEYS, "Accuracy", "accuracy", ax=kept_axes("accuracy"))
    save_figure(accuracy, out / "accuracy.png", dpi=DPI)
    if lr is None:
        fig = plot_series(rows, LR_KEYS, "Learning rate", "lr", log_y=True, ax=kept_axes("lr"))
    else:
        fig = plot_lr(
            lr.schedule, lr.updates_done, lr.updates_per_epoch, lr.warmup_updates, lr.logged,
            ax=kept_axes("lr"),
        )  # fmt: skip
    save_figure(fig, out / "lr.png", dpi=DPI)


class HistoryHook(Hook):
    """Redraws loss, accuracy and learning-rate curves and ``results.csv`` at every epoch end."""

    name = "history"

    def __init__(self) -> None:
        self._schedule: tuple[int, list[float]] | None = None  # (updates per epoch, lr per update)

    def lr_plan(self, recipe: Recipe, rows: Sequence[dict[str, Any]]) -> LrPlan | None:
        """The per-update plan when the rows carry ``updates`` (the schedule is computed once)."""
        last = rows[-1]
        if not isinstance(last.get("updates"), (int, float)) or not last.get("epoch"):
            return None
        upe = max(1, round(float(last["updates"]) / float(last["epoch"])))
        if self._schedule is None or self._schedule[0] != upe:
            self._schedule = (upe, lr_per_update(recipe, upe))
        warmup = min(round(recipe.schedule.warmup_epochs * upe), recipe.train.epochs * upe - 1)
        logged = [
            (float(r["updates"]), float(r["train/lr"]))
            for r in rows
            if isinstance(r.get("updates"), (int, float)) and isinstance(r.get("train/lr"), float)
        ]
        return LrPlan(self._schedule[1], int(last["updates"]), upe, warmup, logged)

    def on_epoch_end(self, ctx: FitContext) -> None:
        rows = read_history(ctx.run_dir / "metrics.jsonl")
        current = ctx.metrics.get("epoch")
        if current is not None:  # this epoch's line is written after the hooks: take ctx's
            rows = [r for r in rows if float(r["epoch"]) < float(current)] + [dict(ctx.metrics)]
        if not rows:
            return
        # Written and drawn beside training (the durable write's two fsyncs cost 10-50 ms of
        # the epoch boundary on a slow disk); a newer epoch's table and curves replace a job that
        # has not started.
        ctx.background.submit(
            atomic_write_text, ctx.run_dir / "results.csv", results_csv(rows), replace="results"
        )
        ctx.background.submit(
            write_history_figures,
            rows,
            self.lr_plan(ctx.recipe, rows),
            ctx.run_dir / "history",
            replace="history",
        )
