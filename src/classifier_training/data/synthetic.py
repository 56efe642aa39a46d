"""Write a synthetic basketball-jersey-number dataset in the JSONL layout.

    python -m classifier_training.data.synthetic --out data/synthetic-jerseys [--train_per_class 60
        --long_tail --seed 0 --labels 0 00 1 ...] [--overwrite]

The flags are the fields of :class:`~classifier_training.recipe.SyntheticConfig` (the recipe's
``data.synthetic`` section; dashes or underscores), parsed by simple-parsing. One image is drawn
by :mod:`classifier_training.data.synthetic_render`. The dataset reads like the real
``basketball-jersey-numbers-ocr`` export::

    <out>/dataset.json                        generator version, seed, labels, per-class counts
    <out>/{train,valid,test}/annotations.jsonl
    <out>/{train,valid,test}/images/synth_<label>_<index:05d>.jpg

one JSON object per line, ``image`` relative to the jsonl's folder::

    {"image": "images/synth_8_00012.jpg", "prefix": "Read the number.", "suffix": "8",
     "metadata": {"jersey_color": "white", "number_color": "red", "border": true}}

File names hold the label verbatim (the reference's ``label.zfill(3)`` maps "0" and "00" to the
same name).

Labels (:data:`DEFAULT_LABELS`, 42 like the reference's HEAD model): the 17 known members of the
real class set (0, 00, 1, 2, 4, 5, 6, 8, 10, 11, 18, 20, 22, 26, 30, 35, 46), the remaining single
digits 3, 7, 9, and common NBA numbers 12-17, 21, 23-25, 27, 31-34, 40-42, 44, 55, 77, 99 (the
repeated-digit numbers give the same confusions as 00/11/22), sorted as plain strings.

Determinism: every random draw of a sample comes from one ``numpy.random.Generator`` seeded with
``SeedSequence([seed, split, index, len(label), *label bytes])``, so the same seed and arguments
give the same bytes (given the same Pillow/FreeType/libjpeg) and changing one class's count does
not change any other image. The long-tail class order uses its own stream.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import simple_parsing

from classifier_training.data.synthetic_render import (
    SyntheticDatasetError,
    check_label,
    encode_jpeg,
    render,
    usable_fonts,
)
from classifier_training.io import atomic_write_json
from classifier_training.recipe import SyntheticConfig

__all__ = [
    "DEFAULT_LABELS",
    "GENERATOR_VERSION",
    "SPLITS",
    "SyntheticDatasetError",
    "ensure_synthetic",
    "generate",
    "long_tail_counts",
    "main",
]

log = logging.getLogger(__name__)

GENERATOR = "classifier_training.synthetic"  # the marker in dataset.json, not a module path
GENERATOR_VERSION = 1
"""Bump whenever the same seed and arguments would give different pixels."""

PREFIX = "Read the number."
SPLITS: tuple[str, ...] = ("train", "valid", "test")
_SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
_LONG_TAIL_STREAM = 1_000_003
"""Seed-sequence word that keeps the class-order shuffle apart from every sample's stream."""
LONG_TAIL_RATIO = 60.0
"""Largest/smallest train class under ``long_tail`` (the real data: 64.2x)."""

_KNOWN_LABELS = (
    "0", "00", "1", "2", "4", "5", "6", "8", "10", "11", "18", "20", "22", "26", "30", "35", "46",
)  # fmt: skip
"""Members of the real data's 42 classes that REFERENCE §1.3 names."""
_FILL_LABELS = (
    "3", "7", "9", "12", "13", "14", "15", "16", "17", "21", "23", "24", "25", "27", "31", "32",
    "33", "34", "40", "41", "42", "44", "55", "77", "99",
)  # fmt: skip
"""Common NBA numbers that complete the 42 (our choice; the reference never lists them)."""
DEFAULT_LABELS: tuple[str, ...] = tuple(sorted({*_KNOWN_LABELS, *_FILL_LABELS}))
"""The 42 default jersey labels, sorted as plain strings ("0", "00", "1", "10", ...)."""


def _check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """Validated labels, sorted as plain strings; empty means :data:`DEFAULT_LABELS`."""
    if isinstance(labels, str):
        raise ValueError(f"labels={labels!r}: pass a list of labels, not one string")
    checked = [check_label(label, where="labels") for label in labels or DEFAULT_LABELS]
    duplicates = sorted({label for label in checked if checked.count(label) > 1})
    if duplicates:
        raise ValueError(f"labels has duplicates {duplicates}: list each label once")
    return tuple(sorted(checked))


def long_tail_counts(labels: Sequence[str], train_per_class: int, seed: int) -> dict[str, int]:
    """Train images per label falling geometrically from ``train_per_class`` to ~1/60 of it.

    The k-th class of a seeded shuffle gets ``max(1, round(n · (1/60)^(k/(C-1))))`` images, so
    the largest/smallest ratio is ~60 (the real data's is 64.2). Keys in sorted label order.
    """
    ordered = sorted(labels)
    order = np.random.default_rng(np.random.SeedSequence([seed, _LONG_TAIL_STREAM])).permutation(
        len(ordered)
    )
    counts: dict[str, int] = {}
    steps = max(len(ordered) - 1, 1)
    for rank, position in enumerate(order):
        fraction = (1.0 / LONG_TAIL_RATIO) ** (rank / steps)
        counts[ordered[int(position)]] = max(1, round(train_per_class * fraction))
    return {label: counts[label] for label in ordered}


def _sample_rng(seed: int, split: str, label: str, index: int) -> np.random.Generator:
    words = [seed, _SPLIT_CODES[split], index, len(label), *label.encode("ascii")]
    return np.random.default_rng(np.random.SeedSequence(words))


def _image_name(label: str, index: int) -> str:
    return f"synth_{label}_{index:05d}.jpg"


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _is_generated(path: Path) -> bool:
    """True when ``path/dataset.json`` was written by this generator."""
    try:
        info = json.loads((path / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("generator") == GENERATOR


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in ("pillow", "numpy", "matplotlib"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _write_split(
    split_dir: Path,
    split: str,
    counts: dict[str, int],
    *,
    image_size: int,
    seed: int,
) -> None:
    images = split_dir / "images"
    images.mkdir(parents=True)
    lines = []
    for label, count in counts.items():
        for index in range(count):
            rng = _sample_rng(seed, split, label, index)
            image, meta = render(label, rng, image_size)
            name = _image_name(label, index)
            (images / name).write_bytes(encode_jpeg(image, rng))
            record = {
                "image": f"images/{name}",
                "prefix": PREFIX,
                "suffix": label,
                "metadata": meta,
            }
            lines.append(json.dumps(record))
    (split_dir / "annotations.jsonl").write_text("\n".join(lines) + "\n")


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SyntheticDatasetError(f"{out_dir} exists and is a file; choose another output folder")
    if _is_nonempty_dir(out_dir):
        if not overwrite:
            raise SyntheticDatasetError(
                f"{out_dir} exists and is not empty; pass overwrite=True (CLI: --overwrite) to "
                "replace it, or choose another output folder"
            )
        if not _is_generated(out_dir):
            raise SyntheticDatasetError(
                f"{out_dir} is not empty and holds no dataset.json from {GENERATOR}; refusing to "
                "delete it even with overwrite: remove it yourself or choose another folder"
            )


def _settings(cfg: SyntheticConfig) -> dict[str, Any]:
    """The settings ``dataset.json`` records (in its key order), labels sorted and defaulted."""
    return {
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "long_tail": cfg.long_tail,
        "train_per_class": cfg.train_per_class,
        "valid_per_class": cfg.valid_per_class,
        "test_per_class": cfg.test_per_class,
        "labels": sorted(cfg.labels or DEFAULT_LABELS),
    }


def _plan(cfg: SyntheticConfig) -> dict[str, Any]:
    """The validated ``dataset.json`` summary of ``cfg``, with the per-class count of each split."""
    labels = _check_labels(cfg.labels)
    _check_count("train_per_class", cfg.train_per_class, 1)
    _check_count("valid_per_class", cfg.valid_per_class, 0)
    _check_count("test_per_class", cfg.test_per_class, 0)
    _check_count("image_size", cfg.image_size, 16)
    _check_count("seed", cfg.seed, 0)
    train_counts = (
        long_tail_counts(labels, cfg.train_per_class, cfg.seed)
        if cfg.long_tail
        else dict.fromkeys(labels, cfg.train_per_class)
    )
    per_split = {
        "train": train_counts,
        "valid": dict.fromkeys(labels, cfg.valid_per_class),
        "test": dict.fromkeys(labels, cfg.test_per_class),
    }
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        **_settings(cfg),
        "fonts": [path.name for path in usable_fonts()],
        "libraries": _library_versions(),
        "splits": {
            split: {"total": sum(counts.values()), "per_class": counts}
            for split, counts in per_split.items()
        },
    }


def generate(
    out_dir: str | Path, cfg: SyntheticConfig | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Render the dataset ``cfg`` describes (default: ``SyntheticConfig()``) into ``out_dir``;
    return the summary also written to ``dataset.json``.

    Everything is written into a temporary folder beside ``out_dir`` and renamed into place at the
    end, so an interrupted run leaves no half dataset. An existing non-empty ``out_dir`` is an
    error unless ``overwrite`` is set, and even then only a folder this generator wrote (it holds
    our ``dataset.json``) is replaced, never an arbitrary one.
    """
    out_dir = Path(out_dir)
    cfg = cfg if cfg is not None else SyntheticConfig()
    summary = _plan(cfg)
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        for split in SPLITS:
            counts = summary["splits"][split]["per_class"]
            _write_split(staging / split, split, counts, image_size=cfg.image_size, seed=cfg.seed)
        atomic_write_json(staging / "dataset.json", summary)
        _move_into_place(staging, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _move_into_place(staging: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Rename ``staging`` to ``out_dir`` in one step.

    POSIX ``rename`` replaces an empty directory and fails on a non-empty one, so a dataset that
    another process moved in meanwhile is never replaced unless ``overwrite`` is set; with it the
    old dataset is first moved aside into a scratch folder and deleted after the swap.
    """
    scratch: Path | None = None
    if _is_nonempty_dir(out_dir):
        if not overwrite:
            raise SyntheticDatasetError(
                f"{out_dir} was filled by someone else while generating; keeping theirs"
            )
        scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(scratch / out_dir.name)
    try:
        staging.rename(out_dir)
    except OSError as error:
        if scratch is not None and not out_dir.exists():
            (scratch / out_dir.name).rename(out_dir)  # put the old dataset back
        raise SyntheticDatasetError(
            f"could not move the generated dataset into {out_dir} ({error}); another process may "
            "have written it meanwhile"
        ) from error
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def ensure_synthetic(root: Path, cfg: SyntheticConfig) -> bool:
    """Generate the dataset described by ``cfg`` into ``root`` unless ``root`` already has files.

    Returns True when this call generated it. An existing non-empty ``root`` is left untouched
    (a warning is logged when its ``dataset.json`` records other settings). If another process
    finishes the same generation first, this one discards its copy and returns False.
    """
    root = Path(root)
    if _is_nonempty_dir(root):
        _warn_if_different(root, cfg)
        return False
    try:
        generate(root, cfg)
    except SyntheticDatasetError:
        if _is_generated(root):  # lost a race with another process: its copy is as good as ours
            return False
        raise
    log.info("Generated the synthetic jersey dataset in %s", root)
    return True


def _warn_if_different(root: Path, cfg: SyntheticConfig) -> None:
    try:
        info = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        return
    wanted = _settings(cfg)
    differing = sorted(key for key, value in wanted.items() if info.get(key) != value)
    if differing:
        log.warning(
            "%s exists and was generated with other %s than data.synthetic asks for; using it as "
            "is (delete the folder to regenerate)",
            root,
            ", ".join(differing),
        )


# ----------------------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class _Row:
    split: str
    images: int
    classes: int
    smallest: int
    largest: int


def _format_summary(summary: dict[str, Any], out_dir: Path, seconds: float) -> str:
    rows = []
    for split in SPLITS:
        counts = summary["splits"][split]["per_class"]
        present = [n for n in counts.values() if n > 0]
        rows.append(
            _Row(
                split,
                summary["splits"][split]["total"],
                len(present),
                min(present, default=0),
                max(present, default=0),
            )
        )
    lines = [
        f"{'split':<6} {'images':>7} {'classes':>7} {'min/class':>9} {'max/class':>9}",
        *(
            f"{r.split:<6} {r.images:>7} {r.classes:>7} {r.smallest:>9} {r.largest:>9}"
            for r in rows
        ),
        f"{'total':<6} {sum(r.images for r in rows):>7}",
        f"{summary['image_size']} px, seed {summary['seed']}, "
        f"{len(summary['fonts'])} fonts, {seconds:.1f} s -> {out_dir}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m classifier_training.data.synthetic --out DIR [...]``: generate, summarise."""
    parser = simple_parsing.ArgumentParser(
        prog="python -m classifier_training.data.synthetic",
        description="Render a synthetic basketball jersey number dataset (JSONL layout).",
        add_option_string_dash_variants=simple_parsing.DashVariant.UNDERSCORE_AND_DASH,
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a dataset this tool generated earlier"
    )
    parser.add_arguments(SyntheticConfig, dest="synthetic")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = generate(args.out, args.synthetic, overwrite=args.overwrite)
    except (SyntheticDatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_format_summary(summary, args.out, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
