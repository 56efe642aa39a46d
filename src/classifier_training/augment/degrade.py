"""The reference's PIL degradations, batched: pixelate, bilinear down-up, noise, zoom in/out.

Each op takes float32 ``[B, 3, H, W]`` in ``[0, 1]`` and follows the conventions of
:mod:`~classifier_training.augment.ops`. Per-sample sizes rule out ``F.interpolate``: a resize
here is exact index gathers (PIL NEAREST) or per-sample resampling matrices of PIL's antialiased
BILINEAR weights (:func:`pil_bilinear_weights`) applied by batched matmul. Zoom in/out lives here
rather than with the geometric ops: it is a PIL resize of the pixels (antialiased when
shrinking), not a stage of the shared ``grid_sample``. Pixelate and down-up factors are
fractions of the side of the image the op receives; noise sigma is on the 0-255 scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from classifier_training.augment.ops import (
    apply_mask,
    constant,
    gated,
    randint_below,
    select,
    uniform,
)


def _draw_small_sizes(
    scale: tuple[float, float],
    p: float,
    x: Tensor,
    generator: torch.Generator,
    gate: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The draws of a down-and-back-up op: s ~ U(scale), then the mask (prob ``p``, gated).

    Returns ``(mask, small_h, small_w)``: the bool [B] mask and ``max(1, int(side * s))`` per
    sample for the height and width of ``x`` (float64 integral values).
    """
    batch, _, height, width = x.shape
    s = uniform(*scale, batch, generator, torch.float64)
    mask = gated(apply_mask(p, batch, generator), gate)
    return mask, torch.floor(height * s).clamp_min(1.0), torch.floor(width * s).clamp_min(1.0)


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
        _, _, height, width = x.shape
        mask, small_h, small_w = _draw_small_sizes(self.scale, self.p, x, generator, gate)
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
        _, _, height, width = x.shape
        mask, small_h, small_w = _draw_small_sizes(self.scale, self.p, x, generator, gate)
        min_small = int(min(height, width) * self.scale[0])
        return select(mask, down_up(x, small_h, small_w, min_small), x)


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
        mask = gated(apply_mask(self.p, batch, generator), gate)
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
        mask = gated(apply_mask(self.p, batch, generator), gate)
        rows = zoom_matrix(height, s, off_y, self.out_scale[1])
        cols = zoom_matrix(width, s, off_x, self.out_scale[1])
        fill = constant(tuple(self.fill), x.device, x.dtype).view(1, 3, 1, 1)
        fill = torch.where(zoom_out.view(-1, 1, 1, 1), fill, 0.0)
        out = resample_separable(x - fill, rows, cols) + fill
        return select(mask, out, x)


__all__ = [
    "BilinearDownUp",
    "GaussianNoise",
    "Pixelate",
    "ZoomInOut",
    "add_gaussian_noise",
    "down_up",
    "down_up_matrix",
    "pil_bilinear_weights",
    "pixelate",
    "resample_separable",
    "zoom_matrix",
]
