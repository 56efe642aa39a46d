"""Confusion matrix of the selected weights on the validation split, from the gathered logits.

No extra forward pass: ``ctx.evals["val"]`` already holds every validation sample's logits.
``cm[t, p]`` counts samples of true class ``t`` predicted as ``p`` (one ``bincount`` of
``t * C + p``); the normalised matrix divides each row by its support, so its diagonal is the
per-class recall. Written every ``hooks.confusion_every`` epochs and always at the last one::

    epochs/NNN/confusion_matrix.png              counts
    epochs/NNN/confusion_matrix_normalized.png   row-normalised
    epochs/NNN/confused_pairs.json               off-diagonal cells, most frequent first
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from matplotlib.figure import Figure

from classifier_training.hooks.base import FitContext, Hook
from classifier_training.io import atomic_write_json, save_figure

TOP_PAIRS = 20
"""Confused pairs kept in the JSON (the console shows the first 5)."""


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
    """Heat map with class names on both axes; cell values printed where non-zero.

    The figure grows with the class count (~0.32 in per class) and fonts shrink, so 40+
    classes stay legible at 150 dpi.
    """
    n = len(class_names)
    support = cm.sum(axis=1, keepdims=True)
    if normalize:
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(support > 0, cm / np.maximum(support, 1), np.nan)
    else:
        values = cm.astype(np.float64)
    side = max(5.0, 0.32 * n + 2.5)
    tick_font = 9 if n <= 20 else 8
    cell_font = 8 if n <= 20 else 6.5
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(1.0, float(np.nanmax(values)))
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    ax.set_xticks(range(n), labels=class_names, rotation=90 if n > 10 else 0, fontsize=tick_font)
    ax.set_yticks(range(n), labels=class_names, fontsize=tick_font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=11)
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
    """Draw and save both heat maps into ``out``; runs in the background worker."""
    fig = plot_confusion(cm, class_names, f"Confusion matrix (counts)\n{head}", normalize=False)
    counts_png = save_figure(fig, out / "confusion_matrix.png")
    fig = plot_confusion(
        cm, class_names, f"Confusion matrix (rows normalised to 1)\n{head}", normalize=True
    )
    norm_png = save_figure(fig, out / "confusion_matrix_normalized.png")
    return {"val/confusion_matrix": counts_png, "val/confusion_matrix_normalized": norm_png}


class ConfusionMatrixHook(Hook):
    """Counts and row-normalised confusion matrices plus the most confused pairs."""

    name = "confusion_matrix"

    def on_epoch_end(self, ctx: FitContext) -> None:
        every = max(1, ctx.recipe.hooks.confusion_every)
        if (ctx.epoch + 1) % every != 0 and not ctx.is_last_epoch:
            return
        ev = ctx.evals.get("val")
        if ev is None or len(ev.targets) == 0:
            return
        names = ctx.class_names
        cm = confusion_counts(ev.targets, ev.preds, len(names)).numpy()
        correct = int(np.trace(cm))
        total = int(cm.sum())
        out = ctx.epoch_dir()
        head = (
            f"epoch {ctx.epoch + 1}, {ev.weights} weights, {ev.split}: "
            f"top-1 {correct / total:.3f} ({correct}/{total})"
        )
        # The two heat maps are the slow part (~2 s at 42 classes): drawn beside training.
        ctx.background.submit(write_confusion_figures, cm, names, head, out, then=ctx.log_images)
        pairs = confused_pairs(cm, names)
        atomic_write_json(
            out / "confused_pairs.json",
            {"epoch": ctx.epoch + 1, "weights": ev.weights, "split": ev.split, "pairs": pairs},
        )
        if pairs:
            shown = ", ".join(
                f"{d['true']}->{d['predicted']} x{d['count']} ({float(d['rate']):.0%})"
                for d in pairs[:5]
            )
            ctx.accelerator.print(f"most confused (true->predicted): {shown}")
