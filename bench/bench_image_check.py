"""Speed of the full-decode image check: sequential vs thread pool vs process pool, and cached.

    python bench/bench_image_check.py                      # 4000 jersey-like 96x96 JPEGs
    python bench/bench_image_check.py --images 20000 --side 224 --workers 16

Writes the images once into a temp folder (or uses ``--folder``), then decodes all of them with
:func:`classifier_training.data.validate.decode_facts` (the check's own per-file work) in one
process, on a thread pool and on a process pool of ``--workers``, and finally runs
:func:`check_images` twice against a fresh cache: the second run is what a repeated training
start pays. Prints images/s and the ratios measured in this run. Run by hand; not a test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from classifier_training.data.validate import check_images, decode_facts


def write_images(folder: Path, n: int, side: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            Image.fromarray(np.roll(base, i, axis=1)).save(path, quality=90)
        paths.append(path)
    return paths


def rate(n: int, fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--side", type=int, default=96)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--folder", type=Path, default=None, help="reuse images written here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "images"
        paths = write_images(folder, args.images, args.side)
        n, w = len(paths), args.workers
        rate(n, lambda: [p.read_bytes() for p in paths])  # warm the page cache for every run
        seq = rate(n, lambda: list(map(decode_facts, paths)))
        with ThreadPoolExecutor(w) as pool:
            threads = rate(n, lambda: list(pool.map(decode_facts, paths)))
        with ProcessPoolExecutor(w) as pool:
            list(pool.map(abs, range(w)))  # start the workers outside the timing
            procs = rate(n, lambda: list(pool.map(decode_facts, paths, chunksize=64)))
        cache = Path(tmp) / "cache.json"
        cold = rate(n, lambda: check_images(paths, cache=cache, workers=w))
        warm = rate(n, lambda: check_images(paths, cache=cache, workers=w))
    print(f"{n} images {args.side}x{args.side}, {w} workers, {os.cpu_count()} CPUs")
    print(f"sequential decode        {seq:10.0f} img/s")
    print(f"thread pool              {threads:10.0f} img/s  ({threads / seq:.2f}x sequential)")
    print(f"process pool             {procs:10.0f} img/s  ({procs / seq:.2f}x sequential)")
    print(f"check_images, cold cache {cold:10.0f} img/s")
    print(f"check_images, warm cache {warm:10.0f} img/s  ({warm / cold:.1f}x cold)")


if __name__ == "__main__":
    main()
