"""Synthetic basketball-jersey-number crops in the JSONL dataset layout.

Writes a dataset the loader reads like the real ``basketball-jersey-numbers-ocr`` export::

    <out>/dataset.json                        generator version, seed, labels, per-class counts
    <out>/{train,valid,test}/annotations.jsonl
    <out>/{train,valid,test}/images/synth_<label>_<index:05d>.jpg

one JSON object per line, ``image`` relative to the jsonl's folder::

    {"image": "images/synth_8_00012.jpg", "prefix": "Read the number.", "suffix": "8",
     "metadata": {"jersey_color": "white", "number_color": "red", "border": true}}

File names hold the label verbatim (the reference's ``label.zfill(3)`` maps "0" and "00" to the
same name).

Rendering (the reference's recipe, REFERENCE §1.4, changed where noted):

1. Jersey: one of 11 NBA colours plus low-frequency lighting (a linear gradient and two soft
   "wrinkle" sinusoids, multiplicative) and Gaussian fabric noise; with p=0.3 an edge band of skin
   or court colour (the crop reaching past the torso).
2. Number colour: jersey luminance ``0.299R + 0.587G + 0.114B > 128`` picks from the dark set,
   else the light set; the outline (stroke) is black when the number's luminance is > 128, else
   white, so ``border`` is always true; its width is U[0.03, 0.07] of the font size (>= 1 px).
   Pairs closer than 120 in RGB (orange on red or maroon, red on orange) are left out: they
   are unreadable once degraded.
3. Font: an upright face shipped with matplotlib that really draws the ten digits (checked at
   first use against DejaVu Sans Bold, see :func:`usable_fonts`), regular faces thickened by
   0.035 of the font size, every face by a further U[0, 0.015]; digit height U[0.45, 0.70] of
   the side, shrunk so the outlined number spans <= 78% of the width; centre offset
   U[-0.08, 0.08]·side.
4. Geometry: rotation U[-10°, 10°], horizontal squeeze U[0.85, 1.10], each corner moved inward
   by U[0, 0.08]·side, all as one homography applied to the number's masks at 2x resolution and
   box-reduced (the reference rotated the whole image with black fill and left black corners).
5. Degradation (milder than the reference's always-on JPEG q10-60 / 0.2-0.6 rescale / σ 5-30,
   which leaves a 64 px crop barely readable): Gaussian blur (p=0.5, radius U[0.3, 1.0]·side/64),
   bilinear down/up rescale (p=0.5, factor U[0.45, 0.9]), sensor noise σ U[0, 8], and the file is
   saved once as JPEG with quality U[35, 95].

Metadata colour names follow the real data's vocabulary (REFERENCE §1.2): royal blue is
``"blue"`` and gold is ``"yellow"``.

Labels (:data:`DEFAULT_LABELS`, 42 like the reference's HEAD model): the 17 known members of the
real class set (0, 00, 1, 2, 4, 5, 6, 8, 10, 11, 18, 20, 22, 26, 30, 35, 46), the remaining single
digits 3, 7, 9, and common NBA numbers 12-17, 21, 23-25, 27, 31-34, 40-42, 44, 55, 77, 99 (the
repeated-digit numbers give the same confusions as 00/11/22), sorted as plain strings.

Determinism: every random draw of a sample comes from one ``numpy.random.Generator`` seeded with
``SeedSequence([seed, split, index, len(label), *label bytes])``, so the same seed and arguments
give the same bytes (given the same Pillow/FreeType/libjpeg) and changing one class's count does
not change any other image. The long-tail class order uses its own stream.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from classifier_training.io import atomic_write_json
from classifier_training.recipe import SyntheticConfig

__all__ = [
    "DEFAULT_LABELS",
    "GENERATOR_VERSION",
    "JERSEY_COLORS",
    "SPLITS",
    "SyntheticDatasetError",
    "draws_digits",
    "ensure_synthetic",
    "generate",
    "long_tail_counts",
    "main",
    "render",
    "usable_fonts",
]

log = logging.getLogger(__name__)

GENERATOR = "classifier_training.synthetic"  # the marker in dataset.json, not a module path
GENERATOR_VERSION = 1
"""Bump whenever the same seed and arguments would give different pixels."""

PREFIX = "Read the number."
SPLITS: tuple[str, ...] = ("train", "valid", "test")
_SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
_LONG_TAIL_STREAM = 1_000_003
"""Seed-sequence word that keeps the class-order shuffle apart from every sample's stream."""
LONG_TAIL_RATIO = 60.0
"""Largest/smallest train class under ``long_tail`` (the real data: 64.2x)."""
MAX_LABEL_LEN = 3

_KNOWN_LABELS = (
    "0", "00", "1", "2", "4", "5", "6", "8", "10", "11", "18", "20", "22", "26", "30", "35", "46",
)  # fmt: skip
"""Members of the real data's 42 classes that REFERENCE §1.3 names."""
_FILL_LABELS = (
    "3", "7", "9", "12", "13", "14", "15", "16", "17", "21", "23", "24", "25", "27", "31", "32",
    "33", "34", "40", "41", "42", "44", "55", "77", "99",
)  # fmt: skip
"""Common NBA numbers that complete the 42 (our choice; the reference never lists them)."""
DEFAULT_LABELS: tuple[str, ...] = tuple(sorted({*_KNOWN_LABELS, *_FILL_LABELS}))
"""The 42 default jersey labels, sorted as plain strings ("0", "00", "1", "10", ...)."""

RGB = tuple[int, int, int]

JERSEY_COLORS: dict[str, RGB] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "navy": (0, 32, 78),
    "red": (206, 17, 38),
    "blue": (0, 83, 188),  # royal blue
    "yellow": (253, 185, 39),  # gold
    "green": (0, 122, 51),
    "purple": (93, 14, 65),
    "grey": (128, 128, 128),
    "orange": (255, 103, 31),
    "maroon": (196, 30, 58),
}
"""The reference's 11-colour NBA palette, keyed by the metadata name."""

# (metadata name, RGB): the reference's dark and light number colours.
_DARK_NUMBERS: tuple[tuple[str, RGB], ...] = (
    ("black", (0, 0, 0)),
    ("navy", (0, 32, 78)),
    ("purple", (93, 14, 65)),
    ("black", (30, 30, 30)),
    ("red", (206, 17, 38)),
)
_LIGHT_NUMBERS: tuple[tuple[str, RGB], ...] = (
    ("white", (255, 255, 255)),
    ("yellow", (253, 185, 39)),
    ("white", (230, 230, 230)),
    ("orange", (255, 103, 31)),
)
_MIN_NUMBER_DISTANCE = 120.0
"""Smallest RGB distance between number and jersey: drops the reference's orange-on-red,
orange-on-maroon and red-on-orange (distance ~99), which are unreadable once blurred."""
_EDGE_COLORS: tuple[RGB, ...] = (
    (241, 194, 125),  # skin tones: an arm at the crop's edge
    (224, 172, 105),
    (198, 134, 66),
    (141, 85, 36),
    (92, 51, 23),
    (40, 40, 45),  # dark arena background
    (196, 150, 100),  # hardwood
)

_FONT_CANDIDATES: dict[str, float] = {
    "DejaVuSans-Bold.ttf": 0.0,
    "DejaVuSansMono-Bold.ttf": 0.0,
    "DejaVuSerif-Bold.ttf": 0.0,
    "STIXGeneralBol.ttf": 0.0,
    "cmb10.ttf": 0.0,
    "DejaVuSans.ttf": 0.035,
    "cmss10.ttf": 0.035,
    "cmr10.ttf": 0.035,
}
"""Upright faces in ``matplotlib/mpl-data/fonts/ttf`` (obliques, symbol and display fonts left
out) -> extra weight, as a fraction of the font size, that thickens the regular faces into the
heavy strokes jersey numbers have (their 1 px strokes vanish under blur at 32-64 px).
:func:`usable_fonts` keeps those whose digits pass the glyph check."""
_REFERENCE_FONT = "DejaVuSans-Bold.ttf"
_GLYPH_MIN_CORRELATION = 0.45
"""Each digit must correlate >= this with the reference face's same digit (bbox-normalised 16x24
bitmaps). Real digit faces score 0.53-1.0; tofu boxes and symbol fonts score below 0."""

_SUPERSAMPLE = 2


class SyntheticDatasetError(RuntimeError):
    """The output folder or an argument does not allow generating; the message says what to do."""


# --------------------------------------------------------------------------------------- fonts


def font_dir() -> Path:
    """The TrueType folder shipped inside matplotlib."""
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _digit_signatures(path: Path) -> list[np.ndarray[Any, np.dtype[np.float64]]] | None:
    """Zero-mean unit-norm 16x24 bitmaps of "0".."9" cropped to their ink; None if one is empty."""
    font = ImageFont.truetype(str(path), 64)
    signatures = []
    for digit in "0123456789":
        canvas = Image.new("L", (128, 128), 0)
        ImageDraw.Draw(canvas).text((64, 64), digit, font=font, fill=255, anchor="mm")
        box = canvas.getbbox()
        if box is None:
            return None
        bitmap = np.asarray(
            canvas.crop(box).resize((16, 24), Image.Resampling.BILINEAR), dtype=np.float64
        )
        bitmap = bitmap - bitmap.mean()
        norm = float(np.linalg.norm(bitmap))
        if norm == 0.0:
            return None
        signatures.append(bitmap / norm)
    return signatures


@functools.cache
def _reference_signatures() -> list[np.ndarray[Any, np.dtype[np.float64]]]:
    path = font_dir() / _REFERENCE_FONT
    reference = _digit_signatures(path) if path.is_file() else None
    if reference is None:
        raise SyntheticDatasetError(
            f"{path} is missing or draws no digits; reinstall matplotlib "
            "(the generator only uses the fonts shipped inside it)"
        )
    return reference


def draws_digits(path: Path) -> bool:
    """True when the face at ``path`` draws the ten digits recognisably.

    Every digit must leave ink, the ten bitmaps must be pairwise distinct, and each must correlate
    >= ``_GLYPH_MIN_CORRELATION`` with the same digit of DejaVu Sans Bold. This rejects faces that
    draw nothing (DejaVu*Display), one box for every glyph (LastResort) or symbols (cmex, cmsy).
    """
    signatures = _digit_signatures(path)
    if signatures is None or len({s.tobytes() for s in signatures}) < 10:
        return False
    reference = _reference_signatures()
    scores = [float((s * r).sum()) for s, r in zip(signatures, reference, strict=True)]
    return min(scores) >= _GLYPH_MIN_CORRELATION


@functools.cache
def usable_fonts() -> tuple[Path, ...]:
    """The upright candidate faces shipped with matplotlib that pass :func:`draws_digits`.

    Checked on first use (~30 ms) so that a matplotlib that ships other fonts degrades to fewer
    faces instead of rendering boxes.
    """
    folder = font_dir()
    usable = tuple(
        folder / name
        for name in _FONT_CANDIDATES
        if (folder / name).is_file() and draws_digits(folder / name)
    )
    if not usable:
        raise SyntheticDatasetError(
            f"no font in {folder} draws the digits 0-9; reinstall matplotlib"
        )
    return usable


@functools.lru_cache(maxsize=2048)
def _truetype(path: Path, size: int) -> ImageFont.FreeTypeFont:
    # Opening a face costs ~1 ms, rendering one number ~0.1 ms: reuse them.
    return ImageFont.truetype(str(path), size)


@functools.lru_cache(maxsize=4096)
def _ink_box_at_100(path: Path, label: str) -> tuple[float, float, float, float]:
    """The label's ink box (left, top, right, bottom) at 100 px, to size the font in one step."""
    left, top, right, bottom = _truetype(path, 100).getbbox(label)
    return float(left), float(top), float(right), float(bottom)


# ------------------------------------------------------------------------------------ geometry


def _perspective_coefficients(
    output_corners: np.ndarray[Any, np.dtype[np.float64]],
    input_corners: np.ndarray[Any, np.dtype[np.float64]],
) -> tuple[float, ...]:
    """PIL ``PERSPECTIVE`` coefficients (a..h) mapping each output pixel back to the input.

    Solves ``x_in = (a·x + b·y + c) / (g·x + h·y + 1)``, ``y_in = (d·x + e·y + f) / (g·x + h·y +
    1)`` for the four corner pairs (8 equations). Hand-written because torchvision only has a
    private helper for it (``_get_perspective_coeffs``) and PIL has none.
    """
    rows = []
    rhs = []
    for (x, y), (u, v) in zip(output_corners, input_corners, strict=True):
        rows.append([x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y])
        rows.append([0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y])
        rhs.extend([u, v])
    solution = np.linalg.solve(np.asarray(rows), np.asarray(rhs))
    return tuple(float(c) for c in solution)


def _number_masks(
    label: str,
    font_path: Path,
    rng: np.random.Generator,
    size: int,
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], np.ndarray[Any, np.dtype[np.float32]]]:
    """Coverage masks in [0, 1] (outline+fill, fill) of the warped number at ``size`` px."""
    big = size * _SUPERSAMPLE
    left, top, right, bottom = _ink_box_at_100(font_path, label)
    ink_w, ink_h = max(right - left, 1.0), max(bottom - top, 1.0)
    digit_height = rng.uniform(0.45, 0.70) * big
    squeeze = rng.uniform(0.85, 1.10)
    stroke_fraction = rng.uniform(0.03, 0.07)
    bold_fraction = _FONT_CANDIDATES.get(font_path.name, 0.0) + rng.uniform(0.0, 0.015)
    # Font size giving the target ink height, shrunk if the outlined number is too wide.
    font_px = 100.0 * digit_height / ink_h
    max_width = 0.78 * big / squeeze  # 0.78/2 + 0.08 offset keeps the outline inside
    width_at = ink_w * font_px / 100.0 + 2.0 * (stroke_fraction + bold_fraction) * font_px
    if width_at > max_width:
        font_px *= max_width / width_at
    font_px_int = max(4, round(font_px))
    bold = round(bold_fraction * font_px_int)
    stroke = bold + max(1, round(stroke_fraction * font_px_int))
    font = _truetype(font_path, font_px_int)

    # Draw centred on a canvas twice the output so rotation never clips the number. The fill is
    # emboldened by stroking it in its own colour; the outline is a wider stroke under it.
    canvas_side = 2 * big
    box_l, box_t, box_r, box_b = font.getbbox(label, stroke_width=stroke)
    origin = (canvas_side / 2 - (box_l + box_r) / 2, canvas_side / 2 - (box_t + box_b) / 2)
    outer = Image.new("L", (canvas_side, canvas_side), 0)
    fill = Image.new("L", (canvas_side, canvas_side), 0)
    ImageDraw.Draw(outer).text(origin, label, font=font, fill=255, stroke_width=stroke)
    ImageDraw.Draw(fill).text(origin, label, font=font, fill=255, stroke_width=bold)

    # Forward map canvas -> output: x_out = c + offset + Squeeze·Rot(angle)·(x_canvas - C/2); the
    # corners of the canvas' central `big` square are then moved inward (perspective). PIL wants
    # the inverse, output -> canvas, as the homography through those four corner pairs.
    angle = math.radians(rng.uniform(-10.0, 10.0))
    offset = rng.uniform(-0.08, 0.08, size=2) * big
    inward = rng.uniform(0.0, 0.08, size=(4, 2)) * big
    rel = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]) * (big / 2)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    rotated = rel @ np.array([[cos_a, sin_a], [-sin_a, cos_a]])
    landed = big / 2 + offset + rotated * np.array([squeeze, 1.0])
    out_corners = landed - np.sign(rel) * inward
    coefficients = _perspective_coefficients(out_corners, canvas_side / 2 + rel)

    masks = []
    for mask in (outer, fill):
        warped = mask.transform(
            (big, big),
            Image.Transform.PERSPECTIVE,
            coefficients,
            resample=Image.Resampling.BILINEAR,
        )
        # Box-reduce the 2x render: anti-aliased edges that PIL's transform alone does not give.
        small = warped.reduce(_SUPERSAMPLE)
        masks.append(np.asarray(small, dtype=np.float32) / 255.0)
    return masks[0], masks[1]


# ----------------------------------------------------------------------------------- rendering


def _luminance(rgb: RGB) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _jersey_background(
    color: RGB, rng: np.random.Generator, size: int
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], np.ndarray[Any, np.dtype[np.float32]]]:
    """The flat jersey colour (size, size, 3) and its lighting field (size, size, 1)."""
    base = np.broadcast_to(np.asarray(color, dtype=np.float32), (size, size, 3)).copy()
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    phi = rng.uniform(0.0, 2.0 * math.pi)
    lighting = 1.0 + rng.uniform(-0.25, 0.25) * (math.cos(phi) * xx + math.sin(phi) * yy)
    for _ in range(2):  # soft wrinkles: low-frequency folds across the torso
        psi = rng.uniform(0.0, math.pi)
        cycles = rng.uniform(0.5, 2.0)
        lighting = lighting + rng.uniform(0.0, 0.08) * np.sin(
            2.0 * math.pi * cycles * (math.cos(psi) * xx + math.sin(psi) * yy)
            + rng.uniform(0.0, 2.0 * math.pi)
        )
    return base, lighting[..., None].astype(np.float32)


def render(
    label: str,
    rng: np.random.Generator,
    image_size: int = 64,
    *,
    jersey_color: str | None = None,
    number_color: str | None = None,
    font: Path | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """One RGB jersey crop of ``label`` (``image_size`` px square) and its metadata record.

    Every random choice is drawn from ``rng`` in a fixed order, so the same generator state gives
    the same pixels. ``jersey_color`` is a :data:`JERSEY_COLORS` name; ``number_color`` a name
    from the dark/light set that the jersey's luminance selects; ``font`` a TrueType path.
    Returns the image before JPEG encoding (the writer encodes it) and
    ``{"jersey_color", "number_color", "border": True}``.
    """
    _check_label(label, where="render(label=...)")
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: must be >= 16 px to draw a readable number")
    if jersey_color is None:
        jersey_name = list(JERSEY_COLORS)[int(rng.integers(len(JERSEY_COLORS)))]
    elif jersey_color in JERSEY_COLORS:
        jersey_name = jersey_color
    else:
        raise ValueError(f"jersey_color={jersey_color!r}: choose one of {sorted(JERSEY_COLORS)}")
    jersey_rgb = JERSEY_COLORS[jersey_name]
    choices = tuple(
        choice
        for choice in (_DARK_NUMBERS if _luminance(jersey_rgb) > 128 else _LIGHT_NUMBERS)
        if math.dist(choice[1], jersey_rgb) >= _MIN_NUMBER_DISTANCE
    )
    if number_color is None:
        number_name, number_rgb = choices[int(rng.integers(len(choices)))]
    else:
        matching = [c for c in choices if c[0] == number_color]
        if not matching:
            raise ValueError(
                f"number_color={number_color!r} does not contrast with a {jersey_name} jersey; "
                f"choose one of {sorted({c[0] for c in choices})}"
            )
        number_name, number_rgb = matching[0]
    stroke_rgb: RGB = (0, 0, 0) if _luminance(number_rgb) > 128 else (255, 255, 255)
    fonts = usable_fonts()
    font_path = fonts[int(rng.integers(len(fonts)))] if font is None else Path(font)
    if not font_path.is_file():
        raise ValueError(f"font={font_path}: no such TrueType file")

    size = image_size
    background, lighting = _jersey_background(jersey_rgb, rng, size)
    outer, fill = _number_masks(label, font_path, rng, size)
    image = background  # composited in place, float32 throughout
    image += (np.asarray(stroke_rgb, np.float32) - image) * outer[..., None]
    image += (np.asarray(number_rgb, np.float32) - image) * fill[..., None]
    if rng.random() < 0.3:  # the crop reaches past the torso: an arm or the arena at one edge
        width = max(1, round(rng.uniform(0.03, 0.10) * size))
        edge_rgb = _EDGE_COLORS[int(rng.integers(len(_EDGE_COLORS)))]
        columns = slice(0, width) if rng.random() < 0.5 else slice(size - width, size)
        image[:, columns] = np.asarray(edge_rgb, np.float32)
    image *= lighting
    image += rng.normal(0.0, rng.uniform(2.0, 5.0), size=(size, size, 3))
    pil = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")

    if rng.random() < 0.5:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * size / 64))
    if rng.random() < 0.5:
        low = max(8, round(size * rng.uniform(0.45, 0.9)))
        pil = pil.resize((low, low), Image.Resampling.BILINEAR).resize(
            (size, size), Image.Resampling.BILINEAR
        )
    sigma = rng.uniform(0.0, 8.0)
    noisy = np.asarray(pil, dtype=np.float32) + rng.normal(0.0, sigma, size=(size, size, 3))
    pil = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")
    meta = {"jersey_color": jersey_name, "number_color": number_name, "border": True}
    return pil, meta


def _jpeg_bytes(image: Image.Image, rng: np.random.Generator) -> bytes:
    """Encode once at quality U[35, 95]: the JPEG degradation and the file in one step."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(35, 96)))
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- dataset


def _check_label(label: object, *, where: str) -> str:
    if not isinstance(label, str) or not label.isascii() or not label.isdigit():
        raise ValueError(f"{where}: label {label!r} must be a string of digits (a jersey number)")
    if len(label) > MAX_LABEL_LEN:
        raise ValueError(f"{where}: label {label!r} has more than {MAX_LABEL_LEN} digits")
    return label


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(labels, str):
        raise ValueError(f"labels={labels!r}: pass a list of labels, not one string")
    checked = [_check_label(label, where="labels") for label in labels]
    if not checked:
        raise ValueError("labels is empty: pass at least one jersey number")
    duplicates = sorted({label for label in checked if checked.count(label) > 1})
    if duplicates:
        raise ValueError(f"labels has duplicates {duplicates}: list each label once")
    return tuple(sorted(checked))


def long_tail_counts(labels: Sequence[str], train_per_class: int, seed: int) -> dict[str, int]:
    """Train images per label falling geometrically from ``train_per_class`` to ~1/60 of it.

    The k-th class of a seeded shuffle gets ``max(1, round(n · (1/60)^(k/(C-1))))`` images, so
    the largest/smallest ratio is ~60 (the real data's is 64.2). Keys in sorted label order.
    """
    ordered = sorted(labels)
    order = np.random.default_rng(np.random.SeedSequence([seed, _LONG_TAIL_STREAM])).permutation(
        len(ordered)
    )
    counts: dict[str, int] = {}
    steps = max(len(ordered) - 1, 1)
    for rank, position in enumerate(order):
        fraction = (1.0 / LONG_TAIL_RATIO) ** (rank / steps)
        counts[ordered[int(position)]] = max(1, round(train_per_class * fraction))
    return {label: counts[label] for label in ordered}


def _sample_rng(seed: int, split: str, label: str, index: int) -> np.random.Generator:
    words = [seed, _SPLIT_CODES[split], index, len(label), *label.encode("ascii")]
    return np.random.default_rng(np.random.SeedSequence(words))


def _image_name(label: str, index: int) -> str:
    return f"synth_{label}_{index:05d}.jpg"


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _is_generated(path: Path) -> bool:
    """True when ``path/dataset.json`` was written by this generator."""
    try:
        info = json.loads((path / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("generator") == GENERATOR


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in ("pillow", "numpy", "matplotlib"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _write_split(
    split_dir: Path,
    split: str,
    counts: dict[str, int],
    *,
    image_size: int,
    seed: int,
) -> None:
    images = split_dir / "images"
    images.mkdir(parents=True)
    lines = []
    for label, count in counts.items():
        for index in range(count):
            rng = _sample_rng(seed, split, label, index)
            image, meta = render(label, rng, image_size)
            name = _image_name(label, index)
            (images / name).write_bytes(_jpeg_bytes(image, rng))
            record = {
                "image": f"images/{name}",
                "prefix": PREFIX,
                "suffix": label,
                "metadata": meta,
            }
            lines.append(json.dumps(record))
    (split_dir / "annotations.jsonl").write_text("\n".join(lines) + "\n")


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


def generate(
    out_dir: Path,
    *,
    labels: Sequence[str] = DEFAULT_LABELS,
    train_per_class: int = 60,
    valid_per_class: int = 12,
    test_per_class: int = 12,
    image_size: int = 64,
    long_tail: bool = False,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Render the dataset into ``out_dir``; return the summary also written to ``dataset.json``.

    Everything is written into a temporary folder beside ``out_dir`` and renamed into place at the
    end, so an interrupted run leaves no half dataset. An existing non-empty ``out_dir`` is an
    error unless ``overwrite`` is set, and even then only a folder this generator wrote (it holds
    our ``dataset.json``) is replaced, never an arbitrary one.
    """
    out_dir = Path(out_dir)
    sorted_labels = _check_labels(labels)
    _check_count("train_per_class", train_per_class, 1)
    _check_count("valid_per_class", valid_per_class, 0)
    _check_count("test_per_class", test_per_class, 0)
    _check_count("image_size", image_size, 16)
    _check_count("seed", seed, 0)
    if out_dir.exists() and not out_dir.is_dir():
        raise SyntheticDatasetError(f"{out_dir} exists and is a file; choose another output folder")
    if _is_nonempty_dir(out_dir):
        if not overwrite:
            raise SyntheticDatasetError(
                f"{out_dir} exists and is not empty; pass overwrite=True (CLI: --overwrite) to "
                "replace it, or choose another output folder"
            )
        if not _is_generated(out_dir):
            raise SyntheticDatasetError(
                f"{out_dir} is not empty and holds no dataset.json from {GENERATOR}; refusing to "
                "delete it even with overwrite: remove it yourself or choose another folder"
            )

    train_counts = (
        long_tail_counts(sorted_labels, train_per_class, seed)
        if long_tail
        else dict.fromkeys(sorted_labels, train_per_class)
    )
    per_split = {
        "train": train_counts,
        "valid": dict.fromkeys(sorted_labels, valid_per_class),
        "test": dict.fromkeys(sorted_labels, test_per_class),
    }
    summary: dict[str, Any] = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "long_tail": long_tail,
        "train_per_class": train_per_class,
        "valid_per_class": valid_per_class,
        "test_per_class": test_per_class,
        "labels": list(sorted_labels),
        "fonts": [path.name for path in usable_fonts()],
        "libraries": _library_versions(),
        "splits": {
            split: {"total": sum(counts.values()), "per_class": counts}
            for split, counts in per_split.items()
        },
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        for split, counts in per_split.items():
            _write_split(staging / split, split, counts, image_size=image_size, seed=seed)
        atomic_write_json(staging / "dataset.json", summary)
        _move_into_place(staging, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _move_into_place(staging: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Rename ``staging`` to ``out_dir`` in one step.

    POSIX ``rename`` replaces an empty directory and fails on a non-empty one, so a dataset that
    another process moved in meanwhile is never replaced unless ``overwrite`` is set; with it the
    old dataset is first moved aside into a scratch folder and deleted after the swap.
    """
    scratch: Path | None = None
    if _is_nonempty_dir(out_dir):
        if not overwrite:
            raise SyntheticDatasetError(
                f"{out_dir} was filled by someone else while generating; keeping theirs"
            )
        scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(scratch / out_dir.name)
    try:
        staging.rename(out_dir)
    except OSError as error:
        if scratch is not None and not out_dir.exists():
            (scratch / out_dir.name).rename(out_dir)  # put the old dataset back
        raise SyntheticDatasetError(
            f"could not move the generated dataset into {out_dir} ({error}); another process may "
            "have written it meanwhile"
        ) from error
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def ensure_synthetic(root: Path, cfg: SyntheticConfig) -> bool:
    """Generate the dataset described by ``cfg`` into ``root`` unless ``root`` already has files.

    Returns True when this call generated it. An existing non-empty ``root`` is left untouched
    (a warning is logged when its ``dataset.json`` records other settings). If another process
    finishes the same generation first, this one discards its copy and returns False.
    """
    root = Path(root)
    if _is_nonempty_dir(root):
        _warn_if_different(root, cfg)
        return False
    try:
        generate(
            root,
            labels=cfg.labels or DEFAULT_LABELS,
            train_per_class=cfg.train_per_class,
            valid_per_class=cfg.valid_per_class,
            test_per_class=cfg.test_per_class,
            image_size=cfg.image_size,
            long_tail=cfg.long_tail,
            seed=cfg.seed,
        )
    except SyntheticDatasetError:
        if _is_generated(root):  # lost a race with another process: its copy is as good as ours
            return False
        raise
    log.info("Generated the synthetic jersey dataset in %s", root)
    return True


def _warn_if_different(root: Path, cfg: SyntheticConfig) -> None:
    try:
        info = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        return
    wanted = {
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "long_tail": cfg.long_tail,
        "train_per_class": cfg.train_per_class,
        "valid_per_class": cfg.valid_per_class,
        "test_per_class": cfg.test_per_class,
        "labels": sorted(cfg.labels or DEFAULT_LABELS),
    }
    differing = sorted(key for key, value in wanted.items() if info.get(key) != value)
    if differing:
        log.warning(
            "%s exists and was generated with other %s than data.synthetic asks for; using it as "
            "is (delete the folder to regenerate)",
            root,
            ", ".join(differing),
        )


# ----------------------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class _Row:
    split: str
    images: int
    classes: int
    smallest: int
    largest: int


def _format_summary(summary: dict[str, Any], out_dir: Path, seconds: float) -> str:
    rows = []
    for split in SPLITS:
        counts = summary["splits"][split]["per_class"]
        present = [n for n in counts.values() if n > 0]
        rows.append(
            _Row(
                split,
                summary["splits"][split]["total"],
                len(present),
                min(present, default=0),
                max(present, default=0),
            )
        )
    lines = [
        f"{'split':<6} {'images':>7} {'classes':>7} {'min/class':>9} {'max/class':>9}",
        *(
            f"{r.split:<6} {r.images:>7} {r.classes:>7} {r.smallest:>9} {r.largest:>9}"
            for r in rows
        ),
        f"{'total':<6} {sum(r.images for r in rows):>7}",
        f"{summary['image_size']} px, seed {summary['seed']}, "
        f"{len(summary['fonts'])} fonts, {seconds:.1f} s -> {out_dir}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m classifier_training.data.synthetic --out DIR [...]``: generate, summarise."""
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(
        prog="python -m classifier_training.data.synthetic",
        description="Render a synthetic basketball jersey number dataset (JSONL layout).",
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    parser.add_argument("--train-per-class", type=int, default=defaults.train_per_class)
    parser.add_argument("--valid-per-class", type=int, default=defaults.valid_per_class)
    parser.add_argument("--test-per-class", type=int, default=defaults.test_per_class)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument(
        "--long-tail", action="store_true", help="train counts fall ~60x over a shuffled order"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--labels", nargs="+", default=None, help="jersey numbers (default: the 42 built in)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a dataset this tool generated earlier"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = generate(
            args.out,
            labels=args.labels or DEFAULT_LABELS,
            train_per_class=args.train_per_class,
            valid_per_class=args.valid_per_class,
            test_per_class=args.test_per_class,
            image_size=args.image_size,
            long_tail=args.long_tail,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (SyntheticDatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_format_summary(summary, args.out, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
