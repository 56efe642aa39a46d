"""Loader throughput per CPU core, with and without the decoded-image cache.

    python bench/bench_loader.py [--size 224] [--images 600] [--batch 64] [--jpeg-p 0.595]

Renders a synthetic jersey set at ``--size`` px (JPEG crops of the real data's size: the
generator saves each crop once as JPEG at quality 35-95), then times, in this process on one
core (torch and Pillow single-threaded), a ``DataLoader(num_workers=0)`` producing whole batches
(collate included):

    decode   train item: decode + letterbox (the path without cache)
    decode   train item + JPEG re-encode with p = --jpeg-p (the jersey preset's 0.85 * 0.7)
    decode   eval item: decode + resize to size*256/224 + centre crop
    cache    train item: a gather from the memory-mapped array
    cache    train item + JPEG re-encode on the cached pixels, same p
    cache    eval item: a gather
    JPEG     one re-encode (p = 1) on cached pixels: its own cost, per image

and prints img/s per core for each, plus the cores a loader would need to feed 1,500 img/s
(a T4 training ResNet18 in fp16, an estimate) and 18,000 img/s (the H200 bare-step ceiling of
ResNet18 at 224 px, measured), assuming workers scale linearly with cores (each worker is an
independent process on its own core). Also prints the cache build time. Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from classifier_training.data.cache import open_caches
from classifier_training.data.dataset import ImageDataset
from classifier_training.data.index import index_dataset
from classifier_training.data.synthetic import generate
from classifier_training.recipe import SyntheticConfig

TARGETS = {"T4 (est.)": 1_500, "H200 ceiling": 18_000}


def rate(dataset: ImageDataset, batch: int, rounds: int, epoch: int = 0) -> float:
    """Images per second of a single-process loader over ``rounds`` passes of ``dataset``."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=0)
    for _ in loader:  # warm-up: page cache, Pillow's codecs
        break
    start = time.perf_counter()
    n = 0
    for r in range(rounds):
        dataset.set_epoch(epoch + r)  # a new JPEG draw each pass
        for b in loader:
            n += len(b["target"])
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=600, help="train images to render")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the set per timing")
    parser.add_argument("--jpeg-p", type=float, default=0.85 * 0.7)
    parser.add_argument("--quality", type=int, nargs=2, default=(10, 60))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        per_class = max(1, math.ceil(args.images / 42))
        cfg = SyntheticConfig(train_per_class=per_class, valid_per_class=1, test_per_class=1,
                              image_size=args.size)  # fmt: skip
        generate(data, cfg)
        index = index_dataset(data)
        samples = index.train.samples
        with Image.open(samples[0].path) as im:
            native = f"{im.size[0]}x{im.size[1]} {im.format}"
        mean_kb = sum(os.path.getsize(s.path) for s in samples) / len(samples) / 1024
        start = time.perf_counter()
        caches = open_caches(index, mode="disk", image_size=args.size, train_fit="letterbox",
                             cache_dir=str(Path(tmp) / "cache"))  # fmt: skip
        build = time.perf_counter() - start
        cache = caches.caches[index.train.name]
        q = tuple(args.quality)

        def ds(mode: str, p: float = 0.0, cached: bool = False) -> ImageDataset:
            return ImageDataset(samples, mode=mode, image_size=args.size, jpeg_p=p,  # type: ignore[arg-type]
                                jpeg_quality=q, cache=cache if cached and mode == "train"
                                else None)  # fmt: skip

        eval_cache = open_caches(index, mode="disk", image_size=args.size, train_fit="letterbox",
                                 cache_dir=str(Path(tmp) / "cache-eval"))  # fmt: skip
        eval_cached = ImageDataset(samples, mode="eval", image_size=args.size)
        # The train split's eval-kind cache (what val/test splits get), built for the bench.
        from classifier_training.data.cache import CacheKey, open_or_build

        eval_cached.cache, _ = open_or_build(samples, CacheKey("train", "eval", args.size),
                                             Path(tmp) / "cache-eval", 1)  # fmt: skip
        del eval_cache
        rows = [
            ("decode", "train item", rate(ds("train"), args.batch, args.rounds)),
            ("decode", f"train item + JPEG p={args.jpeg_p:.3f}",
             rate(ds("train", args.jpeg_p), args.batch, args.rounds)),
            ("decode", "eval item (resize + crop)", rate(ds("eval"), args.batch, args.rounds)),
            ("cache", "train item (gather)", rate(ds("train", cached=True), args.batch,
                                                  args.rounds)),
            ("cache", f"train item + JPEG p={args.jpeg_p:.3f}",
             rate(ds("train", args.jpeg_p, cached=True), args.batch, args.rounds)),
            ("cache", "eval item (gather)", rate(eval_cached, args.batch, args.rounds)),
        ]  # fmt: skip
        jpeg_all = rate(ds("train", 1.0, cached=True), args.batch, args.rounds)
        gather = rows[3][2]
    jpeg_ms = 1e3 * (1.0 / jpeg_all - 1.0 / gather)
    print(f"{len(samples)} train crops, {native}, {mean_kb:.1f} KiB each; loader at "
          f"{args.size} px, batch {args.batch}, 1 core")  # fmt: skip
    print(f"cache build: {build:.2f} s for {sum(len(s) for s in index.splits.values())} images "
          f"({os.cpu_count()} threads), {caches.describe()}")  # fmt: skip
    header = "  ".join(f"{name} {target:>6,} img/s" for name, target in TARGETS.items())
    print(f"{'path':<8}{'item':<36}{'img/s/core':>12}   cores to feed: {header}")
    for path, item, ips in rows:
        cores = "  ".join(f"{math.ceil(t / ips):>{len(n) + 13}}" for n, t in TARGETS.items())
        print(f"{path:<8}{item:<36}{ips:12,.0f}   {'':15}{cores}")
    print(f"JPEG re-encode on cached pixels: {jpeg_ms:.3f} ms per re-encoded image "
          f"(train item at p=1: {jpeg_all:,.0f} img/s/core); at p={args.jpeg_p:.3f} it costs "
          f"{args.jpeg_p * jpeg_ms:.3f} ms per item")  # fmt: skip
    print(
        f"cache/decode ratio, train item without JPEG: {rows[3][2] / rows[0][2]:.1f}x; "
        f"with JPEG: {rows[4][2] / rows[1][2]:.1f}x; eval: {rows[5][2] / rows[2][2]:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
