"""Checks of the training data before epoch 1, before anything is written (torch-free).

:func:`check_dataset` takes an index built without image reads
(``index_dataset(..., check_images=False)``) and:

1. decodes every distinct image file of every split **fully**, through the same
   :func:`~classifier_training.data.preprocess.open_rgb` the loader workers use, so a file that
   passes here decodes in training (a truncated JPEG passes a header check and used to fail
   mid-epoch). Many files are decoded on a process pool sized to the CPU cores: for the small
   crops this project trains on about a quarter of the per-file time is Python (Pillow's header
   parsing, plumbing) that holds the GIL, which caps a thread pool at a few times one core
   (``bench/bench_image_check.py`` measures all three ways). The pool forks, like the
   DataLoader's workers, and the children only run PIL. Results are cached per file by resolved
   path, size and mtime (see :func:`cache_file`), so a second run over the same files decodes
   nothing;
2. on failures: without ``data.skip_bad_images`` raises one :class:`DataError` whose lines list
   every bad row (``annotations.jsonl:LINE: ...`` or the ImageFolder file) and what to do; with it
   drops those rows, records them in ``SplitIndex.bad_images`` (``dataset_stats.json`` lists them)
   and logs one warning per split;
3. refuses a train split with fewer than two classes (a classifier needs two), a train class left
   with no decodable image, and ``train.monitor = val/acc_class/<label>`` for a label that is not
   a class with validation images.

The facts gathered per file (:class:`ImageFacts`: size, PIL mode, a hash of the decoded pixels,
the near-duplicate signature) also feed the dataset statistics, whose duplicate detection keys on
that pixel hash and whose near-duplicate search reads the signature, so the report decodes nothing.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL

from classifier_training.data.index import VAL, BadImage, DataError, DatasetIndex, SplitIndex
from classifier_training.data.near_duplicates import THUMB, Signature, image_signature
from classifier_training.data.preprocess import open_image
from classifier_training.recipe import DataConfig
from classifier_training.recipe_checks import PER_CLASS_MONITOR

log = logging.getLogger(__name__)

CHECK_VERSION = 2
"""Bump when :func:`decode_facts` or the decode rules of ``preprocess.to_rgb8`` change: cached
facts from another version are ignored."""
POOL_MIN_FILES = 256
"""Fewer files than this are decoded in-process: starting workers would cost more."""
CACHE_ENV = "CLASSIFIER_TRAINING_CACHE"
"""Environment variable naming the cache folder (default ``$XDG_CACHE_HOME`` or ``~/.cache``,
then ``classifier-training``)."""


@dataclass(frozen=True)
class ImageFacts:
    """What a full decode of one file tells: its size and PIL mode, the SHA-1 of its 8-bit RGB
    pixels (``content``: equal for files that decode to the same pixels), its near-duplicate
    signature (:func:`~classifier_training.data.near_duplicates.image_signature`: ``dhash`` as
    16 hex digits, "" for a flat image; ``thumb`` the base64 of the ``THUMB x THUMB x 3`` uint8
    thumbnail: text, so the facts go into the cache JSON as they are and pickle back from the
    pool cheaply), or the error."""

    width: int = 0
    height: int = 0
    mode: str = ""
    content: str = ""
    error: str = ""
    dhash: str = ""
    thumb: str = ""

    def signature(self) -> Signature | str:
        """The near-duplicate signature, or the error text of a file that does not decode."""
        if self.error:
            return self.error
        thumb = np.frombuffer(base64.b64decode(self.thumb), np.uint8).reshape(THUMB, THUMB, 3)
        return Signature(int(self.dhash, 16) if self.dhash else None, thumb)


def decode_facts(path: Path) -> ImageFacts:
    """Decode ``path`` fully with :func:`open_image` (what training does) and describe it.

    Any exception is a bad image: a corrupt file may raise more than ``OSError`` from a decoder.
    """
    try:
        rgb, mode = open_image(path)
    except FileNotFoundError:
        return ImageFacts(error="image file not found")
    except Exception as err:  # every way a file fails to decode is reported, not raised
        return ImageFacts(error=f"cannot decode image: {err or type(err).__name__}")
    digest = hashlib.sha1(f"{rgb.width}x{rgb.height}:".encode(), usedforsecurity=False)
    digest.update(rgb.tobytes())
    sig = image_signature(rgb)
    return ImageFacts(
        rgb.width,
        rgb.height,
        mode,
        digest.hexdigest(),
        dhash="" if sig.dhash is None else f"{sig.dhash:016x}",
        thumb=base64.b64encode(sig.thumb.tobytes()).decode("ascii"),
    )


# ---------------------------------------------------------------------------------------------
# Cache: one JSON file per dataset root, {resolved path: [size, mtime_ns, facts...]}


def cache_file(root: Path) -> Path:
    """Where the facts of the dataset at ``root`` are cached: a user cache folder, not the dataset
    (which may be read-only or shared), named after the resolved root."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"),
        "classifier-training",
    )
    key = hashlib.sha1(os.path.realpath(root).encode(), usedforsecurity=False).hexdigest()[:16]
    return Path(base) / "image-check" / f"{Path(root).resolve().name}-{key}.json"


def _header() -> dict[str, Any]:
    return {"version": CHECK_VERSION, "pillow": PIL.__version__}


def _load_cache(path: Path) -> dict[str, list[Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("header") != _header():
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _save_cache(path: Path, files: Mapping[str, list[Any]]) -> None:
    """Write atomically (temp file, fsync, rename); a cache that cannot be written only costs
    the next run a re-check, so that is a warning, not an error."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"header": _header(), "files": files}, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.warning(
            "could not write the image-check cache %s (%s); the next run re-checks", path, err
        )


def _stat_key(path: Path) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def check_images(
    paths: Iterable[Path], *, cache: Path | None = None, workers: int = 0
) -> dict[Path, ImageFacts]:
    """:func:`decode_facts` of every distinct path, reusing the facts cached in ``cache`` for
    files whose resolved path, size and mtime are unchanged, and saving new ones there.

    ``workers`` processes decode (0: one per CPU core available to this process; 1, or fewer
    than :data:`POOL_MIN_FILES` files: in this process).
    """
    unique = list(dict.fromkeys(paths))
    cached = _load_cache(cache) if cache is not None else {}
    keys = {p: _stat_key(p) for p in unique}
    facts: dict[Path, ImageFacts] = {}
    todo: list[Path] = []
    for p in unique:
        key = keys[p]
        entry = cached.get(key[0]) if key is not None else None
        if key is not None and entry is not None and entry[:2] == [key[1], key[2]]:
            facts[p] = ImageFacts(*entry[2:])
        else:
            todo.append(p)
    if todo:
        facts.update(zip(todo, _decode_all(todo, workers), strict=True))
        if cache is not None:  # the files of this check only, so the cache never outgrows it
            fresh = {
                key[0]: [key[1], key[2], *dataclasses.astuple(facts[p])]
                for p, key in keys.items()
                if key is not None  # a missing file is not cached: it may appear
            }
            _save_cache(cache, fresh)
    return facts


def _decode_all(paths: list[Path], workers: int) -> list[ImageFacts]:
    n = workers or len(os.sched_getaffinity(0))
    if n <= 1 or len(paths) < POOL_MIN_FILES:
        return [decode_facts(p) for p in paths]
    chunk = max(1, len(paths) // (n * 8))  # enough chunks to balance uneven file sizes
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(decode_facts, paths, chunksize=chunk))


# ---------------------------------------------------------------------------------------------
# The dataset check


def _bad_rows(split: SplitIndex, facts: Mapping[Path, ImageFacts]) -> list[BadImage]:
    return [BadImage(s, facts[s.path].error) for s in split.samples if facts[s.path].error]


def _describe(bad: list[BadImage]) -> str:
    """One line per bad row, the first one first: ``<file.jsonl>:<line>: <error>: <path>``."""
    lines = [f"{b.sample.source}: {b.error}: {b.sample.path}" for b in bad]
    files = len({b.sample.path for b in bad})
    lines.append(
        f"{len(bad)} row(s) ({files} image file(s)) above fail the full-decode check. Fix or "
        "remove them, or set data.skip_bad_images true to train without them (they are then "
        "counted and listed in dataset_stats.json)."
    )
    return "\n".join(lines)


def _drop_bad(split: SplitIndex, bad: list[BadImage]) -> SplitIndex:
    """``split`` without the rows of ``bad`` (recorded in ``bad_images``); one warning."""
    log.warning(
        "%s: skipped %d row(s) whose image does not decode (data.skip_bad_images), first %s: %s",
        split.name,
        len(bad),
        bad[0].sample.source,
        bad[0].error,
    )
    dropped = {id(b.sample) for b in bad}
    kept = [s for s in split.samples if id(s) not in dropped]
    if not kept:
        raise DataError(f"{split.root}: no image of split '{split.name}' decodes ({len(bad)} rows)")
    return dataclasses.replace(split, samples=kept, bad_images=[*split.bad_images, *bad])


def _check_classes(index: DatasetIndex, monitor: str) -> None:
    train = index.train
    if index.num_classes < 2:
        only = next(iter(index.class_to_idx), "")
        raise DataError(
            f"{train.root}: the train split has a single class ({only!r}); a classifier needs at "
            "least two (check the labels, or data.root / data.train_split)"
        )
    present = Counter(s.label for s in train.samples)
    empty = [label for label in index.class_to_idx if not present[label]]
    if empty:
        raise DataError(
            f"{train.root}: no decodable train image left for class(es) {', '.join(empty)} "
            "after skipping bad images; fix those images or remove the class's rows"
        )
    if monitor.startswith(PER_CLASS_MONITOR):
        label = monitor[len(PER_CLASS_MONITOR) :]
        val = index.splits.get(VAL)
        if val is None or label not in {s.label for s in val.samples}:
            raise DataError(
                f"train.monitor: {monitor!r} names {label!r}, which is not a class with "
                f"validation images; classes: {', '.join(index.class_to_idx)}"
            )


def check_dataset(
    index: DatasetIndex,
    cfg: DataConfig,
    monitor: str = "",
    *,
    cache: Path | None = None,
    workers: int = 0,
) -> DatasetIndex:
    """Run the checks of the module docstring; returns ``index`` with bad rows dropped (only
    with ``cfg.skip_bad_images``; else any bad row is a DataError listing them all).

    ``cache`` defaults to :func:`cache_file` of the index root.
    """
    facts = check_images(
        (s.path for split in index.splits.values() for s in split.samples),
        cache=cache if cache is not None else cache_file(index.root),
        workers=workers,
    )
    bad = {role: _bad_rows(split, facts) for role, split in index.splits.items()}
    every = [b for rows in bad.values() for b in rows]
    if every and not cfg.skip_bad_images:
        raise DataError(_describe(every))
    if every:
        splits = {r: _drop_bad(s, bad[r]) if bad[r] else s for r, s in index.splits.items()}
        index = dataclasses.replace(index, splits=splits)
    _check_classes(index, monitor)
    return index
