"""Checks before epoch 1: full decode (parallel, cached), skip or refuse bad images, classes,
hidden files, label whitespace, and the one-image last batch."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image
from torch.utils.data import BatchSampler, SequentialSampler

from classifier_training.data import validate
from classifier_training.data.dataset import drop_single_sample_batch
from classifier_training.data.index import DataError, DatasetIndex, index_dataset
from classifier_training.data.loaders import build_loaders, load_index
from classifier_training.data.near_duplicates import THUMB, Signature, image_signature
from classifier_training.data.preprocess import open_rgb
from classifier_training.data.validate import (
    cache_file,
    check_dataset,
    check_images,
    decode_facts,
)
from classifier_training.recipe import DataConfig
from conftest import count_decodes

MakeDataset = Callable[..., Path]
CLASSES = ("0", "00", "1", "10", "2")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def unchecked(root: Path, test: str = "test") -> DatasetIndex:
    return index_dataset(root, test=test, check_images=False)


def cfg(root: Path, **kw: object) -> DataConfig:
    return DataConfig(root=str(root), num_workers=0, **kw)  # type: ignore[arg-type]


def same_signature(a: Signature | str, b: Signature | str) -> bool:
    assert isinstance(a, Signature) and isinstance(b, Signature)
    return a.dhash == b.dhash and np.array_equal(a.thumb, b.thumb)


# ---------------------------------------------------------------------------------------------
# decode facts and the cache


def test_decode_facts_full_decode_finds_what_a_header_check_misses(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good, quality=95)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:-2000])
    with Image.open(bad) as im:
        im.verify()  # the header check of the index passes this file
    facts = decode_facts(good)
    assert (facts.width, facts.height, facts.mode, facts.error) == (160, 120, "RGB", "")
    assert len(facts.content) == 40
    # The near-duplicate signature, as compact text for the cache: 16 hex digits, 768 bytes.
    assert len(facts.dhash) == 16 and len(base64.b64decode(facts.thumb)) == THUMB * THUMB * 3
    assert same_signature(facts.signature(), image_signature(open_rgb(good)))
    assert "truncated" in decode_facts(bad).error.lower()
    assert decode_facts(bad).signature() == decode_facts(bad).error
    assert decode_facts(tmp_path / "missing.jpg").error == "image file not found"
    (tmp_path / "text.jpg").write_text("not an image")
    assert decode_facts(tmp_path / "text.jpg").error.startswith("cannot decode image")


def test_signature_is_of_the_image_training_reads(tmp_path: Path) -> None:
    """Flat images have no dHash; a 16-bit file is hashed as its 8-bit decode (``v >> 8``), not
    as the white a plain ``convert("RGB")`` clips it to."""
    Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / "flat.png")
    flat = decode_facts(tmp_path / "flat.png")
    sig = flat.signature()
    assert flat.dhash == "" and isinstance(sig, Signature) and sig.dhash is None
    assert (sig.thumb == (10, 200, 30)).all()
    grey = np.random.default_rng(1).integers(0, 256, (24, 32), dtype=np.uint16)
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "8bit.png")
    Image.fromarray(grey * 257).save(tmp_path / "16bit.png")
    wide = decode_facts(tmp_path / "16bit.png")
    assert wide.mode.startswith("I") and wide.dhash
    assert same_signature(wide.signature(), decode_facts(tmp_path / "8bit.png").signature())


def test_second_check_decodes_nothing_and_changes_invalidate(
    make_jsonl_dataset: MakeDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_jsonl_dataset(tmp_path / "d", classes=CLASSES, per_split=2)
    paths = sorted(root.rglob("*.jpg"))
    cache = tmp_path / "cache" / "facts.json"
    seen = count_decodes(monkeypatch)
    first = check_images(paths, cache=cache, workers=2)
    assert len(seen) == len(paths) and cache.is_file()
    assert not list(cache.parent.glob(".*tmp"))  # written atomically: no temp file left
    seen.clear()
    assert check_images(paths, cache=cache) == first and seen == []
    # A rewritten file (new size and mtime) is decoded again; the others are not.
    truncate(paths[0])
    os.utime(paths[0], ns=(1, 1))
    again = check_images(paths, cache=cache)
    assert seen == [paths[0]] and again[paths[0]].error
    # Another Pillow (or check) version: the cache is ignored.
    data = json.loads(cache.read_text())
    data["header"]["pillow"] = "0.0"
    cache.write_text(json.dumps(data))
    seen.clear()
    check_images(paths, cache=cache)
    assert len(seen) == len(paths)


def test_unwritable_cache_is_a_warning(
    make_jsonl_dataset: MakeDataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_jsonl_dataset(tmp_path / "d", classes=CLASSES, per_split=1)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    with caplog.at_level(logging.WARNING):
        facts = check_images(sorted(root.rglob("*.jpg")), cache=blocker / "sub" / "c.json")
    assert all(not f.error for f in facts.values())
    assert "could not write the image-check cache" in caplog.text


def test_cache_file_is_per_root_in_the_user_cache(tmp_path: Path) -> None:
    a, b = cache_file(tmp_path / "a"), cache_file(tmp_path / "b")
    assert a != b and a.parent == b.parent
    assert str(a).startswith(os.environ["CLASSIFIER_TRAINING_CACHE"])  # conftest points it here
    assert a.name.startswith("a-") and a.suffix == ".json"


# ---------------------------------------------------------------------------------------------
# check_dataset


def test_bad_images_are_listed_with_their_annotation_lines(
    make_jsonl_dataset: MakeDataset, tmp_path: Path
) -> None:
    root = make_jsonl_dataset(tmp_path / "d", classes=CLASSES, per_split=3)
    truncate(root / "train" / "c01_002.jpg")
    (root / "valid" / "c00_001.jpg").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "test" / "c04_000.jpg").unlink()
    with pytest.raises(DataError) as err:
        check_dataset(unchecked(root), cfg(root))
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{root / 'train' / 'annotations.jsonl'}:6: cannot decode image")
    assert lines[0].endswith("c01_002.jpg")
    assert lines[1].startswith(f"{root / 'valid' / 'annotations.jsonl'}:2: cannot decode image")
    assert lines[2].startswith(f"{root / 'test' / 'annotations.jsonl'}:13: image file not found")
    assert "3 row(s) (3 image file(s))" in lines[3] and "data.skip_bad_images true" in lines[3]


def test_skip_bad_images_drops_and_records_them(
    make_jsonl_dataset: MakeDataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_jsonl_dataset(tmp_path / "d", classes=CLASSES, per_split=3)
    truncate(root / "train" / "c01_002.jpg")
    index = unchecked(root)
    with caplog.at_level(logging.WARNING):
        checked = check_dataset(index, cfg(root, skip_bad_images=True))
    assert len(checked.train) == len(index.train) - 1
    assert all(s.path.name != "c01_002.jpg" for s in checked.train.samples)
    [bad] = checked.train.bad_images
    assert bad.sample.source.endswith("annotations.jsonl:6") and bad.error
    assert checked.class_to_idx == index.class_to_idx and checked.val is index.val
    assert "train: skipped 1 row(s) whose image does not decode" in caplog.text


def test_a_class_left_without_images_is_refused(
    make_jsonl_dataset: MakeDataset, tmp_path: Path
) -> None:
    root = make_jsonl_dataset(tmp_path / "d", classes=CLASSES, per_split={"train": 1, "valid": 1})
    truncate(root / "train" / "c02_000.jpg")
    with pytest.raises(DataError, match=r"no decodable train image left for class\(es\) 1"):
        check_dataset(unchecked(root, ""), cfg(root, test_split="", skip_bad_images=True))


def test_single_class_train_split_is_refused(
    make_jsonl_dataset: MakeDataset, make_imagefolder_dataset: MakeDataset, tmp_path: Path
) -> None:
    for name, make in (("j", make_jsonl_dataset), ("f", make_imagefolder_dataset)):
        root = make(tmp_path / name, classes=["7"], per_split=2)
        with pytest.raises(DataError, match=r"train: the train split has a single class \('7'\)"):
            check_dataset(unchecked(root), cfg(root))


def test_per_class_monitor_needs_a_class_with_validation_images(
    make_jsonl_dataset: MakeDataset, tmp_path: Path
) -> None:
    root = make_jsonl_dataset(
        tmp_path / "d", classes=CLASSES, per_split={"train": 2, "valid": {"0": 1, "1": 1}}
    )
    index = unchecked(root, "")
    c = cfg(root, test_split="")
    assert check_dataset(index, c, "val/acc_class/1").num_classes == len(CLASSES)
    for label in ("2", "99"):
        with pytest.raises(DataError, match=rf"train.monitor: 'val/acc_class/{label}' names"):
            check_dataset(index, c, f"val/acc_class/{label}")


def test_load_index_runs_the_full_check(make_jsonl_dataset: MakeDataset, tmp_path: Path) -> None:
    root = make_jsonl_dataset(tmp_path / "d", classes=CLASSES, per_split=2)
    truncate(root / "valid" / "c03_001.jpg")
    with pytest.raises(DataError, match=r"valid/annotations.jsonl:8: cannot decode image"):
        load_index(cfg(root))
    assert len(load_index(cfg(root, skip_bad_images=True)).val or []) == 2 * len(CLASSES) - 1


# ---------------------------------------------------------------------------------------------
# hidden files and label whitespace (data/index.py)


def test_hidden_files_and_folders_are_not_data(
    make_imagefolder_dataset: MakeDataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_imagefolder_dataset(tmp_path / "f", classes=CLASSES, per_split=2)
    train = root / "train"
    (train / "0" / "._000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (train / "0" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (train / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (train / "1" / ".thumbnails").mkdir()
    Image.new("RGB", (4, 4)).save(train / "1" / ".thumbnails" / "t.jpg")
    (root / "valid" / "00" / "._001.jpg").write_bytes(b"\x00\x05\x16\x07")
    with caplog.at_level(logging.WARNING):
        index = index_dataset(root)  # the header check would refuse the AppleDouble files
    assert len(index.train) == 2 * len(CLASSES) and index.train.skipped_hidden == 2
    assert index.val is not None and index.val.skipped_hidden == 1
    assert "train: skipped 2 hidden image file(s)" in caplog.text


def test_hidden_annotation_files_are_skipped(
    make_jsonl_dataset: MakeDataset, tmp_path: Path
) -> None:
    root = make_jsonl_dataset(tmp_path / "j", classes=CLASSES, per_split=1)
    (root / "train" / "._annotations.jsonl").write_bytes(b"\x00\x05\x16\x07\xff\xfe binary")
    assert len(index_dataset(root).train) == len(CLASSES)


def test_label_whitespace_is_stripped_and_counted(
    make_jsonl_dataset: MakeDataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_jsonl_dataset(tmp_path / "j", classes=["8", "9"], per_split=1)
    with (root / "train" / "annotations.jsonl").open("a") as fh:
        for suffix in (" 8 ", "9\t", "\u00a08", "   ", "1 0"):
            fh.write(json.dumps({"image": "c00_000.jpg", "suffix": suffix}) + "\n")
    with caplog.at_level(logging.WARNING):
        index = index_dataset(root)
    assert index.class_to_idx == {"1 0": 0, "8": 1, "9": 2}  # inner whitespace is kept
    assert index.train.stripped_labels == 4 and index.train.skipped_unknown == 1
    assert [s.label for s in index.train.samples] == ["8", "9", "8", "9", "8", "1 0"]
    assert "train: stripped surrounding whitespace from 4 label(s)" in caplog.text
    folder = tmp_path / "f"
    for split, label in (("train", "3 "), ("train", "4"), ("valid", " 3")):
        Image.new("RGB", (8, 8)).save(Path(folder, split, label, "x.jpg").parent.mkdir(
            parents=True, exist_ok=True) or folder / split / label / "x.jpg")  # fmt: skip
    index = index_dataset(folder, test="")
    assert index.class_to_idx == {"3": 0, "4": 1} and index.val is not None
    assert index.val.samples[0].label == "3" and index.val.stripped_labels == 1


# ---------------------------------------------------------------------------------------------
# the one-image last batch


def test_drop_single_sample_batch_rule() -> None:
    assert drop_single_sample_batch(17, 8, 1)
    assert not drop_single_sample_batch(16, 8, 1) and not drop_single_sample_batch(18, 8, 1)
    assert not drop_single_sample_batch(17, 8, 2)  # Accelerate's even_batches fills it
    assert not drop_single_sample_batch(5, 1, 1)


@pytest.mark.parametrize("processes", [2, 3, 4])
def test_accelerate_sharding_never_leaves_a_one_image_batch(processes: int) -> None:
    """Why several processes need no drop: even_batches completes every process's last batch."""
    for n in range(1, 40):
        batches = BatchSampler(SequentialSampler(range(n)), batch_size=4, drop_last=False)
        for rank in range(processes):
            shard = BatchSamplerShard(batches, processes, rank, split_batches=False)
            assert all(len(b) == 4 for b in shard), (n, rank)


def test_train_loader_drops_a_one_image_last_batch(
    make_jsonl_dataset: MakeDataset, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    root = make_jsonl_dataset(tmp_path / "d", classes=CLASSES, per_split={"train": 1, "valid": 1})
    c = cfg(root, test_split="", batch_size=4, image_size=16)  # 5 train images: 4 + 1
    index = load_index(c)
    with caplog.at_level(logging.WARNING):
        loaders = build_loaders(c, index, jpeg_p=0.0, jpeg_quality=(5, 55), seed=0)
    assert loaders.train.drop_last and len(loaders.train) == 1
    assert "1 sample per epoch left out" in caplog.text
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    prepared = accelerator.prepare(loaders.train)
    sizes = [len(b["target"]) for b in prepared]
    assert sizes == [4]
    AcceleratorState._reset_state(True)
    kept = build_loaders(c, index, jpeg_p=0.0, jpeg_quality=(5, 55), seed=0, num_processes=2)
    assert not kept.train.drop_last
    assert torch.equal(torch.tensor(len(kept.train)), torch.tensor(2))


def test_process_pool_gives_the_in_process_facts(tmp_path: Path) -> None:
    paths = []
    for i in range(validate.POOL_MIN_FILES + 10):
        path = tmp_path / f"{i:04d}.png"
        Image.new("RGB", (8 + i % 5, 8), (i % 256, 0, 0)).save(path)
        paths.append(path)
    paths[3].write_bytes(b"broken")
    pooled = check_images(paths, workers=2)
    assert pooled == check_images(paths, workers=1)
    assert pooled[paths[3]].error and not pooled[paths[4]].error
