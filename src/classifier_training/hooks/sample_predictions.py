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

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from classifier_training.data.preprocess import eval_image, open_rgb
from classifier_training.display import natural_order
from classifier_training.hooks.base import FitContext, Hook
from classifier_training.io import PNG_COMPRESS_LEVEL, atomic_open

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


# Sheet geometry, pixels. The tiles keep the old figure's scale (8 columns, ~1000 px wide).
TILE = 96  # side of a tile's image; smaller images are upscaled (nearest), larger ones shrunk
BORDER = 3  # coloured frame around the image: green right, red wrong
GAP = 22  # between columns
MARGIN = 8
PITCH = TILE + 2 * BORDER + GAP  # column width: the caption may use all of it
CAPTION_PX, HEAD_PX, TITLE_PX = 12, 15, 17  # font sizes
LINE = CAPTION_PX + 3


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Matplotlib's bundled DejaVu Sans (no system font needed) at ``size`` px."""
    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def caption(tile: Tile) -> str:
    """The two lines over a tile: ``true X`` / ``pred Y NN%`` (confidence of the prediction)."""
    return f"true {tile.true}\npred {tile.pred} {tile.confidence:.0%}"


def _fit(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """``text``, cut with an ellipsis if wider than ``width`` px (a long class name would run
    into the next column)."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _thumbnail(image: npt.NDArray[np.uint8]) -> Image.Image:
    """``image`` (HW or HWC uint8) as a TILE x TILE RGB tile, aspect kept, centred on white.

    Upscaling is nearest-neighbour (the pixels the model saw stay sharp squares); shrinking
    averages (box filter) so that a large image does not alias.
    """
    pic = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    scale = TILE / max(pic.size)
    size = (max(1, round(pic.width * scale)), max(1, round(pic.height * scale)))
    pic = pic.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX)
    if pic.size == (TILE, TILE):
        return pic
    tile = Image.new("RGB", (TILE, TILE), "white")
    tile.paste(pic, ((TILE - pic.width) // 2, (TILE - pic.height) // 2))
    return tile


def _panel_height(n: int) -> int:
    """Pixels of a panel of ``n`` tiles: its header, then rows of captions + framed tiles."""
    rows = math.ceil(n / COLUMNS)
    return HEAD_PX + 10 + rows * (2 * LINE + TILE + 2 * BORDER + 12)


def panel_tops(mistakes: int) -> tuple[int, int]:
    """Top pixel rows of the two panels when the first holds ``mistakes`` tiles."""
    first = MARGIN + TITLE_PX + 10
    return first, first + _panel_height(mistakes) + 8


def tile_origin(panel_top: int, k: int) -> tuple[int, int]:
    """Top-left pixel of the frame of tile ``k`` of the panel starting at row ``panel_top``."""
    row, col = divmod(k, COLUMNS)
    x = MARGIN + col * PITCH + GAP // 2
    y = panel_top + HEAD_PX + 10 + row * (2 * LINE + TILE + 2 * BORDER + 12) + 2 * LINE + 2
    return x, y


def _draw_panel(
    sheet: Image.Image, draw: ImageDraw.ImageDraw, top: int, tiles: Sequence[Tile], head: str
) -> None:
    """Header centred at ``top``, then the tiles, COLUMNS per row, each under its caption."""
    draw.text((sheet.width // 2, top), head, fill="black", font=_font(HEAD_PX), anchor="ma")
    font = _font(CAPTION_PX)
    for k, t in enumerate(tiles):
        x, y = tile_origin(top, k)
        colour = RIGHT if t.right else WRONG
        side = TILE + 2 * BORDER
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=colour)
        sheet.paste(_thumbnail(t.image), (x + BORDER, y + BORDER))
        centre = x + side // 2
        for i, line in enumerate(caption(t).splitlines()):
            text = _fit(line, font, PITCH - 4)
            draw.text((centre, y - 2 - (2 - i) * LINE), text, fill=colour, font=font, anchor="ma")


def plot_sample_predictions(
    mistakes: Sequence[Tile], per_class: Sequence[Tile], title: str, total_mistakes: int = -1
) -> Image.Image:
    """One RGB sheet: the title, the mistakes panel, then one tile per class (pure drawing).

    Composed with Pillow, not one matplotlib Axes per tile: a 58-tile grid drawn by matplotlib
    cost ~0.9 s per epoch (bench/bench_figures.py); the sheet is pasted pixels and a few dozen
    text draws. ``total_mistakes`` (default: as many as shown) is how many validation images
    were wrong.
    """
    total_mistakes = len(mistakes) if total_mistakes < 0 else total_mistakes
    head = (
        f"{len(mistakes)} of {total_mistakes} mistakes, most confident first"
        if mistakes
        else "no mistakes among the validation images"
    )
    right = sum(t.right for t in per_class)
    tail = f"first image of each class ({right}/{len(per_class)} right)"
    first, second = panel_tops(len(mistakes))
    size = (COLUMNS * PITCH + 2 * MARGIN, second + _panel_height(len(per_class)) + MARGIN)
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    width = sheet.width - 2 * MARGIN
    draw.text((sheet.width // 2, MARGIN), _fit(title, _font(TITLE_PX), width), fill="black",
              font=_font(TITLE_PX), anchor="ma")  # fmt: skip
    _draw_panel(sheet, draw, first, mistakes, head)
    _draw_panel(sheet, draw, second, per_class, tail)
    return sheet


def write_sample_predictions(
    mistakes: Sequence[Tile],
    per_class: Sequence[Tile],
    title: str,
    total_mistakes: int,
    path: Path,
) -> dict[str, Path]:
    """Draw and save the grid (plain inputs -> file; runs in the background worker); returns
    the tracker image entry."""
    sheet = plot_sample_predictions(mistakes, per_class, title, total_mistakes)
    with atomic_open(path) as handle:
        sheet.save(handle, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
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
