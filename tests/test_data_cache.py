"""Decoded-image cache: same items as decoding, never stale, shared, chosen by size."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from classifier_training.data import cache as cache_module
from classifier_training.data.cache import (
    CacheKey,
    DecodedCache,
    choose_mode,
    fingerprint,
    jpeg_on_cached,
    open_caches,
    open_or_build,
)
from classifier_training.data.dataset import ImageDataset
from classifier_training.data.index import DataError, DatasetIndex, index_dataset
from classifier_training.data.loaders import build_loaders
from classifier_training.data.preprocess import jpeg_degrade, open_rgb, train_image
from classifier_training.recipe import DataConfig

MakeDataset = Callable[..., Path]
CLASSES = ("0", "00", "1")


@pytest.fixture
def index(tmp_path: Path, make_jsonl_dataset: MakeDataset) -> DatasetIndex:
    """40x32 images: letterboxed at 40 px their native size already fits (longer side = 40)."""
    root = make_jsonl_dataset(tmp_path / "data", CLASSES, {"train": 5, "valid": 2, "test": 2})
    return index_dataset(root)


def caches_for(index: DatasetIndex, size: int, folder: Path) -> dict[str, DecodedCache]:
    return open_caches(index, mode="disk", image_size=size, train_fit="letterbox",
                       cache_dir=str(folder)).caches  # fmt: skip


@pytest.mark.parametrize("size", [40, 24])
def test_cached_items_equal_decoded_items(index: DatasetIndex, tmp_path: Path, size: int) -> None:
    caches = caches_for(index, size, tmp_path / "cache")
    assert set(caches) == {"train", "valid", "test"}
    for split in index.splits.values():
        kind = "train" if split.name == "train" else "eval"
        plain = ImageDataset(split.samples, mode=kind, image_size=size)  # type: ignore[arg-type]
        cached = ImageDataset(
            split.samples,
            mode=kind,  # type: ignore[arg-type]
            image_size=size,
            cache=caches[split.name],
        )
        for i in range(len(split)):
            assert torch.equal(plain[i]["image"], cached[i]["image"]), (split.name, i)
            assert plain[i]["target"] == cached[i]["target"]
    assert caches["train"].native_sizes.tolist() == [[40, 32]] * len(index.train)


def test_jpeg_on_cached_pixels_keeps_the_draws_and_the_result(
    index: DatasetIndex, tmp_path: Path
) -> None:
    """Native 40x32 fits S=40: the cached path is bit-identical, JPEG draws included."""
    cache = caches_for(index, 40, tmp_path / "cache")["train"]
    args: dict[str, Any] = {"mode": "train", "image_size": 40, "jpeg_p": 0.6, "seed": 5}
    plain = ImageDataset(index.train.samples, **args)
    cached = ImageDataset(index.train.samples, cache=cache, **args)
    drawn = 0
    for epoch in (0, 1, 2):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(plain)):
            drawn += plain._jpeg_quality(i) is not None
            assert np.array_equal(plain.pixels(i), cached.pixels(i)), (epoch, i)
    assert 0 < drawn < 3 * len(plain)  # some items were re-encoded, some not


def test_jpeg_on_cached_pixels_at_another_size_is_close(index: DatasetIndex) -> None:
    """Native 40x32 at S=24: the content is resized back to 40x32 before the JPEG."""
    img = open_rgb(index.train.samples[0].path)
    cached = train_image(img, 24)
    expected = train_image(jpeg_degrade(img, 30), 24)
    got = jpeg_on_cached(cached, img.size, 24, "letterbox", 30)
    assert got.shape == expected.shape == (24, 24, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 6.0
    stretch = jpeg_on_cached(train_image(img, 24, "stretch"), img.size, 24, "stretch", 30)
    assert stretch.shape == (24, 24, 3)


def test_never_stale(index: DatasetIndex, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    key = CacheKey("train", "train", 40)
    first, built = open_or_build(index.train.samples, key, folder, workers=2)
    assert built
    again, built = open_or_build(index.train.samples, key, folder, workers=2)
    assert not built and again.path == first.path
    # Another image size, another fit, a split kind: other files.
    assert fingerprint(index.train.samples, CacheKey("train", "train", 32)) != first.path.stem
    other_fit = fingerprint(index.train.samples, CacheKey("train", "train", 40, "stretch"))
    assert other_fit[:20] not in first.path.name
    # A file rewritten (new bytes, new mtime) changes the fingerprint: rebuilt, new content.
    sample = index.train.samples[0]
    from PIL import Image

    Image.new("RGB", (40, 32), (255, 0, 0)).save(sample.path, quality=95)
    os.utime(sample.path, ns=(1, 1))
    rebuilt, built = open_or_build(index.train.samples, key, folder, workers=2)
    assert built and rebuilt.path != first.path
    assert tuple(rebuilt.hwc(0)[16, 20]) == pytest.approx((254, 0, 0), abs=2)
    # A row fewer: another fingerprint too.
    shorter, built = open_or_build(index.train.samples[1:], key, folder, workers=2)
    assert built and len(shorter) == len(index.train) - 1
    assert not list(folder.glob(".*tmp*"))  # no temp files left behind


def test_broken_image_names_the_annotation_row(index: DatasetIndex, tmp_path: Path) -> None:
    sample = index.train.samples[3]
    sample.path.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"annotations\.jsonl:4: cannot decode image"):
        open_or_build(index.train.samples, CacheKey("train", "train", 40), tmp_path, 2)
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".*"))


def test_cache_checks_what_it_is_used_for(index: DatasetIndex, tmp_path: Path) -> None:
    cache = caches_for(index, 40, tmp_path / "cache")["valid"]
    with pytest.raises(ValueError, match="the dataset needs"):
        ImageDataset(index.val.samples, mode="train", image_size=40, cache=cache)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="the dataset needs"):
        ImageDataset(index.val.samples, mode="eval", image_size=32, cache=cache)  # type: ignore[union-attr]


def test_loader_workers_share_the_map_and_give_the_same_batches(
    index: DatasetIndex, tmp_path: Path
) -> None:
    caches = caches_for(index, 40, tmp_path / "cache")
    cfg = DataConfig(image_size=40, batch_size=4, num_workers=2)
    kwargs: dict[str, Any] = {"jpeg_p": 0.5, "jpeg_quality": (10, 50), "seed": 1}
    plain = build_loaders(DataConfig(image_size=40, batch_size=4, num_workers=0), index, **kwargs)
    cached = build_loaders(cfg, index, caches=caches, **kwargs)
    assert cached.train_dataset.cache is caches["train"]
    assert cached.test_dataset is not None and cached.test_dataset.cache is caches["test"]
    for name in ("val", "test"):
        a = [b["image"] for b in getattr(plain, name)]
        b = [b["image"] for b in getattr(cached, name)]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    order = list(range(len(index.train)))
    plain_dl = DataLoader(plain.train_dataset, batch_size=4, sampler=order)
    cached_dl = DataLoader(cached.train_dataset, batch_size=4, sampler=order, num_workers=2)
    for x, y in zip(plain_dl, cached_dl, strict=True):
        assert torch.equal(x["image"], y["image"])


def test_pickles_as_its_path(index: DatasetIndex, tmp_path: Path) -> None:
    cache = caches_for(index, 40, tmp_path / "cache")["train"]
    data = pickle.dumps(cache)
    assert len(data) < 2000  # the path, not the pixels
    copy = pickle.loads(data)
    assert np.array_equal(copy.images, cache.images)


def test_choose_mode() -> None:
    gib = 2**30
    disk = Path("/cache")
    mode, why = choose_mode("auto", 2 * gib, disk, memory=16 * gib, shm_free=8 * gib)
    assert mode == "ram" and "fit in memory" in why
    mode, why = choose_mode(
        "auto", 2 * gib, disk, memory=16 * gib, shm_free=64 * 2**20, disk_free=100 * gib
    )
    assert mode == "disk" and "/dev/shm has 0.06 GiB free" in why
    mode, why = choose_mode("auto", 10 * gib, disk, memory=16 * gib, shm_free=64 * gib,
                            disk_free=100 * gib)  # fmt: skip
    assert mode == "disk" and "memory has 16.0 GiB available" in why
    mode, why = choose_mode("auto", 10 * gib, disk, memory=1 * gib, shm_free=0, disk_free=gib)
    assert mode == "none" and "decoding" in why
    assert choose_mode("disk", 10 * gib, disk)[0] == "disk"
    assert choose_mode("none", 1, disk)[0] == "none"


def test_ram_mode_builds_once_under_main_first_and_is_released(
    index: DatasetIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "RAM_DIR", tmp_path / "shm")
    entered: list[str] = []

    @contextmanager
    def first() -> Any:
        entered.append("main first")
        yield

    caches = open_caches(index, mode="ram", image_size=40, train_fit="letterbox", first=first)
    assert entered == ["main first"]
    files = sorted(p.name for p in (tmp_path / "shm" / "classifier-training").iterdir())
    assert len(files) == 6  # .npy + .json for train, valid, test
    assert "decoded-image cache ram" in caches.describe() and "built in" in caches.describe()
    again = open_caches(index, mode="ram", image_size=40, train_fit="letterbox")
    assert "reused" in again.describe()
    images = np.array(caches.caches["train"].images)
    caches.release()
    assert not list((tmp_path / "shm" / "classifier-training").iterdir())
    assert np.array_equal(np.asarray(caches.caches["train"].images), images)  # maps stay valid
    off = open_caches(index, mode="none", image_size=40, train_fit="letterbox")
    assert off.caches == {} and "cache off" in off.describe()
