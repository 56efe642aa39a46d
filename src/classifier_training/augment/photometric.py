"""Photometric ops: torchvision's colour jitter (one affine colour map) and Gaussian blur, batched.

Both take float32 ``[B, 3, H, W]`` in ``[0, 1]`` and follow the conventions of
:mod:`~classifier_training.augment.ops` (every draw from the caller's generator, for every
sample, in a fixed order; unselected samples returned bit-identical). Blur sigma is in pixels of
the image the op receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from classifier_training.augment.ops import (
    apply_mask,
    constant,
    gated,
    identity_matrices,
    select,
    uniform,
)

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
        mask = gated(apply_mask(self.p, batch, generator), gate)
        a_mat, t_vec = color_affine(bri, con, sat, hue, order, x.mean((2, 3)))
        out = apply_color(x, a_mat, t_vec)
        return out if self.p >= 1.0 and gate is None else select(mask, out, x)


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
        mask = gated(apply_mask(self.p, batch, generator), gate)
        out = gaussian_blur(x, sigma, self.kernel_size)
        return out if self.p >= 1.0 and gate is None else select(mask, out, x)


__all__ = [
    "GRAY_WEIGHTS",
    "ColorJitter",
    "GaussianBlur",
    "apply_color",
    "blur",
    "color_affine",
    "gaussian_blur",
    "gaussian_kernels",
]
