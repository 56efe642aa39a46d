"""Augmentation presets: every parameter of the train augmentation in one frozen dataclass.

``AugmentParams()`` (all gates off) is the ``none`` preset: normalisation only. The parameters
that *shape* an op (ranges, kernel size, the degradations' inner probabilities) default to the
reference's values, and the gates that switch an op on (``crop_p``, ``hflip_p``, rotation,
jitter strengths, ``blur_p``, ``degrade_p``, ``erase_p``, ...) default to off, so overriding a gate
alone in a recipe (``augment.perspective_p: 0.3``) gives the reference's version of that op.

Probabilities are per sample. The degradation block is one ``RandomApply(p=degrade_p)``: inside
it pixelate, bilinear down-up, noise and zoom each apply with their own probability.

JPEG re-compression runs in the loader workers at native size, not on the device, and is not
gated by the device-side block draw: a worker applies JPEG with probability
``jpeg_effective_p = degrade_p * jpeg_p`` (the reference's marginal, 0.85 * 0.7 = 0.595 for
``jersey``), with a quality drawn uniformly from ``jpeg_quality`` (inclusive).

Strengths measured in pixels (blur sigma and kernel, noise sigma, the pixelate and down-up
factors) are stated at ``reference_size`` (224 px, where the reference tuned the jersey preset) and
rescaled to the training size by :meth:`AugmentParams.at_size`, so a preset means the same thing
at 32, 64 or 224 px; every other parameter is a fraction of the side or area, an angle or a colour
factor, which no resize changes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from classifier_training.data.preprocess import IMAGENET_MEAN

if TYPE_CHECKING:
    from classifier_training.recipe import AugmentConfig


def _fail(where: str, value: object, rule: str) -> None:
    raise ValueError(f"{where} = {value!r}: {rule}")


def _check_prob(where: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        _fail(where, value, "a probability must be in [0, 1]")


def _check_interval(
    where: str,
    value: tuple[float, float],
    low: float,
    high: float,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    if len(value) != 2:
        _fail(where, value, "expected two numbers (min, max)")
    lo, hi = value
    lo_ok = lo > low if open_low else lo >= low
    hi_ok = hi < high if open_high else hi <= high
    if not (lo_ok and hi_ok and lo <= hi):
        left = "(" if open_low else "["
        right = ")" if open_high else "]"
        _fail(where, value, f"need min <= max, both in {left}{low}, {high}{right}")


def _check_number(where: str, value: float, low: float, high: float = math.inf) -> None:
    if not low <= value <= high:
        _fail(where, value, f"must be in [{low}, {high}]")


@dataclass(frozen=True)
class AugmentParams:
    """Every parameter of the batched train augmentation (see the module docstring).

    Order of application: geometry (random resized crop, horizontal flip, affine, perspective;
    one resampling) -> colour jitter -> Gaussian blur -> degradation block (pixelate, bilinear
    down-up, noise, zoom in/out) -> normalise -> random erasing.
    """

    # geometry
    crop_p: float = 0.0
    """Probability of a random resized crop (torchvision RandomResizedCrop)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Crop area as a fraction of the image."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Crop aspect ratio (width / height) range, sampled log-uniformly."""
    hflip_p: float = 0.0
    """Horizontal flip probability (0 for digits: a flip mirrors them)."""
    rotate_degrees: float = 0.0
    """Affine rotation ~ U(-d, d) degrees."""
    translate: float = 0.0
    """Affine translation ~ U(-t, t) times the side, rounded to whole pixels."""
    affine_scale: tuple[float, float] = (1.0, 1.0)
    """Affine zoom factor range."""
    shear_degrees: float = 0.0
    """Affine x-shear ~ U(-s, s) degrees."""
    perspective_p: float = 0.0
    """Probability of a perspective warp."""
    perspective_distortion: float = 0.3
    """How far corners move inward, as a fraction of half the side (torchvision's distortion)."""
    # colour
    brightness: float = 0.0
    """Brightness factor ~ U(max(0, 1 - b), 1 + b)."""
    contrast: float = 0.0
    """Contrast factor ~ U(max(0, 1 - c), 1 + c)."""
    saturation: float = 0.0
    """Saturation factor ~ U(max(0, 1 - s), 1 + s)."""
    hue: float = 0.0
    """Hue shift ~ U(-h, h) turns (h <= 0.5), as a YIQ chroma rotation."""
    # blur
    blur_p: float = 0.0
    """Gaussian blur probability."""
    blur_kernel: int = 7
    """Gaussian blur kernel size (odd)."""
    blur_sigma: tuple[float, float] = (0.5, 3.5)
    """Gaussian blur sigma range in pixels."""
    # degradation block
    degrade_p: float = 0.0
    """Probability of the degradation block (pixelate, down-up, noise, zoom; JPEG, see jpeg_p)."""
    jpeg_p: float = 0.7
    """JPEG probability inside the block; the loader uses jpeg_effective_p = degrade_p * jpeg_p."""
    jpeg_quality: tuple[int, int] = (5, 55)
    """JPEG quality range (inclusive), drawn uniformly by the loader worker."""
    pixelate_p: float = 0.4
    """Pixelate probability inside the block."""
    pixelate_scale: tuple[float, float] = (0.1, 0.5)
    """Pixelate: nearest resize to this fraction of the side and back."""
    downup_p: float = 0.5
    """Bilinear down-up probability inside the block."""
    downup_scale: tuple[float, float] = (0.1, 0.45)
    """Bilinear down-up: resize to this fraction of the side and back."""
    noise_p: float = 0.6
    """Gaussian noise probability inside the block."""
    noise_sigma: tuple[float, float] = (10.0, 40.0)
    """Gaussian noise sigma range on the 0-255 scale."""
    zoom_p: float = 1.0
    """Zoom probability inside the block (zoom-in or zoom-out, 50/50)."""
    zoom_in_scale: tuple[float, float] = (0.5, 1.0)
    """Zoom-in: crop this fraction of the side and resize back."""
    zoom_out_scale: tuple[float, float] = (1.1, 2.0)
    """Zoom-out: paste on a canvas this many times the side, filled with zoom_out_fill."""
    zoom_out_fill: tuple[float, float, float] = IMAGENET_MEAN
    """Zoom-out canvas colour (RGB, 0-1 scale)."""
    # after normalisation
    erase_p: float = 0.0
    """Random erasing probability (on the normalised image)."""
    erase_scale: tuple[float, float] = (0.02, 0.2)
    """Erased area as a fraction of the image."""
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    """Erased box aspect ratio range, sampled log-uniformly."""
    erase_value: float = 0.0
    """Value written into erased boxes (0 = the mean colour after normalisation)."""
    # size
    reference_size: int = 224
    """Side (px) at which blur_sigma, blur_kernel, noise_sigma, pixelate_scale and downup_scale
    are stated; rescaled to the training size by at_size (0: take them literally at any size)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in dataclasses.fields(self):
            if f.name.endswith("_p"):
                _check_prob(f"{name}.{f.name}", getattr(self, f.name))
        _check_interval(f"{name}.crop_scale", self.crop_scale, 0.0, 1.0, open_low=True)
        _check_interval(f"{name}.crop_ratio", self.crop_ratio, 0.0, math.inf, open_low=True)
        _check_number(f"{name}.rotate_degrees", self.rotate_degrees, 0.0, 180.0)
        _check_number(f"{name}.translate", self.translate, 0.0, 1.0)
        _check_interval(f"{name}.affine_scale", self.affine_scale, 0.0, math.inf, open_low=True)
        _check_number(f"{name}.shear_degrees", self.shear_degrees, 0.0, 80.0)
        _check_number(f"{name}.perspective_distortion", self.perspective_distortion, 0.0, 1.0)
        for jitter in ("brightness", "contrast", "saturation"):
            _check_number(f"{name}.{jitter}", getattr(self, jitter), 0.0)
        _check_number(f"{name}.hue", self.hue, 0.0, 0.5)
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            _fail(f"{name}.blur_kernel", self.blur_kernel, "must be an odd integer >= 1")
        _check_interval(f"{name}.blur_sigma", self.blur_sigma, 0.0, math.inf, open_low=True)
        q = self.jpeg_quality
        if len(q) != 2 or not all(isinstance(v, int) for v in q) or not 1 <= q[0] <= q[1] <= 100:
            _fail(f"{name}.jpeg_quality", q, "need integers 1 <= min <= max <= 100")
        # 1.0 is allowed: it keeps the image (what at_size gives where nothing is lost at that size)
        _check_interval(f"{name}.pixelate_scale", self.pixelate_scale, 0.0, 1.0, open_low=True)
        _check_interval(f"{name}.downup_scale", self.downup_scale, 0.0, 1.0, open_low=True)
        _check_interval(f"{name}.noise_sigma", self.noise_sigma, 0.0, 255.0)
        _check_interval(f"{name}.zoom_in_scale", self.zoom_in_scale, 0.0, 1.0, open_low=True)
        _check_interval(f"{name}.zoom_out_scale", self.zoom_out_scale, 1.0, 8.0)
        if len(self.zoom_out_fill) != 3 or not all(0 <= c <= 1 for c in self.zoom_out_fill):
            _fail(f"{name}.zoom_out_fill", self.zoom_out_fill, "need three values in [0, 1]")
        _check_interval(
            f"{name}.erase_scale", self.erase_scale, 0.0, 1.0, open_low=True, open_high=True
        )
        _check_interval(f"{name}.erase_ratio", self.erase_ratio, 0.0, math.inf, open_low=True)
        if isinstance(self.reference_size, bool) or not isinstance(self.reference_size, int):
            _fail(f"{name}.reference_size", self.reference_size, "must be an integer")
        _check_number(f"{name}.reference_size", self.reference_size, 0)

    def at_size(self, size: int) -> AugmentParams:
        """These parameters in pixel units at a ``size`` px image (``reference_size`` becomes size).

        An op at size S should do what it does at the reference size R to the same content:
        resize the image to R, apply the op there, resize back to S. With ``k = S / R``:

        - Gaussian blur: a blur of sigma px at R is one of ``k * sigma`` px at S, so
          ``blur_sigma_S = k * blur_sigma_R``; the kernel radius follows,
          ``r_S = ceil(k * r_R)`` (``blur_kernel = 2 r + 1``), so the truncation stays at the
          same number of sigmas or more (at R = 224: k7, sigma 0.5-3.5; at 64: k3, 0.14-1.0).
        - Gaussian noise: averaging the (R/S)^2 pixels of R that make one pixel of S divides
          i.i.d. noise by R/S, so ``noise_sigma_S = k * noise_sigma_R`` (capped at 255).
        - Pixelate and bilinear down-up: at R the image is brought to ``n = f_R * R`` pixels a
          side; seen at S that loss survives only where n < S, so ``f_S = min(1, f_R / k)``: the
          degraded image keeps the same n pixels of detail at every size, and an image already
          smaller than n is left alone (f = 1) instead of being degraded further.
        - Everything else is size-free: crop, erasing and zoom are fractions of the area or
          side, translation and perspective fractions of the side, rotation and shear angles,
          colour jitter factors. JPEG runs in the loader on the decoded image, before any resize.

        ``size`` is the side of a square input (the geometric mean of height and width for a
        rectangular one). ``reference_size == 0`` returns the parameters unchanged.
        """
        if size < 1:
            raise ValueError(f"AugmentParams.at_size: size must be >= 1, got {size}")
        if self.reference_size == 0 or size == self.reference_size:
            return self
        k = size / self.reference_size
        radius = math.ceil(k * (self.blur_kernel // 2) - 1e-9)

        def survives(scale: tuple[float, float]) -> tuple[float, float]:
            return (min(1.0, scale[0] / k), min(1.0, scale[1] / k))

        return dataclasses.replace(
            self,
            blur_sigma=(self.blur_sigma[0] * k, self.blur_sigma[1] * k),
            blur_kernel=2 * max(radius, 0) + 1,
            noise_sigma=(min(255.0, self.noise_sigma[0] * k), min(255.0, self.noise_sigma[1] * k)),
            pixelate_scale=survives(self.pixelate_scale),
            downup_scale=survives(self.downup_scale),
            reference_size=size,
        )

    @property
    def jpeg_effective_p(self) -> float:
        """Per-sample JPEG probability for the loader workers: ``degrade_p * jpeg_p``."""
        return self.degrade_p * self.jpeg_p


def none() -> AugmentParams:
    """No augmentation: normalisation only."""
    return AugmentParams()


def imagenet() -> AugmentParams:
    """torchvision's classic recipe: random resized crop, flip 0.5, jitter 0.2/0.2/0.2/0.1."""
    return AugmentParams(
        crop_p=1.0, hflip_p=0.5, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1
    )


def jersey() -> AugmentParams:
    """The reference's final jersey-number recipe (REFERENCE.md 2.1), never flipped.

    Pixel strengths as the reference set them at 224 px; other sizes rescale them (at_size).

    Crop (0.08-1, 3/4-4/3) -> affine 25 deg / 0.1 / 0.85-1.15 / shear 15 -> perspective 0.3 at
    p 0.4 -> jitter 0.2/0.2/0.2/0.1 -> blur k7 sigma 0.5-3.5 always -> with p 0.85: JPEG q5-55
    p 0.7 (loader), pixelate 0.1-0.5 p 0.4, bilinear 0.1-0.45 p 0.5, noise 10-40 p 0.6, zoom-in
    0.5-1 or zoom-out 1.1-2 -> normalise -> erasing p 0.3, 0.02-0.2, 0.3-3.3.
    """
    return AugmentParams(
        crop_p=1.0,
        rotate_degrees=25.0,
        translate=0.1,
        affine_scale=(0.85, 1.15),
        shear_degrees=15.0,
        perspective_p=0.4,
        perspective_distortion=0.3,
        brightness=0.2,
        contrast=0.2,
        saturation=0.2,
        hue=0.1,
        blur_p=1.0,
        degrade_p=0.85,
        erase_p=0.3,
    )


PRESETS = {"jersey": jersey, "imagenet": imagenet, "none": none}
"""Preset name (``augment.preset``) -> factory."""

# recipe field -> AugmentParams fields it sets, and its rule
_PROBABILITY_FIELDS = ("hflip_p", "perspective_p", "blur_p", "degrade_p", "jpeg_p", "erase_p")
_NUMBER_FIELDS = {
    "rotate_degrees": (0.0, 180.0),
    "translate": (0.0, 1.0),
    "shear_degrees": (0.0, 80.0),
    "color_jitter": (0.0, math.inf),
}


def resolve(cfg: AugmentConfig) -> AugmentParams:
    """The recipe's ``augment`` section as parameters: the named preset, then every override.

    Each field of ``cfg`` that is not None replaces the preset's value; ``color_jitter`` sets
    brightness, contrast and saturation (hue keeps the preset's); ``orientation_sensitive``
    sets ``hflip_p`` to 0 (true) or 0.5 (false) unless ``hflip_p`` itself is given. Raises
    ValueError naming the ``augment.<field>`` that is out of range or contradicts another.
    """
    factory = PRESETS.get(cfg.preset)
    if factory is None:
        choices = ", ".join(PRESETS)
        raise ValueError(
            f"augment.preset = {cfg.preset!r}: unknown preset; choose one of {choices}"
        )
    changes: dict[str, Any] = {}
    for name in _PROBABILITY_FIELDS:
        value = getattr(cfg, name)
        if value is not None:
            _check_prob(f"augment.{name}", float(value))
            changes[name] = float(value)
    for name, (low, high) in _NUMBER_FIELDS.items():
        value = getattr(cfg, name)
        if value is not None:
            value = float(value)
            _check_number(f"augment.{name}", value, low, high)
            if name == "color_jitter":
                changes.update(brightness=value, contrast=value, saturation=value)
            else:
                changes[name] = value
    if cfg.orientation_sensitive is not None:
        hflip = changes.get("hflip_p")
        if cfg.orientation_sensitive and hflip:
            raise ValueError(
                f"augment.hflip_p = {hflip} contradicts augment.orientation_sensitive = true "
                "(a flip changes what the image shows); drop one of them"
            )
        if "hflip_p" not in changes:
            changes["hflip_p"] = 0.0 if cfg.orientation_sensitive else 0.5
    if cfg.crop_scale_min is not None:
        low = float(cfg.crop_scale_min)
        _check_number("augment.crop_scale_min", low, 1e-3, 1.0)
        changes["crop_scale"] = (low, 1.0)
    return dataclasses.replace(factory(), **changes)


__all__ = [
    "PRESETS",
    "AugmentParams",
    "imagenet",
    "jersey",
    "none",
    "resolve",
]
