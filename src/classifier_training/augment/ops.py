"""Shared pieces of the batched augmentation ops: the conventions, random draws, masks, constants.

The ops themselves live by job: :mod:`~classifier_training.augment.geometry` (crop, flip, affine,
perspective: matrices resampled once), :mod:`~classifier_training.augment.photometric` (colour
jitter, Gaussian blur), :mod:`~classifier_training.augment.degrade` (the reference's PIL
degradations: pixelate, bilinear down-up, noise, zoom in/out) and
:mod:`~classifier_training.augment.erasing` (random erasing). Conventions shared by every op:

- Images are float32 ``[B, 3, H, W]`` in ``[0, 1]`` (random erasing works on any range).
- Every random number comes from the ``torch.Generator`` passed in (on the images' device). Each op
  draws its parameters for *every* sample, applied or not, in a fixed order, so one generator state
  gives one batch, bit for bit, whatever the probabilities turn out to be.
- An op changes sample ``b`` only where its apply mask ``rand < p`` (AND an optional ``gate``, the
  mask of an enclosing ``RandomApply`` block) is true. Pixel ops return the other samples
  bit-identical; a geometric stage gives them the identity matrix (so they are resampled at
  their own pixel centres: equal up to float rounding, ~1e-6).
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

from typing import Protocol

import torch
from torch import Tensor

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


# ---------------------------------------------------------------------------------------------
# Masks, identities and normalisation shared by the ops


def gated(mask: Tensor, gate: Tensor | None) -> Tensor:
    """The op's apply ``mask`` [B] AND the enclosing block's ``gate`` (None: no block)."""
    return mask if gate is None else mask & gate


def select(mask: Tensor, changed: Tensor, x: Tensor) -> Tensor:
    """``changed`` where the per-sample ``mask`` is set, ``x`` elsewhere."""
    return torch.where(mask.view(-1, 1, 1, 1), changed, x)


def identity_matrices(batch: int, device: torch.device) -> Tensor:
    """``[B, 3, 3]`` float64 identities."""
    return torch.eye(3, dtype=torch.float64, device=device).expand(batch, 3, 3).clone()


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(x - mean) / std`` with per-channel ``mean``/``std`` tensors of shape [3]."""
    return torch.addcmul((-mean / std).view(1, -1, 1, 1), x, (1.0 / std).view(1, -1, 1, 1))


class PixelOp(Protocol):
    """A per-pixel random op: ``op(x, generator, gate) -> x`` (see the module conventions)."""

    def __call__(
        self, x: Tensor, generator: torch.Generator, gate: Tensor | None = None
    ) -> Tensor: ...


__all__ = [
    "PixelOp",
    "apply_mask",
    "constant",
    "gated",
    "identity_matrices",
    "normalize",
    "randint_below",
    "select",
    "uniform",
]
