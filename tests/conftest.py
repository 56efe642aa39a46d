"""Shared fixtures: tiny on-disk datasets in the JSONL and ImageFolder layouts.

``make_jsonl_dataset(tmp_path, classes=..., per_split=...)`` writes
``<root>/<split>/annotations.jsonl`` plus small JPEGs (a solid colour per class with a rectangle
that moves with the row number, so every image differs) and returns ``root``. ``per_split`` is an
int (rows per class in every split) or ``{split: int | {label: int}}``; a split missing from that
mapping is not written.
``make_imagefolder_dataset`` writes the same images as ``<split>/<class>/<file>.jpg``.
``tiny_data`` is a module-scoped tiny synthetic jersey dataset for end-to-end runs;
``fresh_accelerate_state`` resets Accelerate's singletons around a test (opt in per module with
``pytest.mark.usefixtures``); ``assert_imports_without_torch`` guards the torch-free modules.
"""

from __future__ import annotations

import colorsys
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_CLASSES: tuple[str, ...] = ("0", "00", "1", "10", "2")
DEFAULT_PER_SPLIT: dict[str, int] = {"train": 4, "valid": 2, "test": 2}
COLOURS = ("white", "black", "red", "blue", "navy", "yellow", "green", "purple", "orange")

PerSplit = int | Mapping[str, int | Mapping[str, int]]


def class_colour(class_index: int, num_classes: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per class (hue wheel)."""
    r, g, b = colorsys.hsv_to_rgb(class_index / max(num_classes, 1), 0.8, 0.85)
    return round(r * 255), round(g * 255), round(b * 255)


def write_image(
    path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 32), mark: int = 0
) -> None:
    """Solid ``colour`` with a contrasting rectangle whose position depends on ``mark``."""
    w, h = size
    img = Image.new("RGB", size, colour)
    x, y = (mark * 7) % max(w - 6, 1), (mark * 5) % max(h - 6, 1)
    ink = (255 - colour[0], 255 - colour[1], 255 - colour[2])
    ImageDraw.Draw(img).rectangle((x, y, x + 5, y + 5), fill=ink)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=95)
    else:
        img.save(path)


def _counts(per_split: PerSplit | None, classes: Sequence[str]) -> dict[str, dict[str, int]]:
    spec: Mapping[str, int | Mapping[str, int]]
    if per_split is None:
        spec = DEFAULT_PER_SPLIT
    elif isinstance(per_split, int):
        spec = dict.fromkeys(DEFAULT_PER_SPLIT, per_split)
    else:
        spec = per_split
    out: dict[str, dict[str, int]] = {}
    for split, n in spec.items():
        out[split] = dict.fromkeys(classes, n) if isinstance(n, int) else dict(n)
    return out


def write_jsonl_dataset(
    root: Path,
    classes: Sequence[str] = DEFAULT_CLASSES,
    per_split: PerSplit | None = None,
    *,
    size: tuple[int, int] = (40, 32),
    metadata: bool = False,
) -> Path:
    """Write a JSONL dataset under ``root`` (created) and return ``root``."""
    root = Path(root)
    for split, counts in _counts(per_split, classes).items():
        split_dir = root / split
        split_dir.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        for ci, label in enumerate(classes):
            for k in range(counts.get(label, 0)):
                name = f"c{ci:02d}_{k:03d}.jpg"
                write_image(split_dir / name, class_colour(ci, len(classes)), size, mark=k)
                row: dict[str, Any] = {"image": name, "prefix": "Read the number.", "suffix": label}
                if metadata:
                    row["metadata"] = {
                        "jersey_color": COLOURS[ci % len(COLOURS)],
                        "number_color": COLOURS[(ci + 3) % len(COLOURS)],
                        "border": bool(k % 2),
                    }
                lines.append(json.dumps(row))
        (split_dir / "annotations.jsonl").write_text("".join(s + "\n" for s in lines))
    return root


def write_imagefolder_dataset(
    root: Path,
    classes: Sequence[str] = DEFAULT_CLASSES,
    per_split: PerSplit | None = None,
    *,
    size: tuple[int, int] = (40, 32),
) -> Path:
    """Write an ImageFolder dataset ``root/<split>/<class>/<k>.jpg`` and return ``root``."""
    root = Path(root)
    for split, counts in _counts(per_split, classes).items():
        for ci, label in enumerate(classes):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(counts.get(label, 0)):
                write_image(folder / f"{k:03d}.jpg", class_colour(ci, len(classes)), size, k)
    return root


@pytest.fixture(scope="session", autouse=True)
def image_check_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full-decode check caches per-file facts in a user cache folder: point it (and any
    subprocess a test starts) at a session temp folder instead of the real one."""
    folder = tmp_path_factory.mktemp("image-check-cache")
    os.environ["CLASSIFIER_TRAINING_CACHE"] = str(folder)
    return folder


@pytest.fixture
def make_jsonl_dataset() -> Callable[..., Path]:
    """Factory: ``make_jsonl_dataset(root, classes=..., per_split=..., size=..., metadata=...)``."""
    return write_jsonl_dataset


@pytest.fixture
def make_imagefolder_dataset() -> Callable[..., Path]:
    """Factory: ``make_imagefolder_dataset(tmp_path, classes=..., per_split=..., size=...)``."""
    return write_imagefolder_dataset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic jersey dataset per test module: labels 0, 00, 1, 7; 10 / 3 / 2 images per
    class in train / valid / test; 32 px; seed 1. (test_multiprocess overrides it.)"""
    from classifier_training.data.synthetic import generate
    from classifier_training.recipe import SyntheticConfig

    root = tmp_path_factory.mktemp("data") / "jerseys"
    cfg = SyntheticConfig(
        labels=["0", "00", "1", "7"],
        train_per_class=10,
        valid_per_class=3,
        test_per_class=2,
        image_size=32,
        seed=1,
    )
    generate(root, cfg)
    return root


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """Reset Accelerate's process-wide state before and after the test, so no Accelerator
    (device, mixed precision, process count) leaks between tests."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def assert_imports_without_torch(*modules: str) -> None:
    """Import ``modules`` in a fresh interpreter and fail if that imported torch (the data-index
    and deployment side must work where torch is not installed)."""
    names = ", ".join(modules)
    code = (
        f"import sys\nimport {names}\n"
        f"assert 'torch' not in sys.modules, 'importing {names} imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every path the data check decodes (``validate.decode_facts`` calls) from now on."""
    from classifier_training.data import validate

    seen: list[Path] = []
    real = validate.decode_facts

    def counting(path: Path) -> validate.ImageFacts:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(validate, "decode_facts", counting)
    return seen
