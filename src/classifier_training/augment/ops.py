"""Batched augmentation ops with per-sample random parameters, in plain torch (CPU or CUDA).

Conventions shared by every op:

- Images are float32 ``[B, 3, H, W]`` in ``[0, 1]`` (random erasing works on any range).
- Every random number comes from the ``torch.Generator`` passed in (on the images' device). Each op
  draws its parameters for *every* sample, applied or not, in a fixed order, so one generator state
  gives one batch, bit for bit, whatever the probabilities turn out to be.
- An op changes sample ``b`` only where its apply mask ``rand < p`` (AND an optional ``gate``, the
  mask of an enclosing ``RandomApply`` block) is true. Pixel ops return the other samples
  bit-identical; a geometric stage gives them the identity matrix (so they are resampled at
  their own pixel centres: equal up to float rounding, ~1e-6).
- Geometry uses *centred pixel coordinates*: x right, y down, origin at the image centre, pixel
  ``j`` centred at ``j + 0.5 - W/2``, so the image spans ``[-W/2, W/2] x [-H/2, H/2]``. A geometric
  stage is a float64 ``[B, 3, 3]`` *inverse* homography mapping output coordinates to input
  coordinates (what ``grid_sample`` needs); :func:`warp` composes stages and resamples once.
- Parameters are in units of the image the op receives: blur and noise sigma in its pixels (noise
  on the 0-255 scale), pixelate and down-up factors as fractions of its side. Presets state them
  at a reference size; :meth:`~classifier_training.augment.presets.AugmentParams.at_size`
  converts them before the ops are built, so the ops themselves know nothing of sizes.

The parameter distributions follow torchvision's ``transforms.v2`` (RandomResizedCrop,
RandomAffine, RandomPerspective, ColorJitter, GaussianBlur, RandomErasing) and the reference's PIL
degradations (pixelate, bilinear down-up, noise, zoom in/out); where a batched op differs from its
model, the class docstring says how.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
"""Luma weights of torchvision's ``rgb_to_grayscale`` (used by contrast and saturation)."""

_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.595716, -0.274453, -0.321263),
    (0.211456, -0.522591, 0.311135),
)

_YIQ_TO_RGB = tuple(
    tuple(float(v) for v in row)
    for row in torch.linalg.inv(torch.tensor(_RGB_TO_YIQ, dtype=torch.float64))
)

_FAR_OUTSIDE = 4.0
"""A normalised grid coordinate beyond any image, so ``grid_sample`` returns the zero fill."""


_CONSTANTS: dict[tuple[object, str, torch.dtype], Tensor] = {}


def constant(values: object, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """``torch.tensor(values)`` on ``device``, cached per device.

    A fresh ``torch.tensor(..., device="cuda")`` per batch is a blocking host-to-device copy
    that stalls the CPU until the GPU drains its queue; constants are copied once instead.
    ``values`` must be a (nested) tuple of numbers. Do not modify the result in place.
    """
    key = (values, str(device), dtype)
    cached = _CONSTANTS.get(key)
    if cached is None:
        cached = torch.tensor(values, dtype=dtype, device=device)
        _CONSTANTS[key] = cached
    return cached


# ---------------------------------------------------------------------------------------------
# Random draws (all from the caller's generator, on its device)


def uniform(
    low: float,
    high: float,
    size: int | tuple[int, ...],
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``size`` draws from U[low, high) on the generator's device."""
    shape = (size,) if isinstance(size, int) else size
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)
    return u * (high - low) + low


def apply_mask(p: float, batch: int, generator: torch.Generator) -> Tensor:
    """Per-sample Bernoulli(p) as bool ``[B]``; always draws, so the stream does not depend on p."""
    return torch.rand(batch, generator=generator, device=generator.device) < p


def randint_below(high: Tensor, generator: torch.Generator) -> Tensor:
    """Per-element integer in ``[0, high)`` (``high >= 1``, any shape); float64, integral values."""
    u = torch.rand(high.shape, generator=generator, device=generator.device, dtype=torch.float64)
    return torch.minimum(torch.floor(u * high), high - 1)


def _gated(mask: Tensor, gate: Tensor | None) -> Tensor:
    return mask if gate is None else mask & gate


def _select(mask: Tensor, changed: Tensor, x: Tensor) -> Tensor:
    """``changed`` where the per-sample ``mask`` is set, ``x`` elsewhere."""
    return torch.where(mask.view(-1, 1, 1, 1), changed, x)


# ---------------------------------------------------------------------------------------------
# Geometry: inverse matrices in centred pixel coordinates, composed into one grid_sample


def identity_matrices(batch: int, device: torch.device) -> Tensor:
    """``[B, 3, 3]`` float64 identities."""
    return torch.eye(3, dtype=torch.float64, device=device).expand(batch, 3, 3).clone()


def crop_matrix(boxes: Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """Inverse map of "crop ``boxes`` then resize to ``out_hw``".

    ``boxes`` is ``[B, 4]`` = (left, top, width, height) in input pixels (edges, top-left origin).
    Output point u (centred) maps to ``left + w/2 - W_in/2 + u * w / W_out`` (same for y).
    """
    boxes = boxes.to(torch.float64)
    left, top, w, h = boxes.unbind(1)
    m = identity_matrices(boxes.shape[0], boxes.device)
    m[:, 0, 0] = w / out_hw[1]
    m[:, 1, 1] = h / out_hw[0]
    m[:, 0, 2] = left + w / 2 - in_hw[1] / 2
    m[:, 1, 2] = top + h / 2 - in_hw[0] / 2
    return m


def hflip_matrix(flip: Tensor) -> Tensor:
    """Inverse (= forward) map of a horizontal flip where the bool ``[B]`` ``flip`` is set."""
    m = identity_matrices(flip.shape[0], flip.device)
    m[:, 0, 0] = torch.where(flip, -1.0, 1.0).to(torch.float64)
    return m


def affine_matrix(angle: Tensor, translate: Tensor, scale: Tensor, shear: Tensor) -> Tensor:
    """Inverse map of torchvision's ``affine`` about the image centre, batched.

    ``angle`` [B] degrees, ``translate`` [B, 2] pixels, ``scale`` [B], ``shear`` [B, 2] degrees
    (x, y). Forward: ``T * C * RSS * C^-1`` with ``RSS = R(a) S(s) SHy(sy) SHx(sx)``, exactly
    ``torchvision.transforms.functional._get_inverse_affine_matrix`` with centre 0.
    """
    rot = torch.deg2rad(angle.to(torch.float64))
    sx = torch.deg2rad(shear[:, 0].to(torch.float64))
    sy = torch.deg2rad(shear[:, 1].to(torch.float64))
    s = scale.to(torch.float64)
    tx = translate[:, 0].to(torch.float64)
    ty = translate[:, 1].to(torch.float64)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    # det(RSS without scale) == 1, so its inverse is [[d, -b], [-c, a]]
    m = identity_matrices(angle.shape[0], angle.device)
    m[:, 0, 0], m[:, 0, 1] = d / s, -b / s
    m[:, 1, 0], m[:, 1, 1] = -c / s, a / s
    m[:, 0, 2] = m[:, 0, 0] * -tx + m[:, 0, 1] * -ty
    m[:, 1, 2] = m[:, 1, 0] * -tx + m[:, 1, 1] * -ty
    return m


def perspective_matrix(startpoints: Tensor, endpoints: Tensor, hw: tuple[int, int]) -> Tensor:
    """Inverse homography that moves the 4 ``startpoints`` to ``endpoints`` ([B, 4, 2] each).

    Points are (x, y) in torchvision's convention for ``perspective`` (pixel units from the
    top-left corner); the result maps output to input in centred coordinates. Solved as the
    usual 8x8 linear system per sample, in float64 on normalised coordinates.
    """
    height, width = hw
    device = endpoints.device
    norm = constant((2.0 / width, 2.0 / height), device, torch.float64)
    offset = constant((width / 2, height / 2), device, torch.float64)
    src = (endpoints.to(torch.float64) - offset) * norm  # output side
    dst = (startpoints.to(torch.float64) - offset) * norm  # input side
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = torch.stack([rows_u, rows_v], 2).reshape(-1, 8, 8)
    rhs = torch.stack([u, v], 2).reshape(-1, 8)
    h = torch.linalg.solve_ex(a, rhs).result  # the _ex form does not sync to check errors
    hn = torch.cat([h, torch.ones_like(h[:, :1])], 1).view(-1, 3, 3)
    s = torch.diag(constant((2.0 / width, 2.0 / height, 1.0), device, torch.float64))
    s_inv = torch.diag(constant((width / 2, height / 2, 1.0), device, torch.float64))
    return s_inv @ hn @ s


def warp(
    x: Tensor,
    matrices: list[Tensor],
    out_hw: tuple[int, int] | None = None,
    fills: list[bool] | None = None,
) -> Tensor:
    """Resample ``x`` once through a chain of geometric stages, bilinear, fill 0.

    ``matrices[k]`` is the inverse map of stage k (stage 0 reads the input, the last writes the
    output). All stages but the first produce ``out_hw`` images. An output pixel becomes 0 where
    its pre-image leaves the input (``grid_sample`` zero padding) or, for stages with
    ``fills[k]``, leaves that stage's intermediate image: this keeps the fill of e.g. crop ->
    affine exactly as sequential ops would, while interpolating only once.
    """
    batch, _, in_h, in_w = x.shape
    out_h, out_w = out_hw if out_hw is not None else (in_h, in_w)
    fills = fills if fills is not None else [True] * len(matrices)
    if len(fills) != len(matrices) or not matrices:
        raise ValueError("warp: need one fills flag per matrix and at least one matrix")
    device = x.device
    # suffix products: checks[k] maps output coords to the input of stage k
    checks: list[Tensor] = []
    total = matrices[-1]
    for k in range(len(matrices) - 1, 0, -1):
        if fills[k]:
            checks.append(total)
        total = matrices[k - 1] @ total
    to_grid = torch.diag(constant((2.0 / in_w, 2.0 / in_h, 1.0), device, torch.float64))
    total = to_grid @ total

    # elementwise (not matmul: TF32 would cost ~0.1 px) evaluation on the output pixel centres
    u = (torch.arange(out_w, device=device, dtype=torch.float32) + 0.5 - out_w / 2).view(1, 1, -1)
    v = (torch.arange(out_h, device=device, dtype=torch.float32) + 0.5 - out_h / 2).view(1, -1, 1)

    def apply(m64: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = m64.to(torch.float32).view(batch, 3, 3, 1, 1)
        px = m[:, 0, 0] * u + m[:, 0, 1] * v + m[:, 0, 2]
        py = m[:, 1, 0] * u + m[:, 1, 1] * v + m[:, 1, 2]
        pw = m[:, 2, 0] * u + m[:, 2, 1] * v + m[:, 2, 2]
        return px, py, pw

    gx, gy, gw = apply(total)
    valid = gw > 1e-6
    gw = gw.clamp_min(1e-6)
    grid = torch.stack([gx / gw, gy / gw], -1)
    for m in checks:
        px, py, pw = apply(m)
        pw_safe = pw.clamp_min(1e-6)
        inside = (px.abs() <= out_w / 2 * pw_safe) & (py.abs() <= out_h / 2 * pw_safe)
        valid = valid & (pw > 1e-6) & inside
    grid = torch.where(valid.unsqueeze(-1), grid, _FAR_OUTSIDE)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class GeometricOp(Protocol):
    """A geometric stage: draws per-sample inverse matrices; :func:`warp` applies them."""

    fills: ClassVar[bool]

    def matrix(
        self,
        batch: int,
        in_hw: tuple[int, int],
        out_hw: tuple[int, int],
        generator: torch.Generator,
    ) -> Tensor: ...


@dataclass(frozen=True)
class RandomResizedCrop:
    """torchvision ``RandomResizedCrop`` box sampling (10 tries, then a centre crop), batched.

    Box sizes and offsets are the same integers torchvision draws; the crop is resized to the
    output by the shared bilinear ``grid_sample`` (no antialias: the loader already brought the
    image to the output size, so crops only ever upsample). Unselected samples see the whole image.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    p: float = 1.0
    fills: ClassVar[bool] = False

    def boxes(self, batch: int, in_hw: tuple[int, int], generator: torch.Generator) -> Tensor:
        """``[B, 4]`` float64 boxes (left, top, width, height) in input pixels."""
        height, width = in_hw
        tries = 10
        area = uniform(*self.scale, (batch, tries), generator, torch.float64) * height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(uniform(log_lo, log_hi, (batch, tries), generator, torch.float64))
        w = torch.round(torch.sqrt(area * aspect))
        h = torch.round(torch.sqrt(area / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.to(torch.float32).argmax(1, keepdim=True)  # the first try that fits
        found = ok.any(1)
        w = w.gather(1, first).squeeze(1)
        h = h.gather(1, first).squeeze(1)
        # torchvision's fallback: the largest centred crop with the ratio clamped into range
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fw, fh = float(width), float(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            fw, fh = float(round(height * max(self.ratio))), float(height)
        else:
            fw, fh = float(width), float(height)
        w = torch.where(found, w, fw)
        h = torch.where(found, h, fh)
        top = randint_below(height - h + 1, generator)
        left = randint_below(width - w + 1, generator)
        top = torch.where(found, top, torch.floor((height - h) / 2))
        left = torch.where(found, left, torch.floor((width - w) / 2))
        on = apply_mask(self.p, batch, generator)
        full = constant((0.0, 0.0, float(width), float(height)), w.device, torch.float64)
        box = torch.stack([left, top, w, h], 1)
        return torch.where(on.unsqueeze(1), box, full)

    def matrix(
        self,
        batch: int,
        in_hw: tuple[int, int],
        out_hw: tuple[int, int],
        generator: torch.Generator,
    ) -> Tensor:
        return crop_matrix(self.boxes(batch, in_hw, generator), in_hw, out_hw)


@dataclass(frozen=True)
class RandomHorizontalFlip:
    """Mirror left-right with probability ``p`` (folded into the shared resampling: free)."""

    p: float = 0.5
    fills: ClassVar[bool] = False

    def matrix(
        self,
        batch: int,
        in_hw: tuple[int, int],
        out_hw: tuple[int, int],
        generator: torch.Generator,
    ) -> Tensor:
        return hflip_matrix(apply_mask(self.p, batch, generator))


@dataclass(frozen=True)
class RandomAffine:
    """torchvision ``RandomAffine(degrees, (t, t), scale, shear=(-s, s))``, fill 0, batched.

    angle ~ U(-degrees, degrees); translation = round(U(-t*W, t*W)) pixels (same for y with H);
    scale ~ U(scale); x-shear ~ U(-shear, shear), no y-shear. Bilinear instead of the reference's
    nearest, because it shares one bilinear resampling with the crop and perspective.
    """

    degrees: float = 0.0
    translate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    shear: float = 0.0
    p: float = 1.0
    fills: ClassVar[bool] = True

    def matrix(
        self,
        batch: int,
        in_hw: tuple[int, int],
        out_hw: tuple[int, int],
        generator: torch.Generator,
    ) -> Tensor:
        height, width = in_hw
        f64 = torch.float64
        angle = uniform(-self.degrees, self.degrees, batch, generator, f64)
        tx = torch.round(
            uniform(-self.translate * width, self.translate * width, batch, generator, f64)
        )
        ty = torch.round(
            uniform(-self.translate * height, self.translate * height, batch, generator, f64)
        )
        scale = uniform(*self.scale, batch, generator, f64)
        shear_x = uniform(-self.shear, self.shear, batch, generator, f64)
        on = apply_mask(self.p, batch, generator)
        m = affine_matrix(
            angle,
            torch.stack([tx, ty], 1),
            scale,
            torch.stack([shear_x, torch.zeros_like(angle)], 1),
        )
        return torch.where(on.view(-1, 1, 1), m, identity_matrices(batch, m.device))


@dataclass(frozen=True)
class RandomPerspective:
    """torchvision ``RandomPerspective(distortion_scale, p)``, fill 0, batched.

    Each corner moves inward by an integer in ``[0, int(d * side/2)]`` per axis, as torchvision
    draws it; the homography is solved per sample.
    """

    distortion_scale: float = 0.5
    p: float = 0.5
    fills: ClassVar[bool] = True

    def matrix(
        self,
        batch: int,
        in_hw: tuple[int, int],
        out_hw: tuple[int, int],
        generator: torch.Generator,
    ) -> Tensor:
        height, width = in_hw
        device = generator.device
        bound_h = int(self.distortion_scale * (height // 2)) + 1
        bound_w = int(self.distortion_scale * (width // 2)) + 1
        bounds = constant((float(bound_w), float(bound_h)), device, torch.float64)
        inward = randint_below(bounds.expand(batch, 4, 2), generator)  # [B, corner, xy]
        right, bottom = float(width - 1), float(height - 1)
        corners = ((0.0, 0.0), (right, 0.0), (right, bottom), (0.0, bottom))
        start = constant(corners, device, torch.float64)
        # torchvision draws topright x in [W - bound, W): that is (W - 1) - inward, etc.
        sign = constant(((1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)), device, torch.float64)
        end = start + sign * inward
        on = apply_mask(self.p, batch, generator)
        end = torch.where(on.view(-1, 1, 1), end, start)
        return perspective_matrix(start.expand(batch, 4, 2), end, in_hw)


# ---------------------------------------------------------------------------------------------
# Colour


def color_affine(
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    hue: Tensor,
    order: Tensor,
    channel_mean: Tensor,
) -> tuple[Tensor, Tensor]:
    """Compose per-sample colour jitter into one affine colour map ``rgb -> A rgb + t``.

    Factors are [B] (brightness/contrast/saturation as torchvision's, 1 = unchanged; hue in
    turns, 0 = unchanged); ``order`` [B, 4] is a permutation of (0 brightness, 1 contrast,
    2 saturation, 3 hue); ``channel_mean`` [B, 3] is the per-channel mean of the input image.
    Brightness ``f x``; saturation ``s x + (1 - s) gray(x)``; contrast ``c x + (1 - c) mean(gray)``
    (the mean follows from ``channel_mean`` through the map so far); hue rotates the IQ plane
    of YIQ by ``2 pi hue``. Returns float64 ``A`` [B, 3, 3] and ``t`` [B, 3].
    """
    device = brightness.device
    batch = brightness.shape[0]
    f64 = torch.float64
    eye = torch.eye(3, dtype=f64, device=device)
    gray = constant(GRAY_WEIGHTS, device, f64)
    gray_rows = gray.expand(3, 3)  # each output channel gets the gray value
    yiq = constant(_RGB_TO_YIQ, device, f64)
    yiq_inv = constant(_YIQ_TO_RGB, device, f64)
    theta = -hue.to(f64) * 2 * math.pi  # sign: same direction as HSV hue (red -> yellow)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = identity_matrices(batch, device)
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    hue_m = yiq_inv @ rot @ yiq
    b = brightness.to(f64).view(-1, 1, 1)
    s = saturation.to(f64).view(-1, 1, 1)
    c = contrast.to(f64).view(-1, 1)
    sat_m = s * eye + (1 - s) * gray_rows
    mu = channel_mean.to(f64)

    a_mat = identity_matrices(batch, device)
    t_vec = torch.zeros(batch, 3, dtype=f64, device=device)
    for position in range(4):
        op = order[:, position].view(-1, 1, 1)
        # every candidate is a 3x3 op on [B, 3, 3]: cheap, and keeps per-sample order batched
        a_b, t_b = b * a_mat, b.view(-1, 1) * t_vec
        a_s, t_s = sat_m @ a_mat, (sat_m @ t_vec.unsqueeze(-1)).squeeze(-1)
        a_h, t_h = hue_m @ a_mat, (hue_m @ t_vec.unsqueeze(-1)).squeeze(-1)
        mean_gray = ((a_mat @ mu.unsqueeze(-1)).squeeze(-1) + t_vec) @ gray  # [B]
        a_c, t_c = c.view(-1, 1, 1) * a_mat, c * t_vec + (1 - c) * mean_gray.view(-1, 1)
        a_mat = torch.where(op == 0, a_b, torch.where(op == 1, a_c, torch.where(op == 2, a_s, a_h)))
        op2 = op.view(-1, 1)
        t_vec = torch.where(
            op2 == 0, t_b, torch.where(op2 == 1, t_c, torch.where(op2 == 2, t_s, t_h))
        )
    return a_mat, t_vec


def apply_color(x: Tensor, matrix: Tensor, offset: Tensor) -> Tensor:
    """``clamp(A x + t, 0, 1)`` per pixel with per-sample ``A`` [B, 3, 3] and ``t`` [B, 3].

    Written as three broadcast multiply-adds rather than a matmul, so it stays exact fp32
    (no TF32) and never materialises more than one output-sized tensor.
    """
    a = matrix.to(torch.float32).view(-1, 3, 3, 1, 1)
    t = offset.to(torch.float32).view(-1, 3, 1, 1)
    out = torch.addcmul(t, a[:, :, 0], x[:, 0:1])
    out.addcmul_(a[:, :, 1], x[:, 1:2])
    out.addcmul_(a[:, :, 2], x[:, 2:3])
    return out.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class ColorJitter:
    """torchvision ``ColorJitter`` with per-sample factors and per-sample random order, batched.

    Factors: brightness/contrast/saturation ~ U[max(0, 1 - v), 1 + v], hue ~ U[-h, h]. The four
    ops are linear in the pixel, so they compose into one affine colour map applied in a single
    pass (:func:`color_affine`). Differences from torchvision: no clamping *between* the four
    ops (only at the end), and hue rotates YIQ chroma instead of shifting HSV hue (the same
    direction and angle for moderate colours; HSV's is not linear). Without the intermediate
    clamps the four ops nearly commute, so the drawn order changes little; it is kept to stay
    close to torchvision where nothing clips.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    p: float = 1.0

    def __call__(self, x: Tensor, generator: torch.Generator, gate: Tensor | None = None) -> Tensor:
        batch = x.shape[0]
        bri = uniform(max(0.0, 1 - self.brightness), 1 + self.brightness, batch, generator)
        con = uniform(max(0.0, 1 - self.contrast), 1 + self.contrast, batch, generator)
        sat = uniform(max(0.0, 1 - self.saturation), 1 + self.saturation, batch, generator)
        hue = uniform(-self.hue, self.hue, batch, generator)
        order = torch.rand(batch, 4, generator=generator, device=generator.device).argsort(1)
        mask = _gated(apply_mask(self.p, batch, generator), gate)
        a_mat, t_vec = color_affine(bri, con, sat, hue, order, x.mean((2, 3)))
        out = apply_color(x, a_mat, t_vec)
        return out if self.p >= 1.0 and gate is None else _select(mask, out, x)


# ---------------------------------------------------------------------------------------------
# Blur


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """``[B, k]`` normalised 1-D Gaussians on integer offsets (torchvision's kernel), float32."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"gaussian blur: kernel_size must be odd and >= 1, got {kernel_size}")
    radius = kernel_size // 2
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=sigma.device)
    logits = -(t**2) / (2 * sigma.to(torch.float64).clamp_min(1e-12).view(-1, 1) ** 2)
    return torch.softmax(logits, 1).to(torch.float32)


def blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Separable blur with per-sample 1-D ``kernels`` [B, k], reflect padding (torchvision's).

    One grouped convolution per axis over ``[1, B*C, H, W]`` (one group per channel per sample).
    """
    batch, channels, height, width = x.shape
    k = kernels.shape[1]
    radius = k // 2
    if radius == 0:
        return x * kernels.view(-1, 1, 1, 1)
    if radius >= height or radius >= width:
        raise ValueError(
            f"gaussian blur: kernel size {k} needs images larger than {radius} px, "
            f"got {height}x{width}"
        )
    weight = kernels.to(x.dtype).repeat_interleave(channels, 0)  # [B*C, k]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    flat = padded.reshape(1, batch * channels, height + 2 * radius, width + 2 * radius)
    flat = F.conv2d(flat, weight.view(-1, 1, k, 1), groups=batch * channels)
    flat = F.conv2d(flat, weight.view(-1, 1, 1, k), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Gaussian blur with per-sample ``sigma`` [B] (same in x and y), like torchvision's."""
    return blur(x, gaussian_kernels(sigma, kernel_size))


@dataclass(frozen=True)
class GaussianBlur:
    """torchvision ``GaussianBlur(kernel_size, sigma)`` with per-sample sigma ~ U(sigma), prob p."""

    kernel_size: int = 7
    sigma: tuple[float, float] = (0.1, 2.0)
    p: float = 1.0

    def __call__(self, x: Tensor, generator: torch.Generator, gate: Tensor | None = None) -> Tensor:
        batch = x.shape[0]
        sigma = uniform(*self.sigma, batch, generator)
        mask = _gated(apply_mask(self.p, batch, generator), gate)
        out = gaussian_blur(x, sigma, self.kernel_size)
        return out if self.p >= 1.0 and gate is None else _select(mask, out, x)


# ---------------------------------------------------------------------------------------------
# Degradations (the reference's PIL ops, batched)


def _small_sizes(scale: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``max(1, int(side * s))`` per sample for (height, width), float64 integral values."""
    s = scale.to(torch.float64)
    return (
        torch.floor(hw[0] * s).clamp_min(1.0),
        torch.floor(hw[1] * s).clamp_min(1.0),
    )


def _nearest_round_trip_index(small: Tensor, size: int) -> Tensor:
    """[B, size] source index of "nearest down to ``small`` then nearest up to ``size``".

    Centre sampling both ways (PIL NEAREST / torch 'nearest-exact'), in exact integer arithmetic:
    up ``i = floor((2j + 1) * small / (2 size))``, down ``floor((2i + 1) * size / (2 small))``.
    """
    n = small.to(torch.int64).view(-1, 1)
    j = torch.arange(size, device=small.device, dtype=torch.int64).view(1, -1)
    i = torch.div((2 * j + 1) * n, 2 * size, rounding_mode="floor")
    return torch.div((2 * i + 1) * size, 2 * n, rounding_mode="floor").clamp_(0, size - 1)


def pixelate(x: Tensor, small_h: Tensor, small_w: Tensor) -> Tensor:
    """Nearest resize to per-sample ``(small_h, small_w)`` [B] and back (blocky pixels), exact.

    Done as two gathers with per-sample index maps; ``small == size`` is the identity.
    """
    batch, channels, height, width = x.shape
    ix = _nearest_round_trip_index(small_w, width)
    iy = _nearest_round_trip_index(small_h, height)
    out = x.gather(3, ix.view(batch, 1, 1, width).expand(batch, channels, height, width))
    return out.gather(2, iy.view(batch, 1, height, 1).expand(batch, channels, height, width))


def pil_bilinear_weights(
    n_out: int,
    box_start: Tensor,
    box_len: Tensor,
    domain: tuple[Tensor, Tensor],
    n_in: int,
    max_support: float,
    out_count: Tensor | None = None,
) -> Tensor:
    """1-D resampling matrix of PIL's BILINEAR resize (antialiased triangle filter), batched.

    Output pixel i of ``out_count`` (default ``n_out``; [B]) covers the source interval
    ``box_start + [i, i + 1] * scale`` with ``scale = box_len / out_count``; its weights are
    ``tri((j + 0.5 - centre) / support)``, ``support = max(1, scale)``, over the source pixels j
    inside ``domain = [lo, hi)`` (PIL's clamp), normalised over them. Only pixels ``0 <= j < n_in``
    get a column: domain pixels outside (zoom-out's canvas) count in the normalisation only.
    ``max_support`` must bound ``support`` (it sets the number of taps, kept static so nothing
    waits on the device). Returns float32 ``[B, n_out, n_in]``, rows >= ``out_count`` zero.
    """
    f64 = torch.float64
    device = box_start.device
    count = (
        out_count.to(f64)
        if out_count is not None
        else torch.full(box_start.shape, float(n_out), dtype=f64, device=device)
    )
    scale = (box_len.to(f64) / count).view(-1, 1, 1)
    support = scale.clamp_min(1.0)
    taps = 2 * math.ceil(max(max_support, 1.0)) + 1
    i = torch.arange(n_out, device=device, dtype=f64).view(1, -1, 1)
    centre = box_start.to(f64).view(-1, 1, 1) + (i + 0.5) * scale
    # first pixel whose centre lies within the support, then `taps` consecutive pixels
    j = torch.floor(centre - support - 0.5) + 1 + torch.arange(taps, device=device, dtype=f64)
    weight = (1 - ((j + 0.5 - centre) / support).abs()).clamp_min_(0.0)
    weight *= (j >= domain[0].view(-1, 1, 1)) & (j < domain[1].view(-1, 1, 1))
    weight /= weight.sum(-1, keepdim=True).clamp_min_(1e-12)
    weight *= (i < count.view(-1, 1, 1)) & (j >= 0) & (j < n_in)
    index = j.clamp(0, n_in - 1).to(torch.int64)
    out = torch.zeros(box_start.shape[0], n_out, n_in, dtype=torch.float32, device=device)
    # each column gets at most one non-zero weight per row (the taps are distinct pixels; the
    # clamped ones weigh 0), so the sum is exact and its order cannot change the result
    return out.scatter_add_(2, index, weight.to(torch.float32))


def resample_separable(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``rows @ x @ cols^T`` per sample and channel; rows [B, H_out, H], cols [B, W_out, W]."""
    batch, channels, height, width = x.shape
    x = torch.bmm(x.reshape(batch, channels * height, width), cols.transpose(1, 2))
    return torch.einsum("bij,bcjw->bciw", rows, x.view(batch, channels, height, -1))


def down_up_matrix(small: Tensor, size: int, min_small: int = 1) -> Tensor:
    """[B, size, size] matrix of PIL bilinear resize ``size -> small -> size`` (per sample).

    ``min_small`` (a lower bound of ``small``) only sets how many filter taps are computed.
    """
    zeros = torch.zeros_like(small, dtype=torch.float64)
    full = torch.full_like(zeros, float(size))
    small = small.to(torch.float64)
    max_support = size / max(1, min_small)
    down = pil_bilinear_weights(size, zeros, full, (zeros, full), size, max_support, small)
    up = pil_bilinear_weights(size, zeros, small, (zeros, small), size, 1.0)
    return torch.bmm(up, down)


def down_up(x: Tensor, small_h: Tensor, small_w: Tensor, min_small: int = 1) -> Tensor:
    """Bilinear (antialiased, PIL-style) resize to per-sample ``(small_h, small_w)`` and back."""
    _, _, height, width = x.shape
    rows = down_up_matrix(small_h, height, min_small)
    cols = down_up_matrix(small_w, width, min_small)
    return resample_separable(x, rows, cols)


@dataclass(frozen=True)
class Pixelate:
    """Reference ``RandomPixelate``: nearest down by s ~ U(scale), nearest back up, prob p."""

    scale: tuple[float, float] = (0.25, 0.75)
    p: float = 0.3

    def __call__(self, x: Tensor, generator: torch.Generator, gate: Tensor | None = None) -> Tensor:
        batch, _, height, width = x.shape
        s = uniform(*self.scale, batch, generator, torch.float64)
        mask = _gated(apply_mask(self.p, batch, generator), gate)
        small_h, small_w = _small_sizes(s, (height, width))
        # unselected samples get the identity index map (exact, no extra pass)
        small_h = torch.where(mask, small_h, float(height))
        small_w = torch.where(mask, small_w, float(width))
        return pixelate(x, small_h, small_w)


@dataclass(frozen=True)
class BilinearDownUp:
    """Reference ``RandomBilinearDownscale``: PIL bilinear down by s ~ U(scale) and back, prob p.

    Per-sample sizes rule out ``F.interpolate``; each axis is instead one [size, size] matrix
    per sample (PIL's antialiased triangle weights down, bilinear up) applied by batched matmul.
    """

    scale: tuple[float, float] = (0.3, 0.75)
    p: float = 0.3

    def __call__(self, x: Tensor, generator: torch.Generator, gate: Tensor | None = None) -> Tensor:
        batch, _, height, width = x.shape
        s = uniform(*self.scale, batch, generator, torch.float64)
        mask = _gated(apply_mask(self.p, batch, generator), gate)
        small_h, small_w = _small_sizes(s, (height, width))
        min_small = int(min(height, width) * self.scale[0])
        return _select(mask, down_up(x, small_h, small_w, min_small), x)


def add_gaussian_noise(x: Tensor, sigma: Tensor, generator: torch.Generator) -> Tensor:
    """``clamp(x + sigma * N(0, 1), 0, 1)`` with per-sample ``sigma`` [B] on the 0-1 scale."""
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return torch.addcmul(x, noise, sigma.to(x.dtype).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class GaussianNoise:
    """Reference ``RandomGaussianNoise``: sigma ~ U(sigma) on the 0-255 scale, prob p."""

    sigma: tuple[float, float] = (5.0, 25.0)
    p: float = 0.3

    def __call__(self, x: Tensor, generator: torch.Generator, gate: Tensor | None = None) -> Tensor:
        batch = x.shape[0]
        sigma = uniform(*self.sigma, batch, generator) / 255.0
        mask = _gated(apply_mask(self.p, batch, generator), gate)
        # sigma 0 leaves x (already in [0, 1]) bit-identical, so no select pass is needed
        return add_gaussian_noise(x, torch.where(mask, sigma, 0.0), generator)


def zoom_matrix(size: int, factor: Tensor, offset: Tensor, max_factor: float = 1.0) -> Tensor:
    """[B, size, size] PIL-bilinear matrix of one axis of zoom-in / zoom-out, per sample.

    ``c = max(1, int(size * factor))``. Zoom-in (``factor <= 1``): crop ``c`` pixels starting at
    ``offset`` (in ``[0, size - c]``) and resize them to ``size``. Zoom-out (``factor >= 1``):
    paste the image at ``offset`` (in ``[0, c - size]``) on a canvas of ``c`` pixels and resize
    the canvas to ``size``; canvas pixels outside the image must be 0 (callers subtract the fill
    first). At ``factor == 1`` both read the same (offset 0). ``max_factor`` must bound
    ``factor`` (it sets the number of filter taps).
    """
    f = factor.to(torch.float64)
    c = torch.floor(size * f).clamp_min(1.0)
    start = torch.where(f >= 1.0, -offset.to(torch.float64), offset.to(torch.float64))
    return pil_bilinear_weights(size, start, c, (start, start + c), size, max_factor)


@dataclass(frozen=True)
class ZoomInOut:
    """Reference ``RandomChoice([RandomZoomIn, RandomZoomOut])``: 50/50 per sample, prob p.

    Zoom-in crops ``int(side * s)``, s ~ U(in_scale), at a random offset and resizes back;
    zoom-out pastes the image at a random offset on a ``fill`` canvas ``int(side * s)``,
    s ~ U(out_scale), and resizes back. Both are PIL-bilinear resizes (antialiased when
    shrinking), done as per-sample resampling matrices: ``K_y (x - fill) K_x^T + fill``.
    """

    in_scale: tuple[float, float] = (0.7, 1.0)
    out_scale: tuple[float, float] = (1.0, 1.5)
    fill: tuple[float, float, float] = (0.485, 0.456, 0.406)
    p: float = 1.0

    def __call__(self, x: Tensor, generator: torch.Generator, gate: Tensor | None = None) -> Tensor:
        batch, _, height, width = x.shape
        f64 = torch.float64
        zoom_out = apply_mask(0.5, batch, generator)
        s = torch.where(
            zoom_out,
            uniform(*self.out_scale, batch, generator, f64),
            uniform(*self.in_scale, batch, generator, f64),
        )
        # offsets: zoom-in in [0, side - c], zoom-out in [0, c - side] (inclusive, like randint)
        ch = torch.floor(height * s).clamp_min(1.0)
        cw = torch.floor(width * s).clamp_min(1.0)
        off_y = randint_below((ch - height).abs() + 1, generator)
        off_x = randint_below((cw - width).abs() + 1, generator)
        mask = _gated(apply_mask(self.p, batch, generator), gate)
        rows = zoom_matrix(height, s, off_y, self.out_scale[1])
        cols = zoom_matrix(width, s, off_x, self.out_scale[1])
        fill = constant(tuple(self.fill), x.device, x.dtype).view(1, 3, 1, 1)
        fill = torch.where(zoom_out.view(-1, 1, 1, 1), fill, 0.0)
        out = resample_separable(x - fill, rows, cols) + fill
        return _select(mask, out, x)


# ---------------------------------------------------------------------------------------------
# Normalisation and erasing


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(x - mean) / std`` with per-channel ``mean``/``std`` tensors of shape [3]."""
    return torch.addcmul((-mean / std).view(1, -1, 1, 1), x, (1.0 / std).view(1, -1, 1, 1))


def erase(x: Tensor, boxes: Tensor, value: float = 0.0) -> Tensor:
    """Set per-sample rectangles ``boxes`` [B, 4] = (top, left, height, width) to ``value``."""
    _, _, height, width = x.shape
    b = boxes.to(torch.float32).view(-1, 4, 1, 1)
    ys = torch.arange(height, device=x.device, dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(width, device=x.device, dtype=torch.float32).view(1, 1, -1)
    inside = (ys >= b[:, 0]) & (ys < b[:, 0] + b[:, 2]) & (xs >= b[:, 1]) & (xs < b[:, 1] + b[:, 3])
    return x.masked_fill(inside.unsqueeze(1), value)


@dataclass(frozen=True)
class RandomErasing:
    """torchvision ``RandomErasing(p, scale, ratio, value)``: 10 tries for a box that fits, batched.

    A sample whose 10 tries all fail is left alone, as in torchvision.
    """

    p: float = 0.5
    scale: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)
    value: float = 0.0

    def boxes(self, batch: int, hw: tuple[int, int], generator: torch.Generator) -> Tensor:
        """[B, 4] float64 (top, left, height, width); height 0 where nothing is erased."""
        height, width = hw
        tries = 10
        f64 = torch.float64
        area = uniform(*self.scale, (batch, tries), generator, f64) * height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(uniform(log_lo, log_hi, (batch, tries), generator, f64))
        h = torch.round(torch.sqrt(area * aspect))
        w = torch.round(torch.sqrt(area / aspect))
        ok = (h < height) & (w < width)
        first = ok.to(torch.float32).argmax(1, keepdim=True)  # the first try that fits
        h = h.gather(1, first).squeeze(1)
        w = w.gather(1, first).squeeze(1)
        top = randint_below(height - h + 1, generator)
        left = randint_below(width - w + 1, generator)
        on = apply_mask(self.p, batch, generator) & ok.any(1)
        h = torch.where(on, h, 0.0)
        return torch.stack([top, left, h, w], 1)

    def __call__(self, x: Tensor, generator: torch.Generator, gate: Tensor | None = None) -> Tensor:
        boxes = self.boxes(x.shape[0], (x.shape[2], x.shape[3]), generator)
        if gate is not None:
            boxes[:, 2] = torch.where(gate, boxes[:, 2], 0.0)
        return erase(x, boxes, self.value)


class PixelOp(Protocol):
    """A per-pixel random op: ``op(x, generator, gate) -> x`` (see the module conventions)."""

    def __call__(
        self, x: Tensor, generator: torch.Generator, gate: Tensor | None = None
    ) -> Tensor: ...


__all__ = [
    "GRAY_WEIGHTS",
    "BilinearDownUp",
    "ColorJitter",
    "GaussianBlur",
    "GaussianNoise",
    "GeometricOp",
    "PixelOp",
    "Pixelate",
    "RandomAffine",
    "RandomErasing",
    "RandomHorizontalFlip",
    "RandomPerspective",
    "RandomResizedCrop",
    "ZoomInOut",
    "add_gaussian_noise",
    "affine_matrix",
    "apply_color",
    "apply_mask",
    "blur",
    "color_affine",
    "crop_matrix",
    "down_up",
    "down_up_matrix",
    "erase",
    "gaussian_blur",
    "gaussian_kernels",
    "hflip_matrix",
    "identity_matrices",
    "normalize",
    "perspective_matrix",
    "pil_bilinear_weights",
    "pixelate",
    "randint_below",
    "resample_separable",
    "uniform",
    "warp",
]
