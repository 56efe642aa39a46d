"""Sample grid of validation predictions, every epoch: confident mistakes first, then every class.

From ``ctx.evals["val"]`` (the selected weights; logits of every validation image, so no extra
forward pass):

1. up to ``hooks.sample_grid`` misclassified images, **most confident first** (the mistakes a
   confidence threshold would not catch);
2. **one image per class**, classes in natural order ("2" before "10"): the first validation
   image of the class, so the same tile can be followed from epoch to epoch.

Each tile shows the image as the model saw it (the evaluation preprocessing, read from the
dataset index through :mod:`classifier_training.data.preprocess`), the true label, the predicted
label and its confidence (softmax probability of the predicted class); green when right, red
when wrong. Written to ``epochs/NNN/sample_predictions.png``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure, FigureBase

from classifier_training.data.preprocess import eval_image, open_rgb
from classifier_training.display import natural_order
from classifier_training.hooks.base import FitContext, Hook
from classifier_training.io import save_figure

RIGHT, WRONG = "#1a7f37", "#cf222e"
COLUMNS = 8


@dataclass(frozen=True)
class Tile:
    """One panel: an HWC uint8 image and what the model said about it."""

    image: npt.NDArray[np.uint8]
    true: str
    pred: str
    confidence: float

    @property
    def right(self) -> bool:
        return self.true == self.pred


def softmax_rows(logits: npt.ArrayLike) -> npt.NDArray[np.float64]:
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: npt.NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return out


def select_samples(
    probs: npt.ArrayLike, targets: npt.ArrayLike, class_names: Sequence[str], max_mistakes: int
) -> tuple[list[int], list[int]]:
    """Rows to show: (mistakes, most confident first, at most ``max_mistakes``; the first row of
    each class present, classes in natural order)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    pred = p.argmax(axis=1)
    conf = p.max(axis=1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][: max(0, max_mistakes)]
    per_class = []
    for c in natural_order(class_names):
        rows = np.flatnonzero(y == c)
        if rows.size:
            per_class.append(int(rows[0]))
    return [int(i) for i in wrong], per_class


def _draw_tiles(fig: FigureBase, tiles: Sequence[Tile], title: str) -> None:
    fig.suptitle(title, fontsize=12)
    if not tiles:
        return
    cols = COLUMNS  # same tile size in both panels
    rows = math.ceil(len(tiles) / cols)
    for k, t in enumerate(tiles):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(t.image, interpolation="nearest")
        colour = RIGHT if t.right else WRONG
        ax.set_title(f"true {t.true}\npred {t.pred} {t.confidence:.0%}", color=colour, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)


def plot_sample_predictions(
    mistakes: Sequence[Tile], per_class: Sequence[Tile], title: str, total_mistakes: int = -1
) -> Figure:
    """Two panels of tiles: the mistakes, then one tile per class (a pure drawing function).

    ``total_mistakes`` (default: as many as shown) is how many validation images were wrong.
    """
    total_mistakes = len(mistakes) if total_mistakes < 0 else total_mistakes
    rows = [math.ceil(len(x) / COLUMNS) if x else 0 for x in (mistakes, per_class)]
    heights = [max(r, 0.35) * 1.75 + 0.5 for r in rows]
    fig = Figure(figsize=(COLUMNS * 1.55, sum(heights) + 0.5), layout="constrained")
    fig.suptitle(title, fontsize=13)
    top, bottom = fig.subfigures(2, 1, height_ratios=heights, squeeze=False)[:, 0]
    head = (
        f"{len(mistakes)} of {total_mistakes} mistakes, most confident first"
        if mistakes
        else "no mistakes among the validation images"
    )
    _draw_tiles(top, mistakes, head)
    right = sum(t.right for t in per_class)
    _draw_tiles(bottom, per_class, f"first image of each class ({right}/{len(per_class)} right)")
    return fig


def write_sample_predictions(
    mistakes: Sequence[Tile],
    per_class: Sequence[Tile],
    title: str,
    total_mistakes: int,
    path: Path,
) -> dict[str, Path]:
    """Draw and save the grid (plain inputs -> file; runs in the background worker); returns
    the tracker image entry."""
    fig = plot_sample_predictions(mistakes, per_class, title, total_mistakes)
    save_figure(fig, path, dpi=80)  # ~0.35 MB at 42 classes: written every epoch
    return {"val/sample_predictions": path}


def build_tiles(
    rows: Sequence[int],
    probs: npt.NDArray[np.float64],
    targets: npt.NDArray[np.int64],
    class_names: Sequence[str],
    image_of: Callable[[int], npt.NDArray[np.uint8]],
) -> list[Tile]:
    """Tiles for ``rows`` of the evaluation; ``image_of(row)`` returns its HWC uint8 image."""
    out = []
    for j in rows:
        pred = int(probs[j].argmax())
        out.append(
            Tile(
                image_of(j), class_names[int(targets[j])], class_names[pred], float(probs[j, pred])
            )
        )
    return out


class SamplePredictionsHook(Hook):
    """Writes ``epochs/NNN/sample_predictions.png`` from the validation results."""

    name = "sample_predictions"

    def on_epoch_end(self, ctx: FitContext) -> None:
        ev = ctx.evals.get("val")
        split = ctx.index.val if ctx.index is not None else None
        if ev is None or split is None or len(ev.targets) == 0:
            return
        probs = softmax_rows(np.asarray(ev.logits, dtype=np.float32))
        targets = np.asarray(ev.targets, dtype=np.int64)
        positions = np.asarray(ev.indices, dtype=np.int64)
        size = ctx.recipe.data.image_size

        def image_of(row: int) -> npt.NDArray[np.uint8]:
            return eval_image(open_rgb(split.samples[int(positions[row])].path), size)

        wrong, first = select_samples(probs, targets, ctx.class_names, ctx.recipe.hooks.sample_grid)
        accuracy = float((probs.argmax(axis=1) == targets).mean())
        title = (
            f"Validation predictions, epoch {ctx.epoch + 1} ({ev.weights} weights): top-1 "
            f"{accuracy:.3f} on {len(targets)} images"
        )
        ctx.background.submit(
            write_sample_predictions,
            build_tiles(wrong, probs, targets, ctx.class_names, image_of),
            build_tiles(first, probs, targets, ctx.class_names, image_of),
            title,
            int((probs.argmax(axis=1) != targets).sum()),
            ctx.epoch_dir() / "sample_predictions.png",
            then=ctx.log_images,
        )
