"""Batched augmentation: identities, probabilities, per-sample randomness, determinism, parity.

Parity with torchvision.transforms.v2.functional uses fixed parameters; where torchvision's
border handling differs (its fill=0 path multiplies the sampled image by a sampled mask, which
attenuates the band along the warped image edge twice), only pixels that torchvision's own mask
marks as fully inside are compared. Tolerances: 1e-4 for warps (float32 grid arithmetic on
coordinates up to ~50 px), 1e-5 for everything else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from classifier_training.augment import (
    AugmentParams,
    BatchAugment,
    degrade,
    erasing,
    geometry,
    imagenet,
    jersey,
    none,
    normalize_batch,
    ops,
    photometric,
    resolve,
)
from classifier_training.augment.pipeline import _same_device
from classifier_training.augment.preview import main as preview_main
from classifier_training.augment.preview import save_preview
from classifier_training.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from classifier_training.recipe import AugmentConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
WARP_TOL = 1e-4
TOL = 1e-5


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def smooth_images(batch: int = 6, hw: tuple[int, int] = (40, 36), seed: int = 0) -> torch.Tensor:
    """Float [B, 3, H, W] in [0.05, 0.95]: smooth structure plus fine texture (no symmetry)."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(batch, 3, 6, 5, generator=g), size=hw, mode="bicubic")
    fine = torch.rand(batch, 3, *hw, generator=g)
    return (0.7 * coarse + 0.3 * fine).clamp(0, 1) * 0.9 + 0.05


def uint8_images(batch: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return (smooth_images(batch, (size, size), seed) * 255).round().to(torch.uint8)


def per_sample_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten(1).amax(1)


# every pixel op at full strength; ``p`` is substituted by the tests
STRONG_PIXEL_OPS: dict[str, Any] = {
    "color": photometric.ColorJitter(0.4, 0.4, 0.4, 0.1),
    "blur": photometric.GaussianBlur(5, (1.0, 2.0)),
    "pixelate": degrade.Pixelate((0.1, 0.5)),
    "downup": degrade.BilinearDownUp((0.1, 0.45)),
    "noise": degrade.GaussianNoise((10.0, 40.0)),
    "zoom": degrade.ZoomInOut((0.5, 0.9), (1.2, 2.0)),
    "erase": erasing.RandomErasing(scale=(0.05, 0.2)),
}
STRONG_GEOMETRY_OPS: dict[str, Any] = {
    "crop": geometry.RandomResizedCrop((0.08, 0.9)),
    "flip": geometry.RandomHorizontalFlip(),
    "affine": geometry.RandomAffine(25.0, 0.1, (0.8, 1.2), 15.0),
    "perspective": geometry.RandomPerspective(0.5),
}


def run_geometry(op: Any, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    hw = (x.shape[2], x.shape[3])
    return geometry.warp(x, [op.matrix(x.shape[0], hw, hw, generator)], hw, [op.fills])


# ---------------------------------------------------------------------------------------------
# neutral parameters are the identity


NEUTRAL_PIXEL_OPS: dict[str, Any] = {
    "color": photometric.ColorJitter(0.0, 0.0, 0.0, 0.0),
    "blur_k1": photometric.GaussianBlur(1, (1.0, 2.0), p=1.0),
    "blur_tiny_sigma": photometric.GaussianBlur(7, (1e-3, 1e-3), p=1.0),
    "pixelate": degrade.Pixelate((1.0, 1.0), p=1.0),
    "downup": degrade.BilinearDownUp((1.0, 1.0), p=1.0),
    "noise": degrade.GaussianNoise((0.0, 0.0), p=1.0),
    "zoom": degrade.ZoomInOut((1.0, 1.0), (1.0, 1.0), p=1.0),
    "erase_tiny": erasing.RandomErasing(1.0, scale=(1e-6, 1e-6)),
}
NEUTRAL_GEOMETRY_OPS: dict[str, Any] = {
    "crop_full": geometry.RandomResizedCrop((1.0, 1.0), (36 / 40, 36 / 40)),
    "affine": geometry.RandomAffine(0.0, 0.0, (1.0, 1.0), 0.0),
    "perspective": geometry.RandomPerspective(0.0, p=1.0),
}


@pytest.mark.parametrize("name", list(NEUTRAL_PIXEL_OPS))
def test_neutral_pixel_op_is_identity(name: str) -> None:
    x = smooth_images()
    out = NEUTRAL_PIXEL_OPS[name](x, gen())
    assert torch.allclose(out, x, atol=TOL, rtol=0), (out - x).abs().max()


@pytest.mark.parametrize("name", list(NEUTRAL_GEOMETRY_OPS))
def test_neutral_geometry_op_is_identity(name: str) -> None:
    x = smooth_images()
    out = run_geometry(NEUTRAL_GEOMETRY_OPS[name], x, gen())
    assert torch.allclose(out, x, atol=TOL, rtol=0), (out - x).abs().max()


def test_warp_of_identity_chain_and_normalize_identity() -> None:
    x = smooth_images()
    eye = ops.identity_matrices(x.shape[0], x.device)
    assert torch.allclose(geometry.warp(x, [eye, eye, eye]), x, atol=TOL, rtol=0)
    zero, one = torch.zeros(3), torch.ones(3)
    assert torch.equal(ops.normalize(x, zero, one), x)


def test_none_preset_is_normalisation_only() -> None:
    images = uint8_images()
    augment = BatchAugment(none(), 32)
    assert not augment.geometry and not augment.photometric and not augment.degradations
    assert augment.erasing is None
    assert torch.allclose(augment(images, gen()), normalize_batch(images), atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# probabilities: p=0 leaves every sample alone, p=1 changes every sample


@pytest.mark.parametrize("name", list(STRONG_PIXEL_OPS))
def test_pixel_op_p0_is_exact_noop_and_p1_changes_every_sample(name: str) -> None:
    x = smooth_images(batch=12)
    op = STRONG_PIXEL_OPS[name]
    assert torch.equal(dataclasses.replace(op, p=0.0)(x, gen(1)), x)
    out = dataclasses.replace(op, p=1.0)(x, gen(1))
    assert (per_sample_diff(out, x) > 1e-3).all(), per_sample_diff(out, x)


@pytest.mark.parametrize("name", list(STRONG_GEOMETRY_OPS))
def test_geometry_op_p0_is_identity_and_p1_changes_every_sample(name: str) -> None:
    x = smooth_images(batch=12)
    op = STRONG_GEOMETRY_OPS[name]
    unchanged = run_geometry(dataclasses.replace(op, p=0.0), x, gen(1))
    assert torch.allclose(unchanged, x, atol=TOL, rtol=0)
    out = run_geometry(dataclasses.replace(op, p=1.0), x, gen(1))
    assert (per_sample_diff(out, x) > 1e-3).all(), per_sample_diff(out, x)


@pytest.mark.parametrize("name", list(STRONG_PIXEL_OPS))
def test_closed_gate_leaves_samples_bit_identical(name: str) -> None:
    x = smooth_images(batch=8)
    gate = torch.tensor([True, False] * 4)
    out = dataclasses.replace(STRONG_PIXEL_OPS[name], p=1.0)(x, gen(2), gate)
    assert torch.equal(out[~gate], x[~gate])
    assert (per_sample_diff(out[gate], x[gate]) > 1e-3).all()


def test_apply_rate_matches_probability_and_gate() -> None:
    n = 4000
    x = smooth_images(batch=n, hw=(8, 8))
    changed = per_sample_diff(degrade.Pixelate((0.2, 0.5), p=0.4)(x, gen(3)), x) > 0
    assert abs(changed.float().mean().item() - 0.4) < 0.04
    gate = ops.apply_mask(0.85, n, gen(4))
    changed = per_sample_diff(degrade.GaussianNoise((10.0, 40.0), p=0.6)(x, gen(5), gate), x) > 0
    assert abs(changed.float().mean().item() - 0.85 * 0.6) < 0.04
    assert not changed[~gate].any()


# ---------------------------------------------------------------------------------------------
# per-sample randomness and determinism


@pytest.mark.parametrize("name", list(STRONG_PIXEL_OPS) + list(STRONG_GEOMETRY_OPS))
def test_parameters_differ_within_a_batch(name: str) -> None:
    one = smooth_images(batch=1)
    x = one.expand(8, -1, -1, -1).contiguous()
    if name in STRONG_GEOMETRY_OPS:
        op = dataclasses.replace(STRONG_GEOMETRY_OPS[name], p=0.5 if name == "flip" else 1.0)
        # the flip has only two outcomes: draw more samples and require both
        x = one.expand(32, -1, -1, -1).contiguous() if name == "flip" else x
        out = run_geometry(op, x, gen(6))
    else:
        out = dataclasses.replace(STRONG_PIXEL_OPS[name], p=1.0)(x, gen(6))
    flat = out.flatten(1)
    distances = torch.cdist(flat, flat, p=float("inf"))
    if name == "flip":
        assert distances.max() > 1e-3 and (per_sample_diff(out, x) < TOL).any()
    elif name in ("pixelate", "downup"):  # integer sizes: some draws coincide
        assert len({tuple(row.tolist()) for row in (distances > 1e-4)}) >= 5
    else:
        off_diagonal = distances[~torch.eye(len(flat), dtype=torch.bool)]
        assert (off_diagonal > 1e-4).all(), off_diagonal.min()


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_batch_different_seed_different_batch(device: str) -> None:
    images = uint8_images(batch=16).to(device)
    augment = BatchAugment(jersey(), 32)
    first = augment(images, gen(123, device))
    again = augment(images, gen(123, device))
    other = augment(images, gen(124, device))
    assert torch.equal(first, again)
    assert (per_sample_diff(first, other) > 1e-3).all()
    # one generator used twice continues its stream
    g = gen(123, device)
    augment(images, g)
    assert not torch.equal(augment(images, g), first)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["jersey", "imagenet", "none"])
def test_output_dtype_shape_range_contiguity(device: str, preset: str) -> None:
    images = uint8_images(batch=10).to(device)
    params = {"jersey": jersey, "imagenet": imagenet, "none": none}[preset]()
    out = BatchAugment(params, 32)(images, gen(7, device))
    assert out.dtype == torch.float32 and out.shape == (10, 3, 32, 32)
    assert out.device == images.device and out.is_contiguous()
    assert torch.isfinite(out).all()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    assert (out >= (0 - mean) / std - 1e-5).all() and (out <= (1 - mean) / std + 1e-5).all()


def test_channels_last_input_gives_the_same_contiguous_output() -> None:
    images = uint8_images(batch=6)
    augment = BatchAugment(jersey(), 32)
    out = augment(images.contiguous(memory_format=torch.channels_last), gen(8))
    assert out.is_contiguous()
    assert torch.allclose(out, augment(images, gen(8)), atol=1e-5, rtol=0)


def test_autocast_region_does_not_change_the_result() -> None:
    images = uint8_images(batch=6)
    augment = BatchAugment(jersey(), 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = augment(images, gen(12))
    assert inside.dtype == torch.float32 and not inside.requires_grad
    assert torch.equal(inside, augment(images, gen(12)))


def test_input_validation() -> None:
    augment = BatchAugment(jersey(), 32)
    with pytest.raises(TypeError, match="uint8"):
        augment(uint8_images().float(), gen())
    with pytest.raises(ValueError, match=r"data\.image_size"):
        augment(uint8_images(size=40), gen())
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        augment(uint8_images()[:, :1], gen())
    assert not _same_device(torch.device("cpu"), torch.device("cuda", 0))
    assert _same_device(torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="size"):
        BatchAugment(jersey(), 0)


# ---------------------------------------------------------------------------------------------
# parity with torchvision on fixed parameters


AFFINE_CASES = [
    (17.0, [3, -2], 0.9, [10.0, 0.0]),
    (-30.0, [0, 5], 1.15, [-12.0, 0.0]),
    (5.0, [-4, 4], 0.85, [0.0, 7.0]),
]


@pytest.mark.parametrize(("angle", "translate", "scale", "shear"), AFFINE_CASES)
def test_affine_matches_torchvision(
    angle: float, translate: list[int], scale: float, shear: list[float]
) -> None:
    x = smooth_images(batch=1)
    m = geometry.affine_matrix(
        torch.tensor([angle]),
        torch.tensor([translate], dtype=torch.float64),
        torch.tensor([scale]),
        torch.tensor([shear]),
    )
    ours = geometry.warp(x, [m])[0]
    kw: dict[str, Any] = {"angle": angle, "translate": translate, "scale": scale, "shear": shear}
    theirs = TF.affine(x[0], **kw, interpolation=InterpolationMode.BILINEAR, fill=0)
    inside = TF.affine(torch.ones_like(x[0]), **kw, interpolation=InterpolationMode.BILINEAR) == 1
    assert inside.float().mean() > 0.5
    assert ((ours - theirs).abs() * inside).max() < WARP_TOL
    # torchvision's plain zero padding (fill=None) is our fill everywhere
    plain = TF.affine(x[0], **kw, interpolation=InterpolationMode.BILINEAR, fill=None)
    assert (ours - plain).abs().max() < WARP_TOL


def test_perspective_matches_torchvision() -> None:
    x = smooth_images(batch=1)
    h, w = x.shape[2:]
    start = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]
    end = [[3, 2], [w - 6, 1], [w - 3, h - 7], [4, h - 4]]
    m = geometry.perspective_matrix(
        torch.tensor([start], dtype=torch.float64), torch.tensor([end], dtype=torch.float64), (h, w)
    )
    ours = geometry.warp(x, [m])[0]
    theirs = TF.perspective(x[0], start, end, interpolation=InterpolationMode.BILINEAR, fill=None)
    assert (ours - theirs).abs().max() < WARP_TOL


def test_crop_matches_torchvision_resized_crop() -> None:
    x = smooth_images(batch=1)
    top, left, h, w = 5, 7, 20, 15
    m = geometry.crop_matrix(torch.tensor([[left, top, w, h]]), (40, 36), (40, 36))
    ours = geometry.warp(x, [m])[0]
    theirs = TF.resized_crop(x[0], top, left, h, w, [40, 36], InterpolationMode.BILINEAR)
    # torchvision clamps at the crop's edge, grid_sample reads the neighbours: skip a 2 px band
    assert (ours - theirs)[:, 2:-2, 2:-2].abs().max() < WARP_TOL


@pytest.mark.parametrize("sigma", [0.5, 1.3, 3.5])
def test_gaussian_blur_matches_torchvision(sigma: float) -> None:
    x = smooth_images(batch=2)
    ours = photometric.gaussian_blur(x, torch.tensor([sigma, sigma]), 7)
    theirs = TF.gaussian_blur(x, [7, 7], [sigma, sigma])
    assert (ours - theirs).abs().max() < TOL


def test_color_ops_match_torchvision_one_at_a_time() -> None:
    x = smooth_images(batch=1)
    mean = x.mean((2, 3))
    ones, zero = torch.ones(1), torch.zeros(1)
    order = torch.tensor([[0, 1, 2, 3]])
    cases = [
        ((torch.tensor([1.3]), ones, ones), TF.adjust_brightness(x[0], 1.3)),
        ((ones, torch.tensor([0.6]), ones), TF.adjust_contrast(x[0], 0.6)),
        ((ones, ones, torch.tensor([1.5])), TF.adjust_saturation(x[0], 1.5)),
    ]
    for (b, c, s), theirs in cases:
        a_mat, t_vec = photometric.color_affine(b, c, s, zero, order, mean)
        assert (photometric.apply_color(x, a_mat, t_vec)[0] - theirs).abs().max() < TOL


def test_hue_rotates_like_torchvision_and_keeps_luma() -> None:
    x = smooth_images(batch=1)
    mean = x.mean((2, 3))
    ones, order = torch.ones(1), torch.tensor([[3, 0, 1, 2]])
    theirs = TF.adjust_hue(x[0], 0.05)
    errors = []
    for shift in (0.05, -0.05):
        a_mat, t_vec = photometric.color_affine(
            ones, ones, ones, torch.tensor([shift]), order, mean
        )
        ours = photometric.apply_color(x, a_mat, t_vec)[0]
        errors.append((ours - theirs).abs().mean().item())
        luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        unclipped = ((ours > 1e-6) & (ours < 1 - 1e-6)).all(0)
        diff = ((ours - x[0]) * luma).sum(0)
        assert diff[unclipped].abs().max() < 1e-5
    assert errors[0] < 0.75 * errors[1]  # same direction as torchvision's HSV hue


def test_color_jitter_follows_the_drawn_order() -> None:
    # factors that never clip in between, where torchvision's chain is exactly linear
    x = smooth_images(batch=1)
    mean = x.mean((2, 3))
    b, c, s, h = torch.tensor([1.05]), torch.tensor([0.5]), torch.tensor([0.7]), torch.zeros(1)
    forward = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[0], 1.05), 0.5), 0.7)
    backward = TF.adjust_brightness(TF.adjust_contrast(TF.adjust_saturation(x[0], 0.7), 0.5), 1.05)
    for order, expected in (((0, 1, 2, 3), forward), ((2, 1, 0, 3), backward)):
        a_mat, t_vec = photometric.color_affine(b, c, s, h, torch.tensor([order]), mean)
        # 1e-4: torchvision rounds the contrast mean through its own grayscale pass
        assert (photometric.apply_color(x, a_mat, t_vec)[0] - expected).abs().max() < 1e-4


@pytest.mark.parametrize("small", [(4, 3), (9, 8), (18, 16), (33, 30)])
def test_pixelate_and_down_up_match_interpolate(small: tuple[int, int]) -> None:
    x = smooth_images(batch=1)
    sh, sw = torch.tensor([float(small[0])]), torch.tensor([float(small[1])])
    nearest = F.interpolate(
        F.interpolate(x, size=small, mode="nearest-exact"), size=(40, 36), mode="nearest-exact"
    )
    assert torch.equal(degrade.pixelate(x, sh, sw), nearest)
    bilinear = F.interpolate(
        F.interpolate(x, size=small, mode="bilinear", antialias=True),
        size=(40, 36),
        mode="bilinear",
    )
    assert (degrade.down_up(x, sh, sw) - bilinear).abs().max() < TOL


@pytest.mark.parametrize(
    ("factor", "offset"), [(0.6, (5, 3)), (1.0, (0, 0)), (1.5, (10, 4)), (2.0, (40, 36))]
)
def test_zoom_matches_pil_style_crop_and_canvas_resize(
    factor: float, offset: tuple[int, int]
) -> None:
    x = smooth_images(batch=1)
    height, width = 40, 36
    f = torch.tensor([factor], dtype=torch.float64)
    rows = degrade.zoom_matrix(height, f, torch.tensor([float(offset[0])]), 2.0)
    cols = degrade.zoom_matrix(width, f, torch.tensor([float(offset[1])]), 2.0)
    fill = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * (factor >= 1)
    ours = degrade.resample_separable(x - fill, rows, cols) + fill
    ch, cw = int(height * factor), int(width * factor)
    if factor < 1:
        source = x[:, :, offset[0] : offset[0] + ch, offset[1] : offset[1] + cw]
    else:
        source = fill.expand(1, 3, ch, cw).clone()
        source[:, :, offset[0] : offset[0] + height, offset[1] : offset[1] + width] = x
    # torch's antialiased bilinear resize is PIL's BILINEAR resize (the reference's ops)
    theirs = F.interpolate(source, size=(height, width), mode="bilinear", antialias=True)
    assert (ours - theirs).abs().max() < TOL


def test_erasing_writes_the_box_only() -> None:
    x = smooth_images(batch=2)
    boxes = torch.tensor([[3, 4, 10, 6], [0, 0, 0, 5]])
    out = erasing.erase(x, boxes, value=0.0)
    expected = x.clone()
    expected[0, :, 3:13, 4:10] = 0.0
    assert torch.equal(out, expected)


def test_random_boxes_follow_torchvision_rules() -> None:
    crop = geometry.RandomResizedCrop((0.08, 1.0), (3 / 4, 4 / 3))
    boxes = crop.boxes(2000, (40, 36), gen(9))
    left, top, w, h = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (w >= 1).all() and (h >= 1).all() and (left + w <= 36).all() and (top + h <= 40).all()
    area = w * h / (40 * 36)
    assert area.min() < 0.15 and area.max() > 0.9
    erase = erasing.RandomErasing(1.0, (0.02, 0.2), (0.3, 3.3))
    eb = erase.boxes(2000, (40, 36), gen(10))
    etop, eleft, eh, ew = eb.unbind(1)
    assert (eh > 0).all() and (etop + eh <= 40).all() and (eleft + ew <= 36).all()
    assert ((eh * ew) / (40 * 36)).max() < 0.25


# ---------------------------------------------------------------------------------------------
# presets and recipe overrides


def geometry_determinants(params: AugmentParams, n: int = 512) -> torch.Tensor:
    augment = BatchAugment(params, 32)
    g = gen(11)
    total = ops.identity_matrices(n, torch.device("cpu"))
    for op in augment.geometry:
        total = total @ op.matrix(n, (32, 32), (32, 32), g)
    determinants: torch.Tensor = torch.linalg.det(total)
    return determinants


def test_jersey_preset_never_flips() -> None:
    params = jersey()
    assert params.hflip_p == 0.0
    augment = BatchAugment(params, 32)
    assert not any(isinstance(op, geometry.RandomHorizontalFlip) for op in augment.geometry)
    # no mirror anywhere in the composed geometry (a flip makes the determinant negative)
    assert (geometry_determinants(params) > 0).all()
    flipped = resolve(AugmentConfig(preset="jersey", hflip_p=0.5))
    assert (geometry_determinants(flipped) < 0).any()


def test_presets_hold_the_reference_values() -> None:
    p = jersey()
    assert (p.crop_p, p.crop_scale, p.crop_ratio) == (1.0, (0.08, 1.0), (3 / 4, 4 / 3))
    assert (p.rotate_degrees, p.translate, p.affine_scale, p.shear_degrees) == (
        25.0,
        0.1,
        (0.85, 1.15),
        15.0,
    )
    assert (p.perspective_p, p.perspective_distortion) == (0.4, 0.3)
    assert (p.brightness, p.contrast, p.saturation, p.hue) == (0.2, 0.2, 0.2, 0.1)
    assert (p.blur_p, p.blur_kernel, p.blur_sigma) == (1.0, 7, (0.5, 3.5))
    assert p.degrade_p == 0.85 and p.jpeg_quality == (5, 55)
    assert p.jpeg_effective_p == pytest.approx(0.595)
    assert (p.pixelate_p, p.pixelate_scale, p.downup_p, p.downup_scale) == (
        0.4,
        (0.1, 0.5),
        0.5,
        (0.1, 0.45),
    )
    assert (p.noise_p, p.noise_sigma, p.zoom_p) == (0.6, (10.0, 40.0), 1.0)
    assert (p.zoom_in_scale, p.zoom_out_scale, p.zoom_out_fill) == (
        (0.5, 1.0),
        (1.1, 2.0),
        IMAGENET_MEAN,
    )
    assert (p.erase_p, p.erase_scale, p.erase_ratio, p.erase_value) == (
        0.3,
        (0.02, 0.2),
        (0.3, 3.3),
        0.0,
    )
    i = imagenet()
    assert (i.crop_p, i.hflip_p, i.brightness, i.hue, i.blur_p, i.degrade_p, i.erase_p) == (
        1.0,
        0.5,
        0.2,
        0.1,
        0.0,
        0.0,
        0.0,
    )
    assert i.rotate_degrees == 0.0 and i.perspective_p == 0.0 and i.jpeg_effective_p == 0.0
    assert none() == AugmentParams()


def test_resolve_overrides_every_field() -> None:
    assert resolve(AugmentConfig()) == jersey()
    assert resolve(AugmentConfig(preset="imagenet")) == imagenet()
    cfg = AugmentConfig(
        preset="none",
        hflip_p=0.25,
        rotate_degrees=10.0,
        translate=0.05,
        shear_degrees=5.0,
        perspective_p=0.2,
        color_jitter=0.3,
        degrade_p=0.5,
        jpeg_p=0.4,
        erase_p=0.1,
        crop_scale_min=0.4,
        blur_p=0.3,
    )
    p = resolve(cfg)
    assert p.crop_scale == (0.4, 1.0) and p.blur_p == 0.3
    assert (p.hflip_p, p.rotate_degrees, p.translate, p.shear_degrees) == (0.25, 10.0, 0.05, 5.0)
    assert (p.perspective_p, p.degrade_p, p.jpeg_p, p.erase_p) == (0.2, 0.5, 0.4, 0.1)
    assert (p.brightness, p.contrast, p.saturation, p.hue) == (0.3, 0.3, 0.3, 0.0)
    assert p.jpeg_effective_p == pytest.approx(0.2)
    # fields left None keep the preset's value
    untouched = {"hflip_p", "rotate_degrees", "translate", "shear_degrees", "perspective_p"}
    untouched |= {"degrade_p", "jpeg_p", "erase_p", "brightness", "contrast", "saturation"}
    untouched |= {"crop_scale", "blur_p"}
    for f in dataclasses.fields(AugmentParams):
        if f.name not in untouched:
            assert getattr(p, f.name) == getattr(none(), f.name), f.name
    assert resolve(AugmentConfig(preset="jersey", degrade_p=0.0)).jpeg_effective_p == 0.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"hflip_p": 1.5}, r"augment\.hflip_p"),
        ({"erase_p": -0.1}, r"augment\.erase_p"),
        ({"translate": 2.0}, r"augment\.translate"),
        ({"color_jitter": -1.0}, r"augment\.color_jitter"),
        ({"preset": "heavy"}, r"augment\.preset"),
    ],
)
def test_resolve_rejects_bad_values_naming_the_field(
    override: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        resolve(AugmentConfig(**override))


@pytest.mark.parametrize(
    "bad",
    [
        {"blur_kernel": 4},
        {"crop_scale": (0.9, 0.1)},
        {"jpeg_quality": (0, 50)},
        {"zoom_out_scale": (0.5, 2.0)},
        {"pixelate_p": 2.0},
        {"hue": 0.7},
    ],
)
def test_augment_params_validate(bad: dict[str, Any]) -> None:
    field = next(iter(bad))
    with pytest.raises(ValueError, match=rf"AugmentParams\.{field}"):
        AugmentParams(**bad)


def test_normalize_batch_matches_torchvision() -> None:
    images = uint8_images()
    ours = normalize_batch(images)
    theirs = TF.normalize(images.float() / 255, list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert (ours - theirs).abs().max() < TOL
    with pytest.raises(TypeError, match="uint8"):
        normalize_batch(images.float())


# ---------------------------------------------------------------------------------------------
# preview


def test_save_preview_writes_a_valid_png(tmp_path: Path) -> None:
    images = uint8_images(batch=5)
    path = save_preview(images, BatchAugment(jersey(), 32), tmp_path / "sub" / "p.png", rows=3)
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        # originals, the 10 ops of the jersey preset one by one, then 3 whole-pipeline draws
        assert image.height == (1 + 10 + 3) * (32 + 2) and image.width > 5 * 32
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.png"]  # no temp file left
    again = tmp_path / "again.png"
    save_preview(images, BatchAugment(jersey(), 32), again, rows=3)
    assert again.read_bytes() == path.read_bytes()  # same seed, same picture


def test_preview_cli_reads_the_recipe_dataset(tmp_path: Path) -> None:
    for label in ("3", "17"):
        folder = tmp_path / "data" / "train" / label
        folder.mkdir(parents=True)
        for k in range(3):
            array = uint8_images(batch=1, size=24, seed=k)[0].permute(1, 2, 0).numpy()
            Image.fromarray(array).resize((20, 28)).save(folder / f"{k}.png")
    recipe = tmp_path / "r.yaml"
    root = (tmp_path / "data").as_posix()
    recipe.write_text(f"data:\n  root: {root}\n  image_size: 32\naugment:\n  preset: jersey\n")
    out = tmp_path / "preview.png"
    argv = ["--recipe", str(recipe), "--out", str(out), "--n", "4"]
    assert preview_main([*argv, "--no-per-op"]) == 0
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.height == 5 * (32 + 2)
    assert preview_main(argv) == 0
    with Image.open(out) as image:
        assert image.height == (5 + 10) * (32 + 2)
    empty = tmp_path / "empty.yaml"
    empty.write_text(f"data:\n  root: {(tmp_path / 'nothing').as_posix()}\n")
    with pytest.raises(FileNotFoundError, match="no images"):
        preview_main(["--recipe", str(empty), "--out", str(out)])
