"""A PNG grid of originals and augmented variants, to eyeball what the augmentation does.

    python -m classifier_training.augment.preview --recipe recipes/basketball_r18.yaml \
        --out preview.png [--n 16] [--seed 0]

Row 0 holds the originals, rows 1..``rows`` one augmented draw each (de-normalised for display);
one column per image.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from classifier_training.augment.pipeline import BatchAugment
from classifier_training.augment.presets import resolve
from classifier_training.io import atomic_open

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_LABEL_WIDTH = 56
_GAP = 2


def _to_uint8_hwc(x: Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def save_preview(
    images_uint8: Tensor,
    augment: BatchAugment,
    path: str | Path,
    seed: int = 0,
    rows: int = 4,
) -> Path:
    """Write a PNG grid: originals on top, then ``rows`` augmented versions of every image.

    The augmented rows use one generator seeded with ``seed`` on the images' device, so the
    same call gives the same picture. Written to a temporary file then renamed (atomic).
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
    grid_rows = [images_uint8.float() / 255.0]
    with torch.no_grad():
        for _ in range(rows):
            grid_rows.append(augment(images_uint8, generator) * std + mean)

    batch, _, height, width = images_uint8.shape
    canvas = Image.new(
        "RGB",
        (_LABEL_WIDTH + batch * (width + _GAP), (rows + 1) * (height + _GAP)),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(grid_rows):
        top = r * (height + _GAP)
        draw.text((4, top + height // 2 - 6), "original" if r == 0 else f"aug {r}", fill=(0, 0, 0))
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
        with Image.open(p) as opened:
            image = opened.convert("RGB")
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
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")

    recipe = load_recipe(args.recipe)
    data = recipe.data
    images = load_images(
        Path(data.root) / data.train_split, args.n, data.image_size, data.train_fit == "letterbox"
    )
    augment = BatchAugment(resolve(recipe.augment), size=data.image_size)
    out = save_preview(images, augment, args.out, seed=args.seed, rows=args.rows)
    print(f"wrote {out} ({images.shape[0]} images, preset {recipe.augment.preset})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
