"""Random erasing (torchvision's ``RandomErasing``), batched: rectangles set to a constant.

Unlike the other ops this one works on any value range: the pipeline runs it last, on the
normalised image, as torchvision's recipe does. Draws follow the conventions of
:mod:`~classifier_training.augment.ops`; a sample outside the apply mask or the ``gate`` keeps a
zero-height box and is returned bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from classifier_training.augment.ops import apply_mask, randint_below, uniform


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


__all__ = [
    "RandomErasing",
    "erase",
]
