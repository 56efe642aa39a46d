"""Throughput of the batched jersey augmentation vs torchvision v2 applied per sample.

    python bench/bench_augment.py          # CUDA if available (256x3x224x224), else CPU (64)
    python bench/bench_augment.py --device cpu --batch 64 --size 96

Both sides get the same uint8 batch already on the device and return normalised float32. The
torchvision side runs the reference chain v2 supports (crop, affine, perspective, jitter, blur,
normalise, erasing) one image at a time, without the degradation block, so the ratio printed
understates the batched pipeline's advantage. Run by hand; not part of the tests.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torchvision.transforms import v2

from classifier_training.augment import BatchAugment, jersey
from classifier_training.data.preprocess import IMAGENET_MEAN, IMAGENET_STD


def reference_per_sample(size: int) -> v2.Compose:
    """The reference's train chain, minus its PIL-only degradations (REFERENCE.md 2.1)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomAffine(25, (0.1, 0.1), (0.85, 1.15), (-15, 15)),
            v2.RandomPerspective(0.3, p=0.4),
            v2.ColorJitter(0.2, 0.2, 0.2, 0.1),
            v2.GaussianBlur(7, (0.5, 3.5)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
            v2.RandomErasing(0.3, (0.02, 0.2)),
        ]
    )


def seconds_per_call(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=0, help="0: 256 on CUDA, 64 on CPU")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=0, help="0: 50 on CUDA, 5 on CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 64)
    reps = args.reps or (50 if cuda else 5)

    images = torch.randint(0, 256, (batch, 3, args.size, args.size), dtype=torch.uint8)
    images = images.to(device)
    augment = BatchAugment(jersey(), args.size)
    generator = torch.Generator(device=device).manual_seed(0)
    shape = f"{batch}x3x{args.size}x{args.size}"
    print(f"device {device}, batch {shape}, threads {torch.get_num_threads()}")

    batched = seconds_per_call(lambda: augment(images, generator), device, reps)
    print(f"BatchAugment(jersey):       {batch / batched:8.0f} img/s {batched * 1e3:9.1f} ms/batch")

    chain = reference_per_sample(args.size)
    per_sample = seconds_per_call(
        lambda: torch.stack([chain(image) for image in images]), device, max(1, reps // 10)
    )
    print(
        f"torchvision v2 per sample:  {batch / per_sample:8.0f} img/s "
        f"{per_sample * 1e3:9.1f} ms/batch"
    )
    print(f"speed-up batched / per-sample: {per_sample / batched:.1f}x")


if __name__ == "__main__":
    main()
