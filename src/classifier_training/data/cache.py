"""Decoded-image cache: every image of a split decoded and resized once, then only gathered.

Without it the loader decodes every JPEG in every epoch (measured per core at 224 px: ~4,300
img/s decode only, ~1,400 img/s for evaluation items); with it an item is a copy out of one
uint8 array (``bench/bench_loader.py``). ``data.cache``:

* ``none``: decode every epoch (as before);
* ``ram``: the arrays live in shared memory (``/dev/shm``), removed when the run ends;
* ``disk``: the arrays live in ``data.cache_dir`` (default ``$CLASSIFIER_TRAINING_CACHE`` or
  ``~/.cache/classifier-training``, then ``decoded/``) and are kept, so the next run with the same
  data and size starts at once (the OS page cache keeps what fits in memory);
* ``auto``: ``ram`` when all splits fit in half the available memory (the cgroup limit counts in
  a container) and in ``/dev/shm``, else ``disk`` when the disk has room, else ``none``.

What is stored, per split, as one ``.npy`` array ``uint8 [N, 3, S, S]`` (the model's channel
order, so a batch is one fancy-index gather; memory-mapped read-only by every loader worker and
every process of the machine, so the page cache holds one copy):

* train splits: :func:`~classifier_training.data.preprocess.train_image` of the decoded image
  (letterbox/stretch to ``S``), i.e. the item *before* the random JPEG re-encode;
* eval splits: :func:`~classifier_training.data.preprocess.eval_image` (resize + centre crop),
  exactly the item.

Never stale: the file name carries a fingerprint (SHA-256) of the preprocessing (cache format,
split kind, ``S``, fit, Pillow version) and of every sample (resolved path, byte size,
modification time in ns), so a changed dataset, image size or fit builds a new file. Building
is parallel (threads: Pillow releases the GIL while decoding and resizing), atomic (temp files
renamed into place, the metadata last) and done once per machine: the engine opens the caches
under ``accelerator.local_main_process_first()``, the other processes then find them complete.

The JPEG re-encode keeps its semantics on cached pixels (:func:`jpeg_on_cached`): the letterbox
content is brought back to the image's native size (stored per sample), re-encoded at the drawn
quality, and fitted to ``S`` again. When the native image already fits ``S`` (its longer side is
``S`` for letterbox, or it is ``S x S`` for stretch) this is bit-identical to the uncached path;
otherwise the content passes one extra bilinear resize before the JPEG.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import PIL
from PIL import Image

from classifier_training.data.index import DataError, DatasetIndex, Sample
from classifier_training.data.preprocess import (
    PAD_RGB,
    TrainFit,
    eval_image,
    jpeg_degrade,
    open_rgb,
    resize_size,
    train_image,
)

log = logging.getLogger(__name__)

CacheMode = Literal["none", "ram", "disk", "auto"]
CACHE_VERSION = 1
"""Bump when what is stored changes (the preprocessing functions' output): old files no longer
match any fingerprint."""
CACHE_ENV = "CLASSIFIER_TRAINING_CACHE"
RAM_DIR = Path("/dev/shm")
RAM_SHARE = 0.5
"""``auto`` picks RAM when the caches need at most this share of the available memory."""


@dataclass(frozen=True)
class CacheKey:
    """What one split's cache holds: the kind of item and its preprocessing."""

    split: str
    kind: Literal["train", "eval"]
    image_size: int
    train_fit: TrainFit = "letterbox"

    def preprocessing(self) -> dict[str, Any]:
        """The settings that decide the stored pixels (part of the fingerprint and metadata)."""
        out: dict[str, Any] = {"kind": self.kind, "image_size": self.image_size}
        if self.kind == "train":
            out.update(train_fit=self.train_fit, pad_rgb=list(PAD_RGB))
        else:
            out.update(resize=resize_size(self.image_size), crop=self.image_size)
        return out


def default_cache_dir() -> Path:
    """``$CLASSIFIER_TRAINING_CACHE``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, then
    ``classifier-training``; the decoded arrays go to its ``decoded/`` folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "classifier-training"


def fingerprint(samples: Sequence[Sample], key: CacheKey) -> str:
    """SHA-256 over the cache format, the preprocessing and each sample's path, size and mtime."""
    digest = hashlib.sha256()
    header = {"version": CACHE_VERSION, "pillow": PIL.__version__, **key.preprocessing()}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for sample in samples:
        try:
            st = os.stat(sample.path)
        except OSError as err:
            raise DataError(f"{sample.source}: cannot read image {sample.path}: {err}") from err
        digest.update(f"\n{Path(sample.path).resolve()}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return digest.hexdigest()


class DecodedCache:
    """One split's decoded images: ``images[i]`` uint8 [3, S, S], ``native_sizes[i]`` (w, h).

    Opened read-only as a memory map. Pickles as its path (a spawned loader worker re-opens it).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        self.meta: dict[str, Any] = meta
        self.images: npt.NDArray[np.uint8] = np.load(path, mmap_mode="r")
        self.native_sizes: npt.NDArray[np.int32] = np.asarray(meta["native_sizes"], np.int32)
        expected = (len(self.native_sizes), 3, meta["image_size"], meta["image_size"])
        if self.images.shape != expected or self.images.dtype != np.uint8:
            raise DataError(
                f"{path}: decoded-image cache has shape {self.images.shape} {self.images.dtype}, "
                f"expected {expected} uint8; delete the file and run again"
            )

    def __len__(self) -> int:
        return len(self.native_sizes)

    def check(self, kind: str, image_size: int, train_fit: str, num_samples: int) -> None:
        """Raise ValueError unless this cache holds ``num_samples`` items of that preprocessing."""
        want = CacheKey(self.meta["split"], kind, image_size, train_fit)  # type: ignore[arg-type]
        have = {k: self.meta.get(k) for k in want.preprocessing()}
        if have != want.preprocessing() or len(self) != num_samples:
            raise ValueError(
                f"{self.path}: cached {len(self)} items {have}, the dataset needs {num_samples} "
                f"items {want.preprocessing()}"
            )

    def hwc(self, i: int) -> npt.NDArray[np.uint8]:
        """Image ``i`` as a read-only uint8 [S, S, 3] view (what the preprocessing returned)."""
        view: npt.NDArray[np.uint8] = self.images[i].transpose(1, 2, 0)
        return view

    def native_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image ``i``'s file."""
        width, height = self.native_sizes[i]
        return int(width), int(height)

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]


def jpeg_on_cached(
    hwc: npt.NDArray[np.uint8],
    native_size: tuple[int, int],
    image_size: int,
    fit: TrainFit,
    quality: int,
) -> npt.NDArray[np.uint8]:
    """The loader's JPEG re-encode applied to a cached train item (see the module docstring).

    ``hwc`` is the cached ``train_image`` output; the content (without letterbox padding) is
    resized back to ``native_size`` when it differs, re-encoded at ``quality`` and fitted again.
    """
    width, height = native_size
    if fit == "letterbox":
        longer = max(width, height)
        new_w = max(1, round(width * image_size / longer))
        new_h = max(1, round(height * image_size / longer))
        top, left = (image_size - new_h) // 2, (image_size - new_w) // 2
        content = hwc[top : top + new_h, left : left + new_w]
    else:
        content = hwc
    img = Image.fromarray(np.ascontiguousarray(content))
    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.Resampling.BILINEAR)
    return train_image(jpeg_degrade(img, quality), image_size, fit)


def _decode_one(sample: Sample, key: CacheKey) -> tuple[npt.NDArray[np.uint8], tuple[int, int]]:
    try:
        img = open_rgb(sample.path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{sample.source}: cannot decode image {sample.path}: {err}") from err
    if key.kind == "train":
        return train_image(img, key.image_size, key.train_fit), img.size
    return eval_image(img, key.image_size), img.size


def _decode_into(
    out: npt.NDArray[np.uint8],
    sizes: npt.NDArray[np.int32],
    samples: Sequence[Sample],
    key: CacheKey,
    workers: int,
) -> None:
    """Fill ``out[i]`` and ``sizes[i]`` for every sample on ``workers`` threads."""

    def fill(i: int) -> None:
        hwc, sizes[i] = _decode_one(samples[i], key)
        out[i] = hwc.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(fill, range(len(samples))):
            pass


def build_cache(samples: Sequence[Sample], key: CacheKey, path: Path, workers: int) -> DecodedCache:
    """Decode and resize every sample into ``path`` (atomically) and open it."""
    s = key.image_size
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp.npy")
    sizes = np.zeros((len(samples), 2), np.int32)
    try:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(samples), 3, s, s)
        )
        _decode_into(out, sizes, samples, key, workers)
        out.flush()
        del out  # unmap before the rename
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        **key.preprocessing(),
        "split": key.split,
        "version": CACHE_VERSION,
        "num_samples": len(samples),
        "native_sizes": sizes.tolist(),
    }
    meta_tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp.json")
    meta_tmp.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(meta_tmp, path.with_suffix(".json"))  # last: its presence means "complete"
    return DecodedCache(path)


def open_or_build(
    samples: Sequence[Sample], key: CacheKey, folder: Path, workers: int
) -> tuple[DecodedCache, bool]:
    """The split's cache in ``folder``: opened when a complete one matches, else built.

    Returns the cache and whether it was built now.
    """
    digest = fingerprint(samples, key)[:20]
    path = folder / f"{key.split}-{key.kind}-{key.image_size}px-{digest}.npy"
    if path.is_file() and path.with_suffix(".json").is_file():
        return DecodedCache(path), False
    return build_cache(samples, key, path, workers), True


def cache_bytes(index: DatasetIndex, image_size: int) -> int:
    """Bytes the decoded caches of every split of ``index`` take."""
    return sum(len(split) for split in index.splits.values()) * image_size * image_size * 3


def available_memory() -> int:
    """Bytes of memory available to this process: ``MemAvailable``, capped by a cgroup limit."""
    avail = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def free_space(folder: Path) -> int:
    """Free bytes on the filesystem of ``folder`` (or its nearest existing parent); 0 if none."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return 0
    return 0


def choose_mode(
    mode: CacheMode,
    needed: int,
    disk_dir: Path,
    *,
    memory: int | None = None,
    shm_free: int | None = None,
    disk_free: int | None = None,
) -> tuple[Literal["none", "ram", "disk"], str]:
    """Resolve ``data.cache`` for caches of ``needed`` bytes; returns the mode and why."""
    gib = f"{needed / 2**30:.2f} GiB"
    if mode in ("none", "ram", "disk"):
        return mode, f"data.cache={mode} ({gib})"
    memory = available_memory() if memory is None else memory
    shm_free = free_space(RAM_DIR) if shm_free is None else shm_free
    if needed <= RAM_SHARE * memory and needed * 1.05 <= shm_free:
        return "ram", f"auto: {gib} fit in memory ({memory / 2**30:.1f} GiB available)"
    disk_free = free_space(disk_dir) if disk_free is None else disk_free
    if needed * 1.05 <= disk_free:
        why = (
            f"memory has {memory / 2**30:.1f} GiB available"
            if needed > RAM_SHARE * memory
            else f"{RAM_DIR} has {shm_free / 2**30:.2f} GiB free"
        )
        return "disk", f"auto: {gib} on disk in {disk_dir} ({why})"
    return "none", f"auto: {gib} fit neither in memory nor on disk ({disk_dir}); decoding"


@dataclass
class SplitCaches:
    """The opened caches by split name, and where they live (``ram`` files are removed by
    :meth:`release` at the end of the run)."""

    mode: Literal["none", "ram", "disk"]
    reason: str
    caches: dict[str, DecodedCache]
    built_seconds: float = 0.0

    def release(self) -> None:
        """Delete the ``ram`` files (open maps stay valid until closed); keep ``disk`` ones."""
        if self.mode == "ram":
            for cache in self.caches.values():
                cache.path.unlink(missing_ok=True)
                cache.path.with_suffix(".json").unlink(missing_ok=True)

    def describe(self) -> str:
        if self.mode == "none":
            return f"decoded-image cache off ({self.reason})"
        total = sum(c.nbytes for c in self.caches.values())
        where = next(iter(self.caches.values())).path.parent if self.caches else "-"
        built = f", built in {self.built_seconds:.1f} s" if self.built_seconds else ", reused"
        return (
            f"decoded-image cache {self.mode}: {total / 2**30:.2f} GiB in {where}{built} "
            f"({self.reason})"
        )


def open_caches(
    index: DatasetIndex,
    *,
    mode: CacheMode,
    image_size: int,
    train_fit: TrainFit,
    cache_dir: str = "",
    workers: int = 0,
    first: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> SplitCaches:
    """Open (or build) the caches of every split of ``index``.

    ``first`` is ``accelerator.local_main_process_first``: the local main process builds, the
    others wait and open what it built. ``workers`` threads decode (0: every usable core).
    """
    disk_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "decoded"
    resolved, reason = choose_mode(mode, cache_bytes(index, image_size), disk_dir)
    if resolved == "none":
        return SplitCaches("none", reason, {})
    folder = RAM_DIR / "classifier-training" if resolved == "ram" else disk_dir
    workers = workers or len(os.sched_getaffinity(0))
    caches: dict[str, DecodedCache] = {}
    start = time.perf_counter()
    built_any = False
    with first():
        for name, split in _splits(index):
            kind: Literal["train", "eval"] = "train" if name == index.train.name else "eval"
            key = CacheKey(name, kind, image_size, train_fit)
            caches[name], built = open_or_build(split, key, folder, workers)
            built_any = built_any or built
    seconds = time.perf_counter() - start if built_any else 0.0
    return SplitCaches(resolved, reason, caches, seconds)


def _splits(index: DatasetIndex) -> Iterator[tuple[str, Sequence[Sample]]]:
    for split in index.splits.values():
        yield split.name, split.samples
