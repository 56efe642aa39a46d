"""Render one synthetic basketball-jersey-number crop (PIL + numpy + matplotlib's fonts).

:func:`render` draws one image from a ``numpy.random.Generator``; :func:`encode_jpeg` saves it
once as JPEG (the last degradation). Writing a whole dataset is
:mod:`classifier_training.data.synthetic`.

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
"""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = [
    "JERSEY_COLORS",
    "MAX_LABEL_LEN",
    "SyntheticDatasetError",
    "check_label",
    "draws_digits",
    "encode_jpeg",
    "font_dir",
    "render",
    "usable_fonts",
]

MAX_LABEL_LEN = 3
"""Longest jersey number (in digits) that a crop can hold."""

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
    check_label(label, where="render(label=...)")
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


def encode_jpeg(image: Image.Image, rng: np.random.Generator) -> bytes:
    """Encode once at quality U[35, 95]: the JPEG degradation and the file in one step."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(35, 96)))
    return buffer.getvalue()


def check_label(label: object, *, where: str) -> str:
    if not isinstance(label, str) or not label.isascii() or not label.isdigit():
        raise ValueError(f"{where}: label {label!r} must be a string of digits (a jersey number)")
    if len(label) > MAX_LABEL_LEN:
        raise ValueError(f"{where}: label {label!r} has more than {MAX_LABEL_LEN} digits")
    return label
