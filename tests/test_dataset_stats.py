"""dataset_stats hook: counts, content-keyed duplicates, what the checks skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from classifier_training.data import validate
from classifier_training.data.index import DataError, index_dataset
from classifier_training.data.validate import check_dataset
from classifier_training.hooks import dataset_stats as dataset_stats_hook
from classifier_training.hooks.dataset_stats import DatasetStatsHook, dataset_stats
from classifier_training.recipe import DataConfig
from conftest import write_image, write_jsonl_dataset
from test_hooks import CLASSES, assert_png, make_ctx


def loaders(drop_last: bool = False) -> Any:
    return SimpleNamespace(train=SimpleNamespace(drop_last=drop_last))


def distinct_splits(root: Path, counts: dict[str, int]) -> Path:
    """The fixture dataset with a different image size per split, so no image repeats."""
    for width, (split, n) in enumerate(counts.items(), start=40):
        write_jsonl_dataset(root, CLASSES, {split: n}, size=(width, 32))
    return root


def append_rows(annotations: Path, *rows: dict[str, str]) -> None:
    with annotations.open("a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def test_dataset_stats_report(tmp_path: Path) -> None:
    per_split: dict[str, Any] = {
        "train": {"0": 6, "00": 2, "1": 3, "10": 3, "2": 1},
        "valid": {"0": 2, "00": 2, "1": 2, "10": 2},
        "test": 1,
    }
    root = tmp_path / "data"
    for split, width in (("train", 40), ("valid", 44), ("test", 48)):
        # Different sizes per split: the fixture's images would otherwise repeat across splits.
        write_jsonl_dataset(
            root, CLASSES, {split: per_split[split]}, size=(width, 32), metadata=True
        )
    # A train image copied byte for byte into valid (a leak), an unknown label, a tiny image.
    shutil.copy(root / "train" / "c00_000.jpg", root / "valid" / "leak.jpg")
    write_image(root / "test" / "tiny.jpg", (10, 200, 10), size=(8, 8))
    append_rows(
        root / "valid" / "annotations.jsonl",
        {"image": "leak.jpg", "suffix": "0"},
        {"image": "c00_001.jpg", "suffix": "99"},
    )
    append_rows(root / "test" / "annotations.jsonl", {"image": "tiny.jpg", "suffix": "1"})
    index = index_dataset(root)
    ctx = make_ctx(tmp_path / "run", index=index, loaders=loaders(drop_last=True))
    DatasetStatsHook().on_fit_start(ctx)

    stats = json.loads((tmp_path / "run" / "dataset_stats.json").read_text())
    assert stats["class_counts"]["train"] == per_split["train"]
    assert stats["class_counts"]["valid"]["0"] == 3
    assert stats["totals"] == {"train": 15, "valid": 9, "test": 6}
    assert stats["imbalance_ratio"] == pytest.approx(6.0)
    assert (stats["largest_class"], stats["smallest_class"]) == ("0", "2")
    assert stats["missing_classes"]["valid"] == ["2"]
    assert stats["skipped_unknown_label_rows"] == {"train": 0, "valid": 1, "test": 0}
    dup = stats["duplicates"]
    assert dup["cross_split_groups"] == 1 and dup["label_conflict_groups"] == 0
    assert {f["split"] for f in dup["cross_split_examples"][0]["rows"]} == {"train", "valid"}
    assert stats["tiny_count"] == 1 and stats["tiny"][0]["path"].endswith("tiny.jpg")
    assert stats["bad_images_count"] == 0 and stats["image_modes"] == {"RGB": 30}
    assert stats["train_samples_left_out_per_epoch"] == 1
    assert stats["image_sizes"]["width"]["max"] == 48
    colours = stats["metadata"]["train"]["jersey_color"]
    assert sum(colours.values()) == 15 and colours["white"] == 6
    assert_png(tmp_path / "run" / "dataset_class_counts.png")
    assert_png(tmp_path / "run" / "dataset_image_sizes.png")
    text = "\n".join(ctx.accelerator.printed)
    assert (
        "smallest class): 6.0x ('0' / '2')" in text and "valid: no images of 1 class(es): 2" in text
    )
    assert "train samples left out per epoch (one-image last batch): 1" in text


def test_duplicates_key_on_decoded_content_not_path(tmp_path: Path) -> None:
    """A file listed twice, and the same pixels saved as two different files, are duplicates."""
    root = distinct_splits(tmp_path / "data", {"train": 2, "valid": 1, "test": 1})
    # The same pixels as PNG twice, with different compression and metadata: different bytes.
    pixels = Image.new("RGB", (30, 20), (12, 34, 56))
    pixels.save(root / "train" / "a.png", compress_level=1)
    pixels.save(root / "test" / "b.png", compress_level=9, dpi=(300, 300))
    assert (root / "train" / "a.png").read_bytes() != (root / "test" / "b.png").read_bytes()
    append_rows(root / "train" / "annotations.jsonl", {"image": "a.png", "suffix": "0"})
    append_rows(root / "test" / "annotations.jsonl", {"image": "b.png", "suffix": "0"})
    # One path listed twice in valid, with two labels: a duplicate and a label conflict.
    append_rows(
        root / "valid" / "annotations.jsonl",
        {"image": "c00_000.jpg", "suffix": "1"},
    )
    stats = dataset_stats(index_dataset(root))
    dup = stats["duplicates"]
    assert dup["cross_split_groups"] == 1
    leak = dup["cross_split_examples"][0]["rows"]
    assert sorted(Path(r["path"]).name for r in leak) == ["a.png", "b.png"]
    assert dup["within_split_extra_copies"] == {"valid": 1}
    assert dup["label_conflict_groups"] == 1
    conflict = dup["label_conflict_examples"][0]["rows"]
    assert {r["label"] for r in conflict} == {"0", "1"}
    assert all(
        r["source"].endswith(("annotations.jsonl:1", "annotations.jsonl:6")) for r in conflict
    )


def test_stats_count_what_the_checks_skipped(tmp_path: Path) -> None:
    root = distinct_splits(tmp_path / "data", {"train": 3, "valid": 1, "test": 1})
    data = (root / "train" / "c01_002.jpg").read_bytes()
    (root / "train" / "c01_002.jpg").write_bytes(data[: len(data) // 2])  # truncated
    append_rows(root / "valid" / "annotations.jsonl", {"image": "c00_000.jpg", "suffix": " 0 "})
    index = index_dataset(root, check_images=False)
    index = check_dataset(index, DataConfig(root=str(root), skip_bad_images=True))
    stats = dataset_stats(index)
    assert stats["bad_images_count"] == 1
    bad = stats["bad_images"][0]
    assert bad["split"] == "train" and bad["path"].endswith("c01_002.jpg")
    assert (
        bad["source"].endswith("train/annotations.jsonl:6") and "truncated" in bad["error"].lower()
    )
    assert stats["totals"]["train"] == 3 * len(CLASSES) - 1
    assert stats["stripped_label_rows"] == {"train": 0, "valid": 1, "test": 0}
    assert stats["skipped_hidden_files"] == {"train": 0, "valid": 0, "test": 0}


def test_fit_start_decodes_no_image_the_check_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training flow: the data check decodes every file once; the report and the leak gate
    read the facts (near-duplicate signatures included) that it cached."""
    root = distinct_splits(tmp_path / "data", {"train": 2, "valid": 1, "test": 1})
    shutil.copy(root / "train" / "c00_000.jpg", root / "test" / "c00_000.jpg")  # a leak
    index = check_dataset(index_dataset(root, check_images=False), DataConfig(root=str(root)))
    decodes: list[Path] = []
    monkeypatch.setattr(validate, "decode_facts", decodes.append)
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: decodes.append(path))
    # The figures (the pair sheet shows its images) are drawn beside epoch 1, not tested here.
    monkeypatch.setattr(dataset_stats_hook, "write_dataset_figures", lambda *a: None)
    ctx = make_ctx(tmp_path / "run", index=index, loaders=loaders())
    ctx.recipe.hooks.fail_on_near_duplicates = True
    with pytest.raises(DataError, match="near-duplicate leak"):
        DatasetStatsHook().on_fit_start(ctx)
    stats = json.loads((tmp_path / "run" / "dataset_stats.json").read_text())
    near = stats["near_duplicates"]
    assert near["files_hashed"] == stats["distinct_files"]
    copied = {"split": "test", "path": str(root / "test" / "c00_000.jpg"), "label": "0"}
    assert any(p["b"] == copied and p["distance"] == 0 for p in near["closest"])
    assert decodes == []
