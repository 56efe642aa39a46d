"""A PNG grid of originals and augmented variants, to eyeball what the augmentation does.

    python -m classifier_training.augment.preview --recipe recipes/basketball_r18.yaml \
        --out preview.png [--n 16] [--seed 0]

Row 0 holds the originals; then one row per op of the augmentation, each applied alone and always
(p = 1) with its parameters at the configured size, labelled with them in pixels (what a 3.5 px
blur at 224 px becomes at 64 px, for instance); then ``rows`` rows of whole-pipeline draws
(de-normalised for display). One column per image.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from classifier_training.augment import degrade, erasing, geometry, ops, photometric
from classifier_training.augment.pipeline import BatchAugment
from classifier_training.augment.presets import resolve
from classifier_training.data.preprocess import open_rgb
from classifier_training.io import atomic_open

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_LABEL_WIDTH = 104
_GAP = 2


def _to_uint8_hwc(x: Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def op_label(op: object, size: int) -> str:
    """A short name of ``op`` with its strength in pixels at ``size`` (two lines at most)."""
    if isinstance(op, geometry.RandomResizedCrop):
        return f"crop\narea {op.scale[0]:.2g}-{op.scale[1]:.2g}"
    if isinstance(op, geometry.RandomHorizontalFlip):
        return "hflip"
    if isinstance(op, geometry.RandomAffine):
        return f"affine\n{op.degrees:g}deg sh{op.shear:g}"
    if isinstance(op, geometry.RandomPerspective):
        return f"perspective\n{op.distortion_scale:g}"
    if isinstance(op, photometric.ColorJitter):
        return f"jitter\n{op.brightness:g}/{op.contrast:g}/{op.saturation:g}/{op.hue:g}"
    if isinstance(op, photometric.GaussianBlur):
        return f"blur k{op.kernel_size}\nsigma {op.sigma[0]:.2g}-{op.sigma[1]:.2g}px"
    if isinstance(op, (degrade.Pixelate, degrade.BilinearDownUp)):
        low, high = (max(1, int(size * s)) for s in op.scale)
        name = "pixelate" if isinstance(op, degrade.Pixelate) else "down-up"
        return f"{name}\nto {low}-{high}px"
    if isinstance(op, degrade.GaussianNoise):
        return f"noise\nsigma {op.sigma[0]:.2g}-{op.sigma[1]:.2g}/255"
    if isinstance(op, degrade.ZoomInOut):
        return f"zoom\n{op.in_scale[0]:g}-{op.out_scale[1]:g}x"
    if isinstance(op, erasing.RandomErasing):
        return f"erase\narea {op.scale[0]:.2g}-{op.scale[1]:.2g}"
    return type(op).__name__


def op_rows(
    images_uint8: Tensor, augment: BatchAugment, generator: torch.Generator
) -> list[tuple[str, Tensor]]:
    """Each op of ``augment`` applied alone, always (p = 1), at ``augment.size``.

    Returns ``(label, images)`` pairs, images float [B, 3, H, W] in [0, 1], in pipeline order.
    The ops are the pipeline's own (parameters already rescaled to the size, see
    :meth:`~classifier_training.augment.presets.AugmentParams.at_size`); erasing runs on the
    normalised image as in training and is shown de-normalised.
    """
    x = images_uint8.to(torch.float32) / 255.0
    batch, size = x.shape[0], round((augment.size[0] * augment.size[1]) ** 0.5)
    in_hw = (int(x.shape[2]), int(x.shape[3]))
    out: list[tuple[str, Tensor]] = []
    for geo in augment.geometry:
        always = dataclasses.replace(geo, p=1.0)  # type: ignore[type-var]
        matrix = always.matrix(batch, in_hw, augment.size, generator)
        out.append((op_label(geo, size), geometry.warp(x, [matrix], augment.size, [geo.fills])))
    for pixel_op in [*augment.photometric, *augment.degradations]:
        always_op = dataclasses.replace(pixel_op, p=1.0)  # type: ignore[type-var]
        out.append((op_label(pixel_op, size), always_op(x, generator)))
    if augment.erasing is not None:
        mean = ops.constant(augment.mean, x.device).view(1, 3, 1, 1)
        std = ops.constant(augment.std, x.device).view(1, 3, 1, 1)
        erased = dataclasses.replace(augment.erasing, p=1.0)((x - mean) / std, generator)
        out.append((op_label(augment.erasing, size), erased * std + mean))
    return out


def save_preview(
    images_uint8: Tensor,
    augment: BatchAugment,
    path: str | Path,
    seed: int = 0,
    rows: int = 4,
    per_op: bool = True,
) -> Path:
    """Write a PNG grid: originals, each op alone (``per_op``), then ``rows`` augmented draws.

    The augmented rows use one generator seeded with ``seed`` on the images' device (the op
    rows another one, seeded ``seed + 1``), so the same call gives the same picture. Written to
    a temporary file then renamed (atomic).
    """
    if rows < 1:
        raise ValueError(f"save_preview: rows must be >= 1, got {rows}")
    if images_uint8.dim() != 4 or images_uint8.shape[0] == 0:
        raise ValueError(
            f"save_preview: need a non-empty [B, 3, H, W] batch, got {list(images_uint8.shape)}"
        )
    generator = torch.Generator(device=images_uint8.device).manual_seed(seed)
    mean = torch.tensor(augment.mean, device=images_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(augment.std, device=images_uint8.device).view(1, 3, 1, 1)
    grid_rows: list[tuple[str, Tensor]] = [("original", images_uint8.float() / 255.0)]
    with torch.no_grad():
        if per_op:
            op_generator = torch.Generator(device=images_uint8.device).manual_seed(seed + 1)
            with torch.autocast(images_uint8.device.type, enabled=False):
                grid_rows += op_rows(images_uint8, augment, op_generator)
        for r in range(rows):
            grid_rows.append((f"aug {r + 1}", augment(images_uint8, generator) * std + mean))

    batch, _, height, width = images_uint8.shape
    canvas = Image.new(
        "RGB",
        (_LABEL_WIDTH + batch * (width + _GAP), len(grid_rows) * (height + _GAP)),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(canvas)
    for r, (label, row) in enumerate(grid_rows):
        top = r * (height + _GAP)
        lines = label.split("\n") if height >= 24 else [label.replace("\n", " ")]
        text_top = top + height // 2 - 6 * len(lines)
        for i, line in enumerate(lines):
            draw.text((4, text_top + 12 * i), line, fill=(0, 0, 0))
        for c in range(batch):
            tile = Image.fromarray(_to_uint8_hwc(row[c]))
            canvas.paste(tile, (_LABEL_WIDTH + c * (width + _GAP), top))

    path = Path(path)
    with atomic_open(path) as handle:
        canvas.save(handle, format="PNG")
    return path


def load_images(folder: Path, n: int, size: int, letterbox: bool = True) -> Tensor:
    """Up to ``n`` images found recursively under ``folder``, evenly spread over the sorted list,
    resized to ``size`` x ``size`` (letterboxed on the ImageNet-mean colour, or stretched), as
    uint8 [n, 3, size, size]. A stand-in for the loader workers, good enough for a preview.
    """
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}; point data.root at a "
            "dataset or generate it first (data.generate_if_missing)"
        )
    step = max(1, len(paths) // n)
    tiles = []
    for p in paths[::step][:n]:
        image = open_rgb(p)  # the training decode: 16-bit and transparent images included
        if letterbox:
            scale = size / max(image.size)
            new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            resized = image.resize(new_size, Image.Resampling.BILINEAR)
            image = Image.new("RGB", (size, size), (124, 116, 104))
            image.paste(resized, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
        else:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        tiles.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(tiles)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: read a recipe, take up to --n train images, write the preview grid."""
    from classifier_training.recipe import load_recipe

    parser = argparse.ArgumentParser(
        prog="python -m classifier_training.augment.preview", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--recipe", required=True, help="recipe YAML")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--n", type=int, default=16, help="number of images (columns)")
    parser.add_argument("--rows", type=int, default=4, help="augmented rows")
    parser.add_argument("--seed", type=int, default=0, help="augmentation seed")
    parser.add_argument("--no-per-op", action="store_true", help="leave out the rows of single ops")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")

    recipe = load_recipe(args.recipe)
    data = recipe.data
    images = load_images(
        Path(data.root) / data.train_split, args.n, data.image_size, data.train_fit == "letterbox"
    )
    augment = BatchAugment(resolve(recipe.augment), size=data.image_size)
    out = save_preview(
        images, augment, args.out, seed=args.seed, rows=args.rows, per_op=not args.no_per_op
    )
    print(f"wrote {out} ({images.shape[0]} images, preset {recipe.augment.preset})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
