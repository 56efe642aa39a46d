"""A grid of validation images with true label, prediction and confidence, every epoch.

Uses ``ctx.evals["val"]`` (selected weights): its ``images`` are the first k images of the
validation split in dataset order, and the matching logits are found through ``indices``, so no
extra forward pass is run. Misclassified images come first; titles are green when right, red
when wrong. Confidence is the softmax probability of the predicted class. Written to
``epochs/NNN/sample_predictions.png``.
"""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure

from classifier_training.evaluation import EvalResult
from classifier_training.hooks.base import FitContext, Hook
from classifier_training.io import save_figure

RIGHT, WRONG = "#1a7f37", "#cf222e"


def plot_sample_predictions(ev: EvalResult, class_names: list[str], k: int, title: str) -> Figure:
    """The grid for the first ``k`` images of ``ev`` (misclassified first)."""
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
    n = max(1, len(panels))
    cols = min(n, max(4, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows + 0.6), layout="constrained")
    correct = sum(1 for _, t, p, _ in panels if t == p)
    fig.suptitle(f"{title}: {correct}/{len(panels)} right, misclassified first", fontsize=13)
    for slot, (i, true, pred, conf) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, slot + 1)
        ax.imshow(ev.images[i].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
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


class SamplePredictionsHook(Hook):
    """Writes ``epochs/NNN/sample_predictions.png`` from the validation results."""

    name = "sample_predictions"

    def on_epoch_end(self, ctx: FitContext) -> None:
        if not ctx.accelerator.is_main_process:
            return
        ev = ctx.evals.get("val")
        k = ctx.recipe.hooks.sample_grid
        if ev is None or k < 1 or len(ev.images) == 0 or len(ev.targets) == 0:
            return
        title = f"Sample predictions, epoch {ctx.epoch + 1} ({ev.weights} weights)"
        fig = plot_sample_predictions(ev, ctx.class_names, k, title)
        path = save_figure(fig, ctx.epoch_dir() / "sample_predictions.png")
        ctx.log_images({"val/sample_predictions": path})
