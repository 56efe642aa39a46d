"""Confusion matrix of the selected weights on the validation split, from the gathered logits.

No extra forward pass: ``ctx.evals["val"]`` already holds every validation sample's logits.
``cm[t, p]`` counts samples of true class ``t`` predicted as ``p`` (one ``bincount`` of
``t * C + p``); the normalised matrix divides each row by its support, so its diagonal is the
per-class recall. Kept for the **best epoch** (the epoch whose checkpoint is the run's best), the
**last epoch** and every ``hooks.confusion_every`` epochs. An epoch that is only the best so far
writes its counts to ``confused_pairs.json`` at once, and its heat maps are drawn at the last
epoch if it is still the best then (from that file, so also after a resume): in a run that keeps
improving, every epoch is briefly the best, and drawing each one (~0.8-2 s of a core) would be
work the next best deletes. A later best removes the earlier best-only record. Classes are shown
in natural order ("2" before "10"); the label indices of the contract are unchanged::

    epochs/NNN/confusion_matrix.png              counts
    epochs/NNN/confusion_matrix_normalized.png   row-normalised
    epochs/NNN/confused_pairs.json               counts [true][predicted], title, and the
                                                 off-diagonal cells, most frequent first
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from matplotlib.figure import Figure

from classifier_training.display import natural_order
from classifier_training.evaluation import EvalResult
from classifier_training.hooks.base import FitContext, Hook
from classifier_training.io import atomic_write_json, save_figure

TOP_PAIRS = 20
"""Confused pairs kept in the JSON (the console shows the first 5)."""
FILES = ("confusion_matrix.png", "confusion_matrix_normalized.png", "confused_pairs.json")
DPI = 110


def confusion_counts(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [C, C]: rows are true classes, columns predicted classes."""
    flat = targets.long().cpu() * num_classes + preds.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def confused_pairs(
    cm: npt.NDArray[np.int64], class_names: list[str], top: int = TOP_PAIRS
) -> list[dict[str, Any]]:
    """Off-diagonal cells with a count, by count (then rate) descending."""
    support = cm.sum(axis=1)
    pairs = []
    for t, p in zip(*np.nonzero(cm), strict=True):
        if t == p:
            continue
        count = int(cm[t, p])
        pairs.append(
            {
                "true": class_names[t],
                "predicted": class_names[p],
                "count": count,
                "rate": count / int(support[t]),
            }
        )
    pairs.sort(key=lambda d: (-int(d["count"]), -float(d["rate"])))
    return pairs[:top]


def plot_confusion(
    cm: npt.NDArray[np.int64], class_names: list[str], title: str, normalize: bool
) -> Figure:
    """Heat map with class names on both axes in natural order; values printed where non-zero.

    The figure grows with the class count (0.4 in per class) so that at 42+ classes the labels
    stay at 9 pt and the cell values at 7 pt (readable at the saved 110 dpi).
    """
    order = natural_order(class_names)
    cm = cm[np.ix_(order, order)]
    names = [class_names[i] for i in order]
    n = len(names)
    support = cm.sum(axis=1, keepdims=True)
    if normalize:
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(support > 0, cm / np.maximum(support, 1), np.nan)
    else:
        values = cm.astype(np.float64)
    side = max(5.0, 0.4 * n + 2.5)
    tick_font = 10 if n <= 20 else 9
    cell_font = 8 if n <= 20 else 7
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(1.0, float(np.nanmax(values)))
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    ax.set_xticks(range(n), labels=names, rotation=90 if n > 10 else 0, fontsize=tick_font)
    ax.set_yticks(range(n), labels=names, fontsize=tick_font)
    ax.set_xlabel("predicted", fontsize=11)
    ax.set_ylabel("true", fontsize=11)
    ax.set_title(title, fontsize=12)
    for t in range(n):
        for p in range(n):
            if cm[t, p] == 0:
                continue
            v = values[t, p]
            text = f"{v:.2f}".lstrip("0") if normalize else str(int(cm[t, p]))
            if normalize and v >= 0.995:
                text = "1"
            colour = "white" if v > 0.55 * vmax else "black"
            ax.text(p, t, text, ha="center", va="center", fontsize=cell_font, color=colour)
    return fig


def write_confusion_figures(
    cm: npt.NDArray[np.int64], class_names: list[str], head: str, out: Path
) -> dict[str, Path]:
    """Draw and save both heat maps into ``out`` (plain inputs -> files; runs in the
    background worker)."""
    fig = plot_confusion(cm, class_names, f"Confusion matrix (counts)\n{head}", normalize=False)
    counts_png = save_figure(fig, out / FILES[0], dpi=DPI)
    fig = plot_confusion(
        cm, class_names, f"Confusion matrix (rows normalised to 1)\n{head}", normalize=True
    )
    norm_png = save_figure(fig, out / FILES[1], dpi=DPI)
    return {"val/confusion_matrix": counts_png, "val/confusion_matrix_normalized": norm_png}


def draw_reasons(epoch: int, every: int, is_best: bool, is_last: bool) -> list[str]:
    """Why epoch ``epoch`` (0-based) gets matrices: any of "best", "every N", "last"."""
    reasons = ["best"] if is_best else []
    if every > 0 and (epoch + 1) % every == 0:
        reasons.append(f"every {every}")
    if is_last:
        reasons.append("last")
    return reasons


class ConfusionMatrixHook(Hook):
    """Counts and row-normalised confusion matrices plus the most confused pairs."""

    name = "confusion_matrix"

    def __init__(self) -> None:
        self._best_only: Path | None = None  # folder whose record exists only as "best"

    def on_epoch_end(self, ctx: FitContext) -> None:
        best = ctx.best_checkpoint
        is_best = best is not None and best.name == f"epoch-{ctx.epoch + 1:03d}"
        reasons = draw_reasons(
            ctx.epoch, ctx.recipe.hooks.confusion_every, is_best, ctx.is_last_epoch
        )
        ev = ctx.evals.get("val")
        if reasons and ev is not None and len(ev.targets) > 0:
            self._record(ctx, ev, reasons, draw=reasons != ["best"])
            if is_best:
                if self._best_only is not None and self._best_only != ctx.epoch_dir():
                    for name in FILES:
                        (self._best_only / name).unlink(missing_ok=True)
                self._best_only = ctx.epoch_dir() if reasons == ["best"] else None
        if (
            ctx.is_last_epoch
            and best is not None
            and not is_best
            and best.name.startswith("epoch-")
        ):
            self._draw_deferred(ctx, ctx.run_dir / "epochs" / best.name.removeprefix("epoch-"))

    def _record(self, ctx: FitContext, ev: EvalResult, reasons: list[str], draw: bool) -> None:
        """Write this epoch's ``confused_pairs.json`` (with the counts) and, with ``draw``,
        submit its heat maps; print the most confused pairs."""
        names = ctx.class_names
        cm = confusion_counts(ev.targets, ev.preds, len(names)).numpy()
        correct = int(np.trace(cm))
        total = int(cm.sum())
        out = ctx.epoch_dir()
        head = (
            f"epoch {ctx.epoch + 1} ({', '.join(reasons)}), {ev.weights} weights, {ev.split}: "
            f"top-1 {correct / total:.3f} ({correct}/{total})"
        )
        pairs = confused_pairs(cm, names)
        record = {
            "epoch": ctx.epoch + 1,
            "drawn_because": reasons,
            "weights": ev.weights,
            "split": ev.split,
            "title": head,
            "class_names": names,
            "counts": cm.tolist(),
            "pairs": pairs,
        }
        atomic_write_json(out / FILES[2], record)
        if draw:  # the two heat maps are the slow part (~2 s at 42 classes): beside training
            ctx.background.submit(
                write_confusion_figures, cm, names, head, out, then=ctx.log_images
            )
        if pairs:
            shown = ", ".join(
                f"{d['true']}->{d['predicted']} x{d['count']} ({float(d['rate']):.0%})"
                for d in pairs[:5]
            )
            ctx.accelerator.print(f"most confused (true->predicted): {shown}")

    def _draw_deferred(self, ctx: FitContext, folder: Path) -> None:
        """The best epoch's heat maps, from its record, if they were not drawn yet."""
        record_path = folder / FILES[2]
        if (folder / FILES[0]).exists() or not record_path.is_file():
            return
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("drawn_because") != ["best"] or "counts" not in record:
            return  # drawn when recorded (perhaps still in the worker), or an older record
        cm = np.asarray(record["counts"], dtype=np.int64)
        ctx.background.submit(
            write_confusion_figures,
            cm,
            list(record["class_names"]),
            str(record["title"]),
            folder,
            then=ctx.log_images,
        )
