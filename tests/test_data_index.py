"""Dataset index: JSONL and ImageFolder layouts, class order, skips, bad input, path safety."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from classifier_training.data.index import (
    DataError,
    DatasetIndex,
    Sample,
    detect_format,
    index_dataset,
    index_split,
)
from conftest import assert_imports_without_torch

MakeDataset = Callable[..., Path]
LOGGER = "classifier_training.data.index"


def append_lines(path: Path, *lines: str) -> int:
    """Append raw lines to a JSONL file; returns the 1-based number of the first one."""
    existing = path.read_text().splitlines()
    path.write_text("".join(s + "\n" for s in [*existing, *lines]))
    return len(existing) + 1


def row(image: str, suffix: str) -> str:
    return json.dumps({"image": image, "suffix": suffix})


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------------------
# JSONL happy paths


def test_jsonl_index_class_order_and_samples(
    make_jsonl_dataset: MakeDataset, tmp_path: Path
) -> None:
    classes = ["2", "10", "1", "00", "0"]
    root = make_jsonl_dataset(tmp_path / "ds", classes=classes, per_split=2, metadata=True)
    index = index_dataset(root)
    assert isinstance(index, DatasetIndex)
    assert index.format == "jsonl"
    # Plain string order: "0" < "00" < "1" < "10" < "2".
    assert index.class_to_idx == {"0": 0, "00": 1, "1": 2, "10": 3, "2": 4}
    assert index.idx_to_class == {0: "0", 1: "00", 2: "1", 3: "10", 4: "2"}
    assert set(index.splits) == {"train", "val", "test"}
    assert index.splits["val"].name == "valid"
    assert [len(index.splits[k]) for k in ("train", "val", "test")] == [10, 10, 10]
    first = index.train.samples[0]
    ann = root / "train" / "annotations.jsonl"
    assert first.source == f"{ann}:1"
    assert first.label == "2" and first.target == 4
    assert first.path == root / "train" / "c00_000.jpg"
    assert first.metadata is not None and first.metadata["jersey_color"] == "white"
    assert all(s.target == index.class_to_idx[s.label] for s in index.train.samples)
    assert index.train.skipped_unknown == 0
    hash(first)  # frozen and hashable even with a metadata dict


def test_labels_sorted_as_plain_strings(make_jsonl_dataset: MakeDataset, tmp_path: Path) -> None:
    labels = ["10", "2", "00", "1", "0", "23", "3", "100"]
    root = make_jsonl_dataset(tmp_path, classes=labels, per_split={"train": 1, "valid": 1})
    index = index_dataset(root, test="")
    assert list(index.class_to_idx) == sorted(labels)
    assert list(index.class_to_idx) == ["0", "00", "1", "10", "100", "2", "23", "3"]
    assert list(index.class_to_idx.values()) == list(range(len(labels)))
    assert index.test is None and "test" not in index.splits


def test_recursive_jsonl_any_case_sorted_paths(
    make_jsonl_dataset: MakeDataset, tmp_path: Path
) -> None:
    root = make_jsonl_dataset(tmp_path, classes=["1", "2"], per_split=1)
    synth = root / "train" / "synthetic"
    synth.mkdir()
    (root / "train" / "c00_000.jpg").rename(synth / "s.jpg")
    (synth / "ANNOTATIONS.JSONL").write_text(row("s.jpg", "7") + "\n")
    (root / "train" / "annotations.jsonl").write_text(row("c01_000.jpg", "2") + "\n")
    index = index_dataset(root)
    # Root file first (sorted paths), then the nested upper-case one; labels from both.
    assert [s.label for s in index.train.samples] == ["2", "7"]
    assert index.train.samples[1].source == f"{synth / 'ANNOTATIONS.JSONL'}:1"
    assert index.train.samples[1].path == synth / "s.jpg"
    assert index.class_to_idx == {"2": 0, "7": 1}


def test_one_sample_per_row_and_blank_lines(
    make_jsonl_dataset: MakeDataset, tmp_path: Path
) -> None:
    root = make_jsonl_dataset(tmp_path, classes=["1", "2"], per_split=1)
    ann = root / "train" / "annotations.jsonl"
    append_lines(ann, "", "   ", row("c00_000.jpg", "1"))
    index = index_dataset(root)
    assert len(index.train) == 3  # the duplicated image is a second sample
    assert index.train.samples[2].source == f"{ann}:5"  # blank lines still count as lines


def test_train_empty_suffix_rows_are_skipped_and_counted(
    make_jsonl_dataset: MakeDataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_jsonl_dataset(tmp_path, classes=["1", "2"], per_split=2)
    append_lines(root / "train" / "annotations.jsonl", row("c00_000.jpg", ""), row("x.jpg", ""))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        index = index_dataset(root)
    assert "" not in index.class_to_idx
    assert index.train.skipped_unknown == 2
    assert len(index.train) == 4
    msgs = warnings_of(caplog)
    assert len(msgs) == 1  # one warning for the split, with the count
    assert "train: skipped 2 row(s)" in msgs[0] and "'' x2" in msgs[0]


def test_val_test_unknown_labels_one_counted_warning_per_split(
    make_jsonl_dataset: MakeDataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_jsonl_dataset(tmp_path, classes=["1", "2"], per_split=2)
    append_lines(
        root / "valid" / "annotations.jsonl",
        row("c00_000.jpg", ""),
        row("c00_001.jpg", ""),
        row("c00_000.jpg", "99"),
    )
    append_lines(root / "test" / "annotations.jsonl", row("c00_000.jpg", ""))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        index = index_dataset(root)
    assert index.splits["val"].skipped_unknown == 3
    assert index.splits["test"].skipped_unknown == 1
    assert len(index.splits["val"]) == 4 and len(index.splits["test"]) == 4
    msgs = warnings_of(caplog)
    assert len(msgs) == 2
    assert msgs[0].startswith("valid: skipped 3 row(s)") and "'' x2" in msgs[0]
    assert "'99' x1" in msgs[0]
    assert msgs[1].startswith("test: skipped 1 row(s)")


def test_skipped_rows_do_not_need_an_image(make_jsonl_dataset: MakeDataset, tmp_path: Path) -> None:
    root = make_jsonl_dataset(tmp_path, classes=["1"], per_split=1)
    append_lines(root / "valid" / "annotations.jsonl", row("gone.jpg", ""))
    assert index_dataset(root).splits["val"].skipped_unknown == 1


# ---------------------------------------------------------------------------------------------
# JSONL bad input: DataError naming the file and the line


BAD_LINES = [
    ('{"image": "c00_000.jpg", "suffix": "1"', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('"just a string"', "expected a JSON object"),
    ('{"suffix": "1"}', "missing key 'image'"),
    ('{"image": "c00_000.jpg"}', "missing key 'suffix'"),
    ('{"image": "c00_000.jpg", "suffix": 7}', 'must be a string, got 7 (int); quote it: "7"'),
    ('{"image": "c00_000.jpg", "suffix": null}', "'suffix' (the label) must be a string"),
    ('{"image": "", "suffix": "1"}', "'image' must be a non-empty path string"),
    ('{"image": 3, "suffix": "1"}', "'image' must be a non-empty path string"),
    ('{"image": "a\\u0000.jpg", "suffix": "1"}', "contains a NUL character"),
    ('{"image": "c00_000.jpg", "suffix": "1", "metadata": [1]}', "'metadata' must be a JSON"),
    ('{"image": "missing.jpg", "suffix": "1"}', "image file not found"),
    ('{"image": "broken.jpg", "suffix": "1"}', "cannot read image"),
]


@pytest.mark.parametrize("split", ["train", "valid"])
@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_rows_name_file_and_line(
    make_jsonl_dataset: MakeDataset, tmp_path: Path, split: str, line: str, message: str
) -> None:
    root = make_jsonl_dataset(tmp_path, classes=["1", "2"], per_split=1)
    (root / split / "broken.jpg").write_bytes(b"this is not an image")
    ann = root / split / "annotations.jsonl"
    lineno = append_lines(ann, "", line)  # a blank line first: numbering must still be right
    with pytest.raises(DataError) as err:
        index_dataset(root)
    assert f"{ann}:{lineno + 1}" in str(err.value)
    assert message in str(err.value)


def test_truncated_file_without_newline_and_non_utf8(
    make_jsonl_dataset: MakeDataset, tmp_path: Path
) -> None:
    root = make_jsonl_dataset(tmp_path, classes=["1"], per_split=1)
    ann = root / "train" / "annotations.jsonl"
    ann.write_bytes(ann.read_bytes() + b'{"image": "\xff\xfe", "suffix": "1"}')
    with pytest.raises(DataError, match=rf"{re.escape(str(ann))}:2: line is not UTF-8"):
        index_dataset(root)


def test_empty_train_split_is_an_error(make_jsonl_dataset: MakeDataset, tmp_path: Path) -> None:
    root = make_jsonl_dataset(tmp_path, classes=["1"], per_split=1)
    ann = root / "train" / "annotations.jsonl"
    ann.write_text("\n\n")
    with pytest.raises(DataError, match="train split has no labelled rows"):
        index_dataset(root)
    ann.write_text(row("c00_000.jpg", "") + "\n")
    with pytest.raises(DataError, match="train split has no labelled rows"):
        index_dataset(root)


def test_split_without_jsonl_is_an_error(make_jsonl_dataset: MakeDataset, tmp_path: Path) -> None:
    root = make_jsonl_dataset(tmp_path, classes=["1"], per_split=1)
    (root / "valid" / "annotations.jsonl").unlink()
    with pytest.raises(DataError, match=r"valid: no \*\.jsonl annotation file"):
        index_dataset(root, format="jsonl")


def test_val_split_with_no_usable_rows(make_jsonl_dataset: MakeDataset, tmp_path: Path) -> None:
    root = make_jsonl_dataset(tmp_path, classes=["1"], per_split=1)
    (root / "valid" / "annotations.jsonl").write_text(row("c00_000.jpg", "42") + "\n")
    with pytest.raises(DataError, match=r"split 'valid' has no usable sample.*to skip"):
        index_dataset(root)


def test_missing_splits_and_skipping(make_jsonl_dataset: MakeDataset, tmp_path: Path) -> None:
    root = make_jsonl_dataset(tmp_path, classes=["1"], per_split={"train": 1, "valid": 1})
    with pytest.raises(DataError, match=r"test split folder 'test' not found.*''"):
        index_dataset(root)
    assert set(index_dataset(root, test="").splits) == {"train", "val"}
    assert set(index_dataset(root, val="", test="").splits) == {"train"}
    with pytest.raises(DataError, match="val split folder 'validation' not found"):
        index_dataset(root, val="validation", test="")
    with pytest.raises(DataError, match="train split folder 'training' not found"):
        index_dataset(root, train="training", format="jsonl", test="")
    with pytest.raises(DataError, match="does not exist"):
        index_dataset(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# Path safety: always an error, before training


@pytest.fixture
def outside_image(tmp_path: Path) -> Path:
    from conftest import write_image

    path = tmp_path / "outside" / "secret.jpg"
    write_image(path, (1, 2, 3))
    return path


@pytest.mark.parametrize("suffix", ["1", ""])  # skipped ("") rows are checked too
def test_relative_traversal_is_rejected(
    make_jsonl_dataset: MakeDataset, tmp_path: Path, outside_image: Path, suffix: str
) -> None:
    root = make_jsonl_dataset(tmp_path / "ds", classes=["1"], per_split=1)
    ann = root / "train" / "annotations.jsonl"
    for rel in ("../../outside/secret.jpg", "../../../../../../etc/passwd", "sub/../../x.jpg"):
        lineno = append_lines(ann, row(rel, suffix))
        at = re.escape(str(ann))
        with pytest.raises(DataError, match=rf"{at}:{lineno}: .*outside the split folder"):
            index_dataset(root)
        ann.write_text(row("c00_000.jpg", "1") + "\n")


def test_absolute_path_is_rejected(
    make_jsonl_dataset: MakeDataset, tmp_path: Path, outside_image: Path
) -> None:
    root = make_jsonl_dataset(tmp_path / "ds", classes=["1"], per_split=1)
    ann = root / "valid" / "annotations.jsonl"
    # Even an absolute path that points inside the split is refused: paths are relative.
    for target in (outside_image, root / "valid" / "c00_000.jpg"):
        lineno = append_lines(ann, row(str(target), "1"))
        at = re.escape(str(ann))
        with pytest.raises(DataError, match=rf"{at}:{lineno}: image path .* is absolute"):
            index_dataset(root)
        ann.write_text(row("c00_000.jpg", "1") + "\n")


def test_symlinks_pointing_out_are_rejected(
    make_jsonl_dataset: MakeDataset, tmp_path: Path, outside_image: Path
) -> None:
    root = make_jsonl_dataset(tmp_path / "ds", classes=["1"], per_split=1)
    split = root / "train"
    ann = split / "annotations.jsonl"
    (split / "link.jpg").symlink_to(outside_image)
    (split / "linkdir").symlink_to(outside_image.parent, target_is_directory=True)
    (split / "inside.jpg").symlink_to(split / "c00_000.jpg")  # stays inside: allowed
    lineno = append_lines(ann, row("inside.jpg", "1"), row("link.jpg", "1"))
    at = re.escape(str(ann))
    with pytest.raises(DataError, match=rf"{at}:{lineno + 1}: .*resolves to .*secret\.jpg"):
        index_dataset(root)
    ann.write_text(row("inside.jpg", "1") + "\n" + row("linkdir/secret.jpg", "1") + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(ann))}:2: .*outside the split folder"):
        index_dataset(root)
    ann.write_text(row("inside.jpg", "1") + "\n")
    assert len(index_dataset(root).train) == 1


def test_symlinked_dataset_root_is_fine(make_jsonl_dataset: MakeDataset, tmp_path: Path) -> None:
    real = make_jsonl_dataset(tmp_path / "real", classes=["1"], per_split=1)
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    assert len(index_dataset(tmp_path / "alias").train) == 1


# ---------------------------------------------------------------------------------------------
# ImageFolder


def test_imagefolder_detection_and_index(
    make_imagefolder_dataset: MakeDataset, tmp_path: Path
) -> None:
    root = make_imagefolder_dataset(tmp_path, classes=["2", "10", "1"], per_split=2)
    train = root / "train"
    (train / "1" / "upper.JPG").write_bytes((train / "1" / "000.jpg").read_bytes())
    (train / "1" / "notes.txt").write_text("not an image")
    (train / ".cache").mkdir()
    (train / ".cache" / "x.jpg").write_bytes((train / "1" / "000.jpg").read_bytes())
    assert detect_format(root) == "imagefolder"
    index = index_dataset(root)
    assert index.format == "imagefolder"
    assert index.class_to_idx == {"1": 0, "10": 1, "2": 2}
    assert len(index.train) == 7 and len(index.splits["val"]) == 6
    first = index.train.samples[0]
    assert (first.label, first.target, first.metadata) == ("1", 0, None)
    assert first.source == str(first.path)
    assert {s.path.name for s in index.train.samples if s.label == "1"} == {
        "000.jpg",
        "001.jpg",
        "upper.JPG",
    }


def test_imagefolder_val_class_not_in_train(
    make_imagefolder_dataset: MakeDataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_imagefolder_dataset(tmp_path, classes=["1", "2"], per_split=1)
    from conftest import write_image

    write_image(root / "valid" / "7" / "a.jpg", (0, 0, 0))
    write_image(root / "valid" / "7" / "b.png", (0, 0, 0))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        index = index_dataset(root)
    assert index.splits["val"].skipped_unknown == 2
    assert len(index.splits["val"]) == 2
    msgs = warnings_of(caplog)
    assert len(msgs) == 1 and msgs[0].startswith("valid: skipped 2 row(s)") and "'7' x2" in msgs[0]


def test_imagefolder_errors(make_imagefolder_dataset: MakeDataset, tmp_path: Path) -> None:
    root = make_imagefolder_dataset(tmp_path / "ds", classes=["1", "2"], per_split=1)
    (root / "train" / "3").mkdir()
    with pytest.raises(DataError, match=r"train/3: empty class folder in the train split"):
        index_dataset(root)
    (root / "train" / "3").rmdir()
    (root / "train" / "2" / "000.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"train/2/000\.jpg: cannot read image"):
        index_dataset(root)


def test_imagefolder_symlink_out_is_rejected(
    make_imagefolder_dataset: MakeDataset, tmp_path: Path, outside_image: Path
) -> None:
    root = make_imagefolder_dataset(tmp_path / "ds", classes=["1"], per_split=1)
    (root / "train" / "1" / "evil.jpg").symlink_to(outside_image)
    with pytest.raises(DataError, match=r"evil\.jpg: .*outside the split folder"):
        index_dataset(root)


def test_imagefolder_without_classes(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders in the train split"):
        index_dataset(tmp_path, format="imagefolder", val="", test="")


def test_detect_format(make_jsonl_dataset: MakeDataset, tmp_path: Path) -> None:
    root = make_jsonl_dataset(tmp_path / "j", classes=["1"], per_split=1)
    assert detect_format(root) == "jsonl"
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="cannot detect the dataset format"):
        detect_format(tmp_path / "empty")
    with pytest.raises(DataError, match="nowhere does not exist"):
        detect_format(tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown dataset format"):
        index_dataset(root, format="csv")  # type: ignore[arg-type]


def test_sample_is_frozen() -> None:
    s = Sample(Path("a.jpg"), "1", 0, "a.jsonl:1", None)
    with pytest.raises(AttributeError):
        s.label = "2"  # type: ignore[misc]


def test_torch_free_modules_do_not_import_torch() -> None:
    assert_imports_without_torch(
        "classifier_training.data.index",
        "classifier_training.data.labels",
        "classifier_training.data.preprocess",
        "classifier_training.data.validate",
    )


def test_index_split_against_a_given_class_map(
    make_jsonl_dataset: MakeDataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_jsonl_dataset(tmp_path, classes=["1", "2", "3"], per_split=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        split = index_split(root, "test", {"1": 0, "2": 1})
    assert split.name == "test" and len(split) == 2 and split.skipped_unknown == 1
    assert [s.target for s in split.samples] == [0, 1]
    assert len(warnings_of(caplog)) == 1
    with pytest.raises(DataError, match="split folder 'nope' not found"):
        index_split(root, "nope", {"1": 0})
