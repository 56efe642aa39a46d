"""Geometric ops: crop, flip, affine and perspective as matrices, resampled once by :func:`warp`.

Geometry uses *centred pixel coordinates*: x right, y down, origin at the image centre, pixel
``j`` centred at ``j + 0.5 - W/2``, so the image spans ``[-W/2, W/2] x [-H/2, H/2]``. A geometric
stage (:class:`GeometricOp`) draws a float64 ``[B, 3, 3]`` *inverse* homography per sample,
mapping output coordinates to input coordinates (what ``grid_sample`` needs); :func:`warp`
composes the stages and resamples once, bilinear, fill 0. Unselected samples get the identity.
The shared conventions (generator, masks, draw order) are in
:mod:`~classifier_training.augment.ops`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from classifier_training.augment.ops import (
    apply_mask,
    constant,
    identity_matrices,
    randint_below,
    uniform,
)

HW = tuple[int, int]
"""(height, width) in pixels."""
_FAR_OUTSIDE = 4.0
"""A normalised grid coordinate beyond any image, so ``grid_sample`` returns the zero fill."""


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

    def matrix(self, batch: int, in_hw: HW, out_hw: HW, generator: torch.Generator) -> Tensor: ...


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

    def matrix(self, batch: int, in_hw: HW, out_hw: HW, generator: torch.Generator) -> Tensor:
        return crop_matrix(self.boxes(batch, in_hw, generator), in_hw, out_hw)


@dataclass(frozen=True)
class RandomHorizontalFlip:
    """Mirror left-right with probability ``p`` (folded into the shared resampling: free)."""

    p: float = 0.5
    fills: ClassVar[bool] = False

    def matrix(self, batch: int, in_hw: HW, out_hw: HW, generator: torch.Generator) -> Tensor:
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

    def matrix(self, batch: int, in_hw: HW, out_hw: HW, generator: torch.Generator) -> Tensor:
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

    def matrix(self, batch: int, in_hw: HW, out_hw: HW, generator: torch.Generator) -> Tensor:
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


__all__ = [
    "GeometricOp",
    "RandomAffine",
    "RandomHorizontalFlip",
    "RandomPerspective",
    "RandomResizedCrop",
    "affine_matrix",
    "crop_matrix",
    "hflip_matrix",
    "perspective_matrix",
    "warp",
]
