"""A grid of validation images with true label, prediction and confidence, every epoch.

Uses ``ctx.evals["val"]`` (selected weights): its ``images`` are the first k images of the
validation split in dataset order, and the matching logits are found through ``indices``, so no
extra forward pass is run. Misclassified images come first; titles are green when right, red
when wrong. Confidence is the softmax probability of the predicted class. Written to
``epochs/NNN/sample_predictions.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from matplotlib.figure import Figure

from classifier_training.evaluation import EvalResult
from classifier_training.hooks.base import FitContext, Hook
from classifier_training.io import save_figure

RIGHT, WRONG = "#1a7f37", "#cf222e"


Panel = tuple[int, int, int, float]
"""(image position, true class, predicted class, confidence)."""


def sample_panels(ev: EvalResult, k: int) -> list[Panel]:
    """The first ``k`` images' panels, misclassified first (dataset order otherwise)."""
    position = {int(ix): j for j, ix in enumerate(ev.indices.tolist())}
    panels = []
    for i in range(min(k, len(ev.images))):
        j = position.get(i)
        if j is None:  # not evaluated (cannot happen with a full gathered split)
            continue
        probs = torch.softmax(ev.logits[j].float(), dim=0)
        pred = int(probs.argmax())
        true = int(ev.targets[j])
        panels.append((i, true, pred, float(probs[pred])))
    panels.sort(key=lambda p: p[1] == p[2])  # stable: wrong ones first, dataset order kept
    return panels


def draw_sample_predictions(
    images: npt.NDArray[np.uint8], panels: list[Panel], class_names: list[str], title: str
) -> Figure:
    """The grid: ``images`` uint8 [k, H, W, 3], one panel per entry of ``panels``."""
    n = max(1, len(panels))
    cols = min(n, max(4, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows + 0.6), layout="constrained")
    correct = sum(1 for _, t, p, _ in panels if t == p)
    fig.suptitle(f"{title}: {correct}/{len(panels)} right, misclassified first", fontsize=13)
    for slot, (i, true, pred, conf) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, slot + 1)
        ax.imshow(images[i], interpolation="nearest")
        ok = true == pred
        colour = RIGHT if ok else WRONG
        ax.set_title(
            f"true {class_names[true]!r}\npred {class_names[pred]!r} ({conf:.0%})",
            color=colour,
            fontsize=10,
        )
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)
    return fig


def plot_sample_predictions(ev: EvalResult, class_names: list[str], k: int, title: str) -> Figure:
    """The grid for the first ``k`` images of ``ev`` (misclassified first)."""
    images = ev.images.permute(0, 2, 3, 1).cpu().numpy()
    return draw_sample_predictions(images, sample_panels(ev, k), class_names, title)


def write_sample_predictions(
    images: npt.NDArray[np.uint8],
    panels: list[Panel],
    class_names: list[str],
    title: str,
    path: Path,
) -> dict[str, Path]:
    """Draw and save the grid; runs in the background worker."""
    save_figure(draw_sample_predictions(images, panels, class_names, title), path)
    return {"val/sample_predictions": path}


class SamplePredictionsHook(Hook):
    """Writes ``epochs/NNN/sample_predictions.png`` from the validation results."""

    name = "sample_predictions"

    def on_epoch_end(self, ctx: FitContext) -> None:
        ev = ctx.evals.get("val")
        k = ctx.recipe.hooks.sample_grid
        if ev is None or k < 1 or len(ev.images) == 0 or len(ev.targets) == 0:
            return
        title = f"Sample predictions, epoch {ctx.epoch + 1} ({ev.weights} weights)"
        images = ev.images[:k].permute(0, 2, 3, 1).cpu().numpy()
        ctx.background.submit(
            write_sample_predictions,
            images,
            sample_panels(ev, k),
            ctx.class_names,
            title,
            ctx.epoch_dir() / "sample_predictions.png",
            then=ctx.log_images,
        )
