"""Dataset index: which image files exist, with which label, and the class map (torch-free).

Two layouts are read, from ``root/<split>`` folders (``train``, ``valid``, ``test`` by default):

* **JSONL** (Roboflow OCR/VQA export): every ``*.jsonl`` file (case-insensitive) found recursively
  under a split, hidden ones excepted, in sorted path order; each non-blank line is a JSON object
  ``{"image": <path relative to that file's folder>, "suffix": <label>, "prefix": ..., "metadata":
  {...}}``. ``prefix`` is ignored, ``metadata`` (an object) is kept. One row is one sample, so an
  image listed twice is two samples.
* **ImageFolder**: ``<split>/<class>/**/*.{jpg,jpeg,png,bmp,webp}`` (extensions case-insensitive,
  searched recursively like torchvision's ``ImageFolder``).

Hidden entries are not data: a file or folder whose name starts with ``.`` anywhere below a split
(macOS ``._name.jpg`` AppleDouble files and ``.DS_Store``, a ``.cache`` folder, a
``._annotations.jsonl``) is never a class, an image or an annotation file. Hidden ImageFolder
images are counted (``SplitIndex.skipped_hidden``). An annotation row may still name a hidden file
explicitly.

Labels (``suffix`` or the class folder name) are stripped of surrounding whitespace, so
``" 8 "`` is class ``"8"`` rather than a class of its own: annotation tools add such spaces, and
no label means something different with them. Each split counts its stripped labels
(``SplitIndex.stripped_labels``, one warning per split). Inner whitespace is kept.

The class map comes from the train split only: ``class_to_idx = {label: i}`` over the labels sorted
as plain strings (``"0" < "00" < "1" < "10" < "2"``), indices ``0..N-1``. ``""`` is never a class.

Errors (:class:`DataError`, raised before training starts, naming the file and line):

* the root, the train split, or a named val/test split folder is missing (an empty split name
  skips that split);
* a line is not valid JSON or not a JSON object; ``image`` or ``suffix`` is missing; ``image`` is
  not a non-empty string; ``suffix`` is not a string; ``metadata`` is present but not an object;
* an image path is absolute or resolves (symlinks followed) outside its split folder: annotation
  files are untrusted input, so this is checked for every row, skipped or not;
* with ``check_images=True`` (the default): a kept row's image file is missing, or PIL cannot
  identify it (header read only, well under a millisecond per image). Training passes ``False``
  and runs the full-decode check of :mod:`classifier_training.data.validate` instead, which also
  finds files truncated after the header and can skip bad images;
* the train split has no rows or no classes; a val/test split ends up with no usable sample;
* ImageFolder: the train split has no class folder, or a train class folder holds no image.

Counted skips (one ``logging`` warning per split with the counts; the rows are not samples):

* train rows whose ``suffix`` is ``""`` (after stripping; the reference dataset has such duplicate
  rows);
* val/test rows whose label is not a train class (including ``""``); for ImageFolder, val/test
  class folders that are not train classes (their images are counted).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
"""ImageFolder image suffixes (compared lower-case)."""

DatasetFormat = Literal["jsonl", "imagefolder"]

# Roles are the keys of DatasetIndex.splits; the folder names come from the caller.
TRAIN, VAL, TEST = "train", "val", "test"


class DataError(ValueError):
    """The dataset on disk is invalid; the message names the file (and line) and what to fix."""


@dataclass(frozen=True)
class Sample:
    """One training/evaluation example: an image file and its label.

    ``source`` says where the row came from: ``"<file.jsonl>:<line>"`` or the image path.
    """

    path: Path
    label: str
    target: int
    source: str
    metadata: dict[str, Any] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class BadImage:
    """A row left out because its image failed the full-decode check (``data.skip_bad_images``)."""

    sample: Sample
    error: str


@dataclass
class SplitIndex:
    """The usable samples of one split folder and how many rows were skipped."""

    name: str
    """Folder name of the split (e.g. ``valid``)."""
    root: Path
    samples: list[Sample]
    skipped_unknown: int = 0
    """Rows (or ImageFolder images) skipped: empty label in train, non-train label in val/test."""
    stripped_labels: int = 0
    """Rows (or ImageFolder images) whose label had surrounding whitespace removed."""
    skipped_hidden: int = 0
    """ImageFolder image files skipped because a part of their path starts with ``.``."""
    bad_images: list[BadImage] = field(default_factory=list)
    """Rows dropped because their image does not decode (only with ``data.skip_bad_images``)."""

    @property
    def targets(self) -> list[int]:
        """Class index of every sample, in sample order."""
        return [s.target for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class DatasetIndex:
    """All splits of a dataset plus the class map built from the train split.

    ``splits`` is keyed by role: ``"train"`` always, ``"val"`` and ``"test"`` unless skipped.
    """

    root: Path
    format: DatasetFormat
    class_to_idx: dict[str, int]
    splits: dict[str, SplitIndex]

    @property
    def idx_to_class(self) -> dict[int, str]:
        """Inverse of ``class_to_idx``."""
        return {i: c for c, i in self.class_to_idx.items()}

    @property
    def num_classes(self) -> int:
        return len(self.class_to_idx)

    @property
    def train(self) -> SplitIndex:
        return self.splits[TRAIN]

    @property
    def val(self) -> SplitIndex | None:
        return self.splits.get(VAL)

    @property
    def test(self) -> SplitIndex | None:
        return self.splits.get(TEST)


# ---------------------------------------------------------------------------------------------
# Format detection


def is_hidden(path: Path, below: Path) -> bool:
    """True if a part of ``path`` under the folder ``below`` starts with ``.``."""
    return any(part.startswith(".") for part in path.relative_to(below).parts)


def _jsonl_files(folder: Path) -> Iterator[Path]:
    return (
        p
        for p in folder.rglob("*")
        if p.suffix.lower() == ".jsonl" and not is_hidden(p, folder) and p.is_file()
    )


def _image_files(folder: Path) -> tuple[list[Path], int]:
    """Sorted image files under ``folder`` (recursive), and how many hidden ones were left out."""
    files, hidden = [], 0
    for p in folder.rglob("*"):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            if is_hidden(p, folder):
                hidden += 1
            else:
                files.append(p)
    return sorted(files), hidden


def _has_class_folder(folder: Path) -> bool:
    return any(
        d.is_dir() and not d.name.startswith(".") and _image_files(d)[0] for d in folder.iterdir()
    )


def detect_format(root: str | Path, train: str = "train") -> DatasetFormat:
    """``"jsonl"`` if any ``*.jsonl`` lies under ``root/train`` (or ``root``), else
    ``"imagefolder"`` if it holds ``<class>/<image>`` folders; otherwise a DataError."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    probe = root / train if train and (root / train).is_dir() else root
    if next(_jsonl_files(probe), None) is not None:
        return "jsonl"
    if _has_class_folder(probe):
        return "imagefolder"
    raise DataError(
        f"{root}: cannot detect the dataset format: no *.jsonl annotation file and no "
        f"<class>/<image> folders under {probe}; expected {train}/annotations.jsonl (JSONL) or "
        f"{train}/<class>/*.jpg (ImageFolder)"
    )


# ---------------------------------------------------------------------------------------------
# Shared checks


@dataclass
class _Row:
    path: Path
    label: str
    """Surrounding whitespace stripped."""
    source: str
    metadata: dict[str, Any] | None
    stripped: bool = False
    """The annotated label had surrounding whitespace."""


def _row(path: Path, raw_label: str, source: str, metadata: dict[str, Any] | None) -> _Row:
    label = raw_label.strip()
    return _Row(path, label, source, metadata, stripped=label != raw_label)


def _resolve_inside(split_real: str, base: Path, rel: str, where: str) -> Path:
    """``base / rel`` if it resolves (symlinks followed) inside ``split_real``, else DataError.

    ``split_real`` is ``os.path.realpath`` of the split folder (string ops: this runs per row).
    """
    if "\x00" in rel:
        raise DataError(f"{where}: image path {rel!r} contains a NUL character")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise DataError(
            f"{where}: image path {rel!r} is absolute; image paths must be relative to the "
            f"annotation file's folder and stay inside the split folder {split_real}"
        )
    candidate = base / rel
    real = os.path.realpath(candidate)
    if real != split_real and not real.startswith(split_real.rstrip(os.sep) + os.sep):
        raise DataError(
            f"{where}: image path {rel!r} resolves to {real}, outside the split folder "
            f"{split_real}; annotation paths (and symlinks) must stay inside their split"
        )
    return candidate


def _image_problem(path: Path) -> str | None:
    """None if the file exists and PIL identifies it from its header, else what is wrong."""
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"cannot read image {path}: {err}"
    return None


def _check_images(rows: list[_Row]) -> None:
    """Header-check every distinct image; the first bad one (in row order) is a DataError.

    Sequential on purpose: the check is GIL-bound PIL parsing (~0.08 ms per image warm), and a
    thread pool measured 2x slower here.
    """
    problems: dict[Path, str | None] = {}
    for row in rows:
        if row.path not in problems:
            problems[row.path] = _image_problem(row.path)
        problem = problems[row.path]
        if problem is not None:
            raise DataError(f"{row.source}: {problem}")


# ---------------------------------------------------------------------------------------------
# JSONL


def _parse_jsonl_line(raw: bytes, where: str) -> dict[str, Any] | None:
    """Decode one line; None for a blank line, DataError for anything malformed."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: line is not UTF-8 text ({err.reason})") from err
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line must be one "
            f'JSON object like {{"image": "a.jpg", "suffix": "23"}}'
        ) from err
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: expected a JSON object with 'image' and 'suffix', got {type(obj).__name__}"
        )
    for key in ("image", "suffix"):
        if key not in obj:
            raise DataError(
                f"{where}: missing key {key!r}; each line needs 'image' (path relative to this "
                f"file's folder) and 'suffix' (the label)"
            )
    image = obj["image"]
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: 'image' must be a non-empty path string, got {image!r}")
    suffix = obj["suffix"]
    if not isinstance(suffix, str):
        hint = f'; quote it: "{suffix}"' if isinstance(suffix, (int, float)) else ""
        raise DataError(
            f"{where}: 'suffix' (the label) must be a string, got {suffix!r} "
            f"({type(suffix).__name__}){hint}"
        )
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise DataError(f"{where}: 'metadata' must be a JSON object, got {type(metadata).__name__}")
    return obj


def _read_jsonl_split(split_dir: Path) -> tuple[list[_Row], int]:
    files = sorted(_jsonl_files(split_dir))
    if not files:
        raise DataError(
            f"{split_dir}: no *.jsonl annotation file under this split folder "
            f"(expected {split_dir}/annotations.jsonl)"
        )
    split_real = os.path.realpath(split_dir)
    rows: list[_Row] = []
    for file in files:
        with file.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                where = f"{file}:{lineno}"
                obj = _parse_jsonl_line(raw, where)
                if obj is None:
                    continue
                path = _resolve_inside(split_real, file.parent, obj["image"], where)
                rows.append(_row(path, obj["suffix"], where, obj.get("metadata")))
    return rows, 0


# ---------------------------------------------------------------------------------------------
# ImageFolder


def _class_folders(split_dir: Path) -> list[Path]:
    folders = [d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return sorted(folders, key=lambda d: d.name)


def _read_imagefolder_split(split_dir: Path, is_train: bool) -> tuple[list[_Row], int]:
    """The rows of an ImageFolder split and the number of hidden image files left out."""
    folders = _class_folders(split_dir)
    if is_train and not folders:
        raise DataError(
            f"{split_dir}: no class folders in the train split (ImageFolder expects "
            f"{split_dir}/<class>/<image>.jpg)"
        )
    split_real = os.path.realpath(split_dir)
    rows: list[_Row] = []
    hidden = 0
    for folder in folders:
        files, n_hidden = _image_files(folder)
        hidden += n_hidden
        if is_train and not files:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"{folder}: empty class folder in the train split (no {exts} files)")
        for f in files:
            rel = str(f.relative_to(split_dir))
            path = _resolve_inside(split_real, split_dir, rel, str(f))
            rows.append(_row(path, folder.name, str(f), None))
    return rows, hidden


# ---------------------------------------------------------------------------------------------
# Index


def _skip_summary(labels: Counter[str]) -> str:
    parts = [f"{label!r} x{n}" for label, n in labels.most_common(10)]
    more = len(labels) - 10
    return ", ".join(parts) + (f", ... ({more} more labels)" if more > 0 else "")


def _warn_skips(
    name: str, split_dir: Path, rows: list[_Row], skipped: Counter[str], hidden: int, is_train: bool
) -> None:
    """One warning per kind of counted skip or fix in a split."""
    n_skipped = sum(skipped.values())
    if n_skipped:
        what = 'an empty label ""' if is_train else "a label that is not a train class"
        log.warning(
            "%s: skipped %d row(s) with %s under %s: %s",
            name,
            n_skipped,
            what,
            split_dir,
            _skip_summary(skipped),
        )
    stripped = Counter(r.label for r in rows if r.stripped)
    if stripped:
        log.warning(
            "%s: stripped surrounding whitespace from %d label(s) under %s (now: %s)",
            name,
            sum(stripped.values()),
            split_dir,
            _skip_summary(stripped),
        )
    if hidden:
        log.warning(
            "%s: skipped %d hidden image file(s) under %s (a name starting with '.', e.g. "
            "macOS ._* files)",
            name,
            hidden,
            split_dir,
        )


def _build_split(
    name: str,
    split_dir: Path,
    rows: list[_Row],
    class_to_idx: dict[str, int],
    is_train: bool,
    *,
    hidden: int = 0,
    check_images: bool = True,
) -> SplitIndex:
    kept: list[_Row] = []
    samples: list[Sample] = []
    skipped: Counter[str] = Counter()
    for row in rows:
        target = class_to_idx.get(row.label)
        if target is None:
            skipped[row.label] += 1
            continue
        kept.append(row)
        samples.append(Sample(row.path, row.label, target, row.source, row.metadata))
    if check_images:
        _check_images(kept)
    _warn_skips(name, split_dir, rows, skipped, hidden, is_train)
    if not samples:
        hint = "" if is_train else " (set its split name to '' to skip this split)"
        raise DataError(f"{split_dir}: split '{name}' has no usable sample{hint}")
    return SplitIndex(
        name=name,
        root=split_dir,
        samples=samples,
        skipped_unknown=sum(skipped.values()),
        stripped_labels=sum(1 for r in rows if r.stripped),
        skipped_hidden=hidden,
    )


def _read_split(fmt: DatasetFormat, split_dir: Path, is_train: bool) -> tuple[list[_Row], int]:
    if fmt == "jsonl":
        return _read_jsonl_split(split_dir)
    return _read_imagefolder_split(split_dir, is_train=is_train)


def _resolve_format(format: str, root: Path, split: str) -> DatasetFormat:
    """The layout to read: ``format`` itself, or the one detected from ``root/split``."""
    if format == "auto":
        return detect_format(root, split)
    if format in ("jsonl", "imagefolder"):
        return format  # type: ignore[return-value]
    raise DataError(f"unknown dataset format {format!r}; use auto, jsonl or imagefolder")


def index_dataset(
    root: str | Path,
    format: Literal["auto", "jsonl", "imagefolder"] = "auto",
    train: str = "train",
    val: str = "valid",
    test: str = "test",
    *,
    check_images: bool = True,
) -> DatasetIndex:
    """Index ``root/{train,val,test}`` and build the class map from the train split.

    ``val``/``test`` set to ``""`` skip that split. See the module docstring for which inputs are
    errors and which are counted skips; ``check_images=False`` leaves the image files unread.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    if not train:
        raise DataError("the train split name must not be empty")
    fmt = _resolve_format(format, root, train)

    roles = [(TRAIN, train), (VAL, val), (TEST, test)]
    dirs: dict[str, Path] = {}
    for role, name in roles:
        if not name:
            continue
        d = root / name
        if not d.is_dir():
            hint = "" if role == TRAIN else "; set the split name to '' to skip it"
            raise DataError(f"{root}: {role} split folder {name!r} not found{hint}")
        dirs[role] = d

    train_rows, hidden = _read_split(fmt, dirs[TRAIN], is_train=True)
    labels = sorted({r.label for r in train_rows if r.label != ""})
    if not labels:
        raise DataError(f"{dirs[TRAIN]}: the train split has no labelled rows (no classes)")
    class_to_idx = {label: i for i, label in enumerate(labels)}

    splits = {
        TRAIN: _build_split(
            train,
            dirs[TRAIN],
            train_rows,
            class_to_idx,
            True,
            hidden=hidden,
            check_images=check_images,
        )
    }
    for role, name in roles[1:]:
        if role in dirs:
            rows, hidden = _read_split(fmt, dirs[role], is_train=False)
            splits[role] = _build_split(
                name,
                dirs[role],
                rows,
                class_to_idx,
                False,
                hidden=hidden,
                check_images=check_images,
            )
    return DatasetIndex(root=root, format=fmt, class_to_idx=class_to_idx, splits=splits)


def index_split(
    root: str | Path,
    split: str,
    class_to_idx: Mapping[str, int],
    format: Literal["auto", "jsonl", "imagefolder"] = "auto",
) -> SplitIndex:
    """Index one split folder ``root/split`` against a given class map (e.g. a trained model's).

    The val/test rules of :func:`index_dataset` apply: rows whose label is not in
    ``class_to_idx`` are counted skips; everything else that is wrong is a DataError.
    """
    root = Path(root)
    split_dir = root / split
    if not split or not split_dir.is_dir():
        raise DataError(f"{root}: split folder {split!r} not found")
    if not class_to_idx:
        raise DataError("index_split needs a non-empty class_to_idx")
    fmt = _resolve_format(format, root, split)
    rows, hidden = _read_split(fmt, split_dir, is_train=False)
    return _build_split(split, split_dir, rows, dict(class_to_idx), False, hidden=hidden)
