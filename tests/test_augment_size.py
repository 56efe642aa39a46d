"""Size-aware augmentation strengths: the same preset means the same thing at 32, 64 and 224 px.

The contract (``AugmentParams.at_size``): an op at size S does what the op at the reference size
R does to the same content seen at S, i.e. "resize to R, apply, resize back". The tests check
the formulas and then the contract itself numerically, on images made at R and area-averaged
down to S (R = 256 and S = 64, so averaging is an exact 4x4 pooling).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from classifier_training.augment import (
    AugmentParams,
    BatchAugment,
    degrade,
    imagenet,
    jersey,
    photometric,
    resolve,
)
from classifier_training.augment.preview import op_rows
from classifier_training.recipe import AugmentConfig

PIXEL_FIELDS = {"blur_sigma", "blur_kernel", "noise_sigma", "pixelate_scale", "downup_scale"}


def test_at_size_rescales_the_pixel_strengths_of_the_jersey_preset() -> None:
    p = jersey()
    assert p.reference_size == 224 and p.at_size(224) == p
    k = 64 / 224
    q = p.at_size(64)
    assert q.blur_kernel == 3 and q.blur_sigma == pytest.approx((0.5 * k, 3.5 * k))
    assert q.noise_sigma == pytest.approx((10 * k, 40 * k))
    # pixelate/down-up keep n = f * 224 px of detail: 22 px, and 112 / 100 px -> nothing at 64
    assert q.pixelate_scale == pytest.approx((0.1 / k, 1.0))
    assert q.downup_scale == pytest.approx((0.1 / k, 1.0))
    assert q.reference_size == 64 and q.at_size(64) == q  # idempotent
    for f in dataclasses.fields(AugmentParams):
        if f.name not in PIXEL_FIELDS | {"reference_size"}:
            assert getattr(q, f.name) == getattr(p, f.name), f.name
    tiny = p.at_size(32)
    assert tiny.blur_kernel == 3 and tiny.pixelate_scale == pytest.approx((0.7, 1.0))
    large = p.at_size(448)
    assert large.blur_kernel == 13 and large.blur_sigma == pytest.approx((1.0, 7.0))
    assert large.pixelate_scale == pytest.approx((0.05, 0.25))
    assert large.noise_sigma == pytest.approx((20.0, 80.0))
    literal = dataclasses.replace(p, reference_size=0)
    assert literal.at_size(64) == literal
    assert p.at_size(4000).noise_sigma[1] == 255.0  # capped on the 0-255 scale
    with pytest.raises(ValueError, match="size must be >= 1"):
        p.at_size(0)
    with pytest.raises(ValueError, match=r"AugmentParams\.reference_size"):
        AugmentParams(reference_size=-1)


def test_the_pipeline_builds_its_ops_from_the_rescaled_parameters() -> None:
    augment = BatchAugment(jersey(), 64)
    assert augment.params == jersey() and augment.effective == jersey().at_size(64)
    blur = next(op for op in augment.photometric if isinstance(op, photometric.GaussianBlur))
    assert blur.kernel_size == 3 and blur.sigma == augment.effective.blur_sigma
    noise = next(op for op in augment.degradations if isinstance(op, degrade.GaussianNoise))
    assert noise.sigma == augment.effective.noise_sigma
    # a rectangle uses the geometric mean of its sides
    assert BatchAugment(jersey(), (32, 128)).effective == jersey().at_size(64)
    # presets without pixel strengths are the same at every size
    assert BatchAugment(imagenet(), 32).effective.hflip_p == imagenet().hflip_p


def area_down(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool2d(x, factor)


def checkerboard(size: int, period: int) -> torch.Tensor:
    """[1, 3, size, size] smooth-edged stripes in two directions, period in pixels."""
    t = (torch.arange(size, dtype=torch.float32) + 0.5) * (2 * math.pi / period)
    pattern = 0.5 + 0.2 * torch.sin(t).view(-1, 1) + 0.2 * torch.cos(0.7 * t).view(1, -1)
    return pattern.expand(1, 3, size, size).contiguous()


def test_blur_at_64_px_matches_blur_at_256_px_seen_at_64_px() -> None:
    # a kernel of +-3 sigma, so both sizes sample the same Gaussian (the jersey preset's k7 at
    # sigma <= 3.5 is a truncated, nearly box-shaped blur: same law, coarser match at k3)
    ref = AugmentParams(reference_size=256, blur_kernel=25, blur_sigma=(4.0, 4.0))
    small = ref.at_size(64)
    assert small.blur_kernel == 7 and small.blur_sigma == (1.0, 1.0)
    image = checkerboard(256, period=48)
    at_ref = area_down(photometric.gaussian_blur(image, torch.tensor([4.0]), ref.blur_kernel), 4)
    down = area_down(image, 4)
    at_small = photometric.gaussian_blur(down, torch.tensor([1.0]), small.blur_kernel)
    inner = (..., slice(6, -6), slice(6, -6))  # reflect padding differs within a kernel of edges
    effect = (at_ref - down)[inner].abs().mean()
    assert effect > 1e-3  # the blur does something
    assert (at_small - at_ref)[inner].abs().mean() < 0.05 * effect
    # the unscaled sigma (4 px at 64 px) would blur far more
    too_much = photometric.gaussian_blur(down, torch.tensor([4.0]), 25)
    assert (too_much - at_ref)[inner].abs().mean() > 3 * effect


def test_noise_at_64_px_has_the_strength_of_noise_at_256_px_seen_at_64_px() -> None:
    ref = AugmentParams(reference_size=256, noise_sigma=(40.0, 40.0))
    small = ref.at_size(64)
    assert small.noise_sigma == (10.0, 10.0)
    flat = torch.full((4, 3, 256, 256), 0.5)
    g = torch.Generator().manual_seed(0)
    noisy = degrade.add_gaussian_noise(flat, torch.full((4,), 40.0 / 255), g)
    seen_small = area_down(noisy, 4)
    assert seen_small.std().item() == pytest.approx(small.noise_sigma[0] / 255, rel=0.03)


def test_pixelate_keeps_the_same_detail_at_every_size() -> None:
    ref = AugmentParams(reference_size=256, pixelate_scale=(0.125, 0.125))
    small = ref.at_size(64)
    assert small.pixelate_scale == (0.5, 0.5)  # 32 px of detail at both sizes
    image = checkerboard(256, period=40)
    n_ref = torch.tensor([32.0])
    at_ref = area_down(degrade.pixelate(image, n_ref, n_ref), 4)
    down = area_down(image, 4)
    n_small = torch.tensor([64 * small.pixelate_scale[0]])
    at_small = degrade.pixelate(down, n_small, n_small)
    literal = degrade.pixelate(down, torch.tensor([8.0]), torch.tensor([8.0]))  # 0.125 of 64 px

    def blocks_per_row(x: torch.Tensor) -> int:
        return int((x[0, 0, 10].diff().abs() > 1e-6).sum()) + 1

    # the same 32 blocks a side (the nearest samples differ by a sub-block phase, not in size)
    assert blocks_per_row(at_ref) == blocks_per_row(at_small) == 32
    assert blocks_per_row(literal) == 8
    effect = (at_ref - down).abs().mean()
    assert (at_small - at_ref).abs().mean() < effect < 0.3 * (literal - at_ref).abs().mean()
    # detail the small image never had is not taken away: 128 px at 256 is nothing at 64
    coarse = AugmentParams(reference_size=256, pixelate_scale=(0.5, 0.5)).at_size(64)
    assert coarse.pixelate_scale == (1.0, 1.0)
    kept = BatchAugment(dataclasses.replace(coarse, degrade_p=1.0, pixelate_p=1.0), 64)
    pixelate_op = next(op for op in kept.degradations if isinstance(op, degrade.Pixelate))
    x = down.expand(2, 3, 64, 64).contiguous()
    assert torch.equal(pixelate_op(x, torch.Generator().manual_seed(0)), x)


def test_orientation_sensitive_sets_flips_unless_hflip_p_is_given() -> None:
    assert resolve(AugmentConfig(preset="imagenet", orientation_sensitive=True)).hflip_p == 0.0
    assert resolve(AugmentConfig(preset="jersey", orientation_sensitive=False)).hflip_p == 0.5
    assert resolve(AugmentConfig(preset="imagenet")).hflip_p == 0.5
    explicit = AugmentConfig(preset="imagenet", orientation_sensitive=False, hflip_p=0.2)
    assert resolve(explicit).hflip_p == 0.2
    with pytest.raises(ValueError, match=r"augment\.hflip_p.*augment\.orientation_sensitive"):
        resolve(AugmentConfig(preset="imagenet", orientation_sensitive=True, hflip_p=0.5))


def test_preview_op_rows_show_each_op_at_the_configured_size() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 64, 64), generator=g, dtype=torch.uint8)
    rows = op_rows(images, BatchAugment(jersey(), 64), g)
    labels = [label.replace("\n", " ") for label, _ in rows]
    assert labels == [
        "crop area 0.08-1",
        "affine 25deg sh15",
        "perspective 0.3",
        "jitter 0.2/0.2/0.2/0.1",
        "blur k3 sigma 0.14-1px",
        "pixelate to 22-64px",
        "down-up to 22-64px",
        "noise sigma 2.9-11/255",
        "zoom 0.5-2x",
        "erase area 0.02-0.2",
    ]
    original = images.float() / 255
    for label, row in rows:
        assert row.shape == original.shape, label
        assert row.min() >= -1e-6 and row.max() <= 1 + 1e-6, label
    # every op is applied (p = 1): each row differs from the originals (a blur drawn near
    # sigma 0.14 or a pixelate/down-up drawn near 64 px changes one image very little)
    for label, row in rows:
        assert (row - original).abs().amax() > 1e-2, label
    for label, row in rows[:2]:  # crop and affine move every image
        assert (row - original).abs().amax((1, 2, 3)).gt(1e-2).all(), label
    large = (checkerboard(224, period=40) * 255).round().to(torch.uint8)
    at_224 = [label for label, _ in op_rows(large, BatchAugment(jersey(), 224), g)]
    assert "blur k7\nsigma 0.5-3.5px" in at_224 and "pixelate\nto 22-112px" in at_224
