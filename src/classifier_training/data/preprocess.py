"""The preprocessing contract of the exported model (torch-free: PIL + numpy).

Training workers, evaluation and the onnxruntime predictor all go through these functions, so an
image is prepared the same way wherever the model sees it:

* eval / inference: RGB → resize the shorter side to ``resize_size(S) = round(S * 256 / 224)``
  (PIL bilinear, aspect kept) → centre crop ``S x S`` → uint8 HWC. This is bit-identical to
  ``torchvision.transforms.v2.Resize(resize_size(S)) + CenterCrop(S)`` on PIL images (tested).
* train (before the batched device augmentation): RGB → optional JPEG re-encode at native size →
  ``letterbox`` (longer side to S, aspect kept, pad with the ImageNet-mean colour) or ``stretch``
  (resize to S x S) → uint8 HWC.
* model input: ``x = (u8 / 255 - mean) / std`` as float32 NCHW (:func:`to_nchw_float`), the same
  arithmetic as torchvision's ``ToDtype(float32, scale=True)`` + ``Normalize``.

Every path starts with :func:`to_rgb8`, the one decode rule for every PIL mode (training workers,
the full-decode check, evaluation and the onnxruntime predictor all call it):

* 16-bit and 32-bit integer greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``): the
  value range is 0..65535 (``I`` is what older Pillow and TIFF give for 16-bit data; values outside
  are clipped) and 8 bits are ``v >> 8``, the rule Pillow itself applies to 16-bit RGB(A) PNGs and
  libpng's ``strip_16``; a 16-bit image made from an 8-bit one (``v * 257``) gives back exactly
  the 8-bit values. ``convert("RGB")`` would clip every value above 255 to white.
* 32-bit float (``F``): the range is 0..1, 8 bits are ``round(v * 255)`` clipped (NaN -> 0).
* transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``RGB``/``L`` with a ``transparency`` key):
  composited over :data:`PAD_RGB`, the ImageNet mean that letterboxing pads with (~0 after
  normalising), instead of exposing whatever colour hides under transparent pixels.
* everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ...): Pillow's ``convert("RGB")``.
"""

from __future__ import annotations

import io
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

TrainFit = Literal["letterbox", "stretch"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""ImageNet RGB mean on the 0-1 scale (timm's ``IMAGENET_DEFAULT_MEAN``): the normalisation of
every model input, and the fill colour of letterbox and zoom-out."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet RGB standard deviation on the 0-1 scale (timm's ``IMAGENET_DEFAULT_STD``)."""

PAD_RGB: tuple[int, int, int] = (124, 116, 104)
"""Letterbox fill: :data:`IMAGENET_MEAN` in 0-255 (rounded), i.e. ~0 after normalising."""

FIXED_PREPROCESSING: Mapping[str, str] = types.MappingProxyType(
    {
        "interpolation": "bilinear",
        "color": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
        "scale": "1/255",
        "output": "logits",
    }
)
"""What this module implements and no recipe changes: the fixed part of the ``preprocessing``
section of ``labels_mapping.json`` (see :func:`preprocessing_contract`)."""

_BILINEAR = Image.Resampling.BILINEAR


def resize_size(image_size: int) -> int:
    """Shorter-side length before the centre crop: ``round(image_size * 256 / 224)`` (256 at 224).

    ``image_size * 8 / 7`` is never exactly ``k + 0.5``, so Python's round-half-even never bites.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return round(image_size * 256 / 224)


def preprocessing_contract(image_size: int) -> dict[str, Any]:
    """The ``preprocessing`` section of ``labels_mapping.json`` for :func:`eval_image` at
    ``image_size`` followed by :func:`to_nchw_float` (key order fixed: the JSON is byte-stable)."""
    return {
        "resize_shorter": resize_size(image_size),
        "center_crop": int(image_size),
        **FIXED_PREPROCESSING,
    }


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB by the rules of the module docstring (high bit depths scaled,
    transparency composited over :data:`PAD_RGB`); an RGB image is returned as is."""
    mode = img.mode
    if mode in _ALPHA_MODES or "transparency" in img.info:
        background = Image.new("RGBA", img.size, (*PAD_RGB, 255))
        background.alpha_composite(img.convert("RGBA"))
        return background.convert("RGB")
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        grey = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    return img.convert("RGB")


def open_image(path: str | Path) -> tuple[Image.Image, str]:
    """Decode an image file fully (every byte: a truncated file raises ``OSError``) and bring it
    to 8-bit RGB with :func:`to_rgb8` (no EXIF rotation, like the reference).

    Returns the RGB image and the file's own PIL mode (``I;16``, ``P``, ...).
    """
    with Image.open(path) as im:
        im.load()
        return to_rgb8(im), im.mode


def open_rgb(path: str | Path) -> Image.Image:
    """:func:`open_image` without the mode: what loader workers, evaluation and the predictor
    CLIs read."""
    return open_image(path)[0]


def _shorter_side_to(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``_compute_resized_output_size`` for an int size: the shorter side becomes
    ``size``, the longer ``int(size * long / short)`` (truncated). Returns (width, height)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def eval_image(img: Image.Image, image_size: int) -> npt.NDArray[np.uint8]:
    """Resize the shorter side to ``resize_size(image_size)`` (bilinear), centre-crop
    ``image_size``; returns uint8 HWC RGB. Crop offsets use torchvision's
    ``int(round((h - crop) / 2.0))``."""
    img = to_rgb8(img)
    width, height = img.size
    new_w, new_h = _shorter_side_to(width, height, resize_size(image_size))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), resample=_BILINEAR)
    top = round((new_h - image_size) / 2.0)  # torchvision: int(round(...)), round -> int already
    left = round((new_w - image_size) / 2.0)
    img = img.crop((left, top, left + image_size, top + image_size))
    return np.array(img, dtype=np.uint8)


def train_image(
    img: Image.Image, image_size: int, fit: TrainFit = "letterbox"
) -> npt.NDArray[np.uint8]:
    """Bring a train image to ``image_size x image_size`` uint8 HWC RGB.

    ``letterbox``: scale so the longer side is ``image_size`` (bilinear, aspect kept, each side
    ``max(1, round(side * S / longer))``), centre it on a :data:`PAD_RGB` canvas.
    ``stretch``: resize to ``S x S`` ignoring the aspect.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    img = to_rgb8(img)
    width, height = img.size
    if fit == "stretch":
        if (width, height) != (image_size, image_size):
            img = img.resize((image_size, image_size), resample=_BILINEAR)
        return np.array(img, dtype=np.uint8)
    if fit != "letterbox":
        raise ValueError(f"unknown train fit {fit!r}; use 'letterbox' or 'stretch'")
    longer = max(width, height)
    new_w = max(1, round(width * image_size / longer))
    new_h = max(1, round(height * image_size / longer))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), resample=_BILINEAR)
    if (new_w, new_h) == (image_size, image_size):
        return np.array(img, dtype=np.uint8)
    out = np.empty((image_size, image_size, 3), dtype=np.uint8)
    out[...] = PAD_RGB
    top, left = (image_size - new_h) // 2, (image_size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = np.asarray(img, dtype=np.uint8)
    return out


def jpeg_degrade(img: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG at ``quality`` (1-100) in memory and decode again (RGB)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    buf = io.BytesIO()
    to_rgb8(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")


def to_nchw_float(
    batch_uint8_nhwc: npt.NDArray[np.uint8],
    mean: Sequence[float],
    std: Sequence[float],
) -> npt.NDArray[np.float32]:
    """uint8 NHWC RGB → float32 NCHW ``(x * (1/255) - mean) / std``, C-contiguous.

    This is the ``input`` tensor of the exported ONNX model.
    """
    arr = np.asarray(batch_uint8_nhwc)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
        raise ValueError(
            f"expected a uint8 batch of shape [N, H, W, 3], got {arr.dtype} {list(arr.shape)}"
        )
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 values each (std > 0), got {mean}, {std}")
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    x = arr.astype(np.float32) * np.float32(1.0 / 255.0)
    x = (x - m) / s
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
