"""Preprocessing contract, labels_mapping.json, ImageDataset and the loaders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from classifier_training.data.dataset import ImageDataset, Item
from classifier_training.data.imbalance import WeightedClassSampler
from classifier_training.data.index import DataError, DatasetIndex, index_dataset
from classifier_training.data.labels import (
    labels_mapping,
    read_labels_mapping,
    write_labels_mapping,
)
from classifier_training.data.loaders import build_loaders, load_index
from classifier_training.data.preprocess import (
    FIXED_PREPROCESSING,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAD_RGB,
    eval_image,
    jpeg_degrade,
    open_rgb,
    resize_size,
    to_nchw_float,
    train_image,
)
from classifier_training.recipe import DataConfig, SyntheticConfig

MakeDataset = Callable[..., Path]


def noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


# ---------------------------------------------------------------------------------------------
# Preprocessing


def test_resize_size() -> None:
    assert resize_size(224) == 256
    assert [resize_size(s) for s in (32, 64, 96, 128, 288, 384)] == [37, 73, 110, 146, 329, 439]
    with pytest.raises(ValueError):
        resize_size(0)


@pytest.mark.parametrize("image_size", [224, 96, 64, 33])
@pytest.mark.parametrize(
    "wh", [(224, 224), (300, 200), (200, 300), (97, 33), (33, 97), (500, 51), (257, 256), (12, 9)]
)
def test_eval_image_equals_torchvision(image_size: int, wh: tuple[int, int]) -> None:
    img = noise_image(*wh, seed=wh[0] * 1000 + wh[1])
    reference = T.Compose([T.Resize(resize_size(image_size)), T.CenterCrop(image_size)])(img)
    ours = eval_image(img, image_size)
    assert ours.dtype == np.uint8 and ours.shape == (image_size, image_size, 3)
    np.testing.assert_array_equal(ours, np.asarray(reference))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_eval_image_converts_to_rgb_first(mode: str) -> None:
    img = noise_image(80, 60, mode=mode)
    reference = T.Compose([T.Resize(resize_size(64)), T.CenterCrop(64)])(img.convert("RGB"))
    np.testing.assert_array_equal(eval_image(img, 64), np.asarray(reference))


def test_train_image_letterbox_and_stretch() -> None:
    wide = Image.new("RGB", (80, 40), (10, 200, 30))
    out = train_image(wide, 32, "letterbox")
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # 80x40 → 32x16 centred: rows 0-7 and 24-31 are padding, 8-23 the image.
    assert (out[:8] == PAD_RGB).all() and (out[24:] == PAD_RGB).all()
    assert (out[8:24] == (10, 200, 30)).all()
    tall = train_image(Image.new("RGB", (30, 91), (5, 5, 5)), 32, "letterbox")
    # 30x91 → 11x32 (round(30 * 32 / 91) = 11) at left (32 - 11) // 2 = 10.
    assert (tall[:, :10] == PAD_RGB).all() and (tall[:, 21:] == PAD_RGB).all()
    assert (tall[:, 10:21] == (5, 5, 5)).all()
    stretched = train_image(wide, 32, "stretch")
    assert stretched.shape == (32, 32, 3) and (stretched == (10, 200, 30)).all()
    square = noise_image(64, 64)
    expected = np.asarray(square.resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(train_image(square, 32, "letterbox"), expected)
    np.testing.assert_array_equal(train_image(square, 32, "stretch"), expected)
    with pytest.raises(ValueError, match="unknown train fit"):
        train_image(square, 32, "crop")  # type: ignore[arg-type]


def test_jpeg_degrade() -> None:
    img = noise_image(48, 40)
    low = jpeg_degrade(img, 5)
    assert low.mode == "RGB" and low.size == img.size
    assert not np.array_equal(np.asarray(low), np.asarray(img))
    np.testing.assert_array_equal(np.asarray(jpeg_degrade(img, 5)), np.asarray(low))
    err_low = np.abs(np.asarray(low, dtype=int) - np.asarray(img, dtype=int)).mean()
    high = jpeg_degrade(img, 95)
    err_high = np.abs(np.asarray(high, dtype=int) - np.asarray(img, dtype=int)).mean()
    assert err_high < err_low
    with pytest.raises(ValueError, match="quality"):
        jpeg_degrade(img, 0)


def test_to_nchw_float_matches_torchvision() -> None:
    batch = np.stack([np.asarray(noise_image(16, 12, seed=s)) for s in range(3)])
    x = to_nchw_float(batch, IMAGENET_MEAN, IMAGENET_STD)
    assert x.dtype == np.float32 and x.shape == (3, 3, 12, 16) and x.flags.c_contiguous
    ref = T.Compose(
        [T.ToDtype(torch.float32, scale=True), T.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))]
    )(torch.from_numpy(batch).permute(0, 3, 1, 2))
    np.testing.assert_allclose(x, ref.numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        to_nchw_float(batch[0], IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        to_nchw_float(batch.astype(np.float32), IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------------------------
# labels_mapping.json


CLASS_TO_IDX = {"0": 0, "00": 1, "1": 2, "10": 3, "2": 4}


def test_labels_mapping_exact_schema() -> None:
    m = labels_mapping(CLASS_TO_IDX, 224)
    assert list(m) == [
        "num_classes",
        "class_to_idx",
        "idx_to_class",
        "normalization",
        "preprocessing",
    ]
    assert m["num_classes"] == 5
    assert m["class_to_idx"] == CLASS_TO_IDX
    assert m["idx_to_class"] == {"0": "0", "1": "00", "2": "1", "3": "10", "4": "2"}
    assert m["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert m["preprocessing"] == {
        "resize_shorter": 256,
        "center_crop": 224,
        "interpolation": "bilinear",
        "color": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
        "scale": "1/255",
        "output": "logits",
    }
    # Input order does not matter: entries are ordered by index.
    shuffled = dict(reversed(list(CLASS_TO_IDX.items())))
    assert json.dumps(labels_mapping(shuffled, 224)) == json.dumps(m)


def test_one_owner_of_the_normalisation_and_the_preprocessing_contract() -> None:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert (IMAGENET_MEAN, IMAGENET_STD) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert tuple(round(255 * m) for m in IMAGENET_MEAN) == PAD_RGB
    pre = labels_mapping(CLASS_TO_IDX, 96)["preprocessing"]
    assert list(pre) == ["resize_shorter", "center_crop", *FIXED_PREPROCESSING]
    assert {k: pre[k] for k in FIXED_PREPROCESSING} == dict(FIXED_PREPROCESSING)
    with pytest.raises(TypeError):
        FIXED_PREPROCESSING["scale"] = "1/127.5"  # type: ignore[index]


def test_write_labels_mapping_is_byte_identical_and_atomic(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "labels_mapping.json", tmp_path / "b" / "labels_mapping.json"
    write_labels_mapping(a, labels_mapping(CLASS_TO_IDX, 96))
    write_labels_mapping(b, labels_mapping(dict(CLASS_TO_IDX), 96))
    first = a.read_bytes()
    assert first == b.read_bytes()
    write_labels_mapping(a, labels_mapping(CLASS_TO_IDX, 96))  # overwrite in place
    assert a.read_bytes() == first
    assert first.endswith(b"}\n") and not first.endswith(b"\n\n")
    assert first.decode() == json.dumps(labels_mapping(CLASS_TO_IDX, 96), indent=2) + "\n"
    assert sorted(p.name for p in a.parent.iterdir()) == ["labels_mapping.json"]  # no temp left
    assert read_labels_mapping(a) == labels_mapping(CLASS_TO_IDX, 96)


def test_read_labels_mapping_accepts_reference_files_without_preprocessing(tmp_path: Path) -> None:
    m = labels_mapping(CLASS_TO_IDX, 224)
    del m["preprocessing"]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(m, indent=2))
    assert read_labels_mapping(path) == m


def _broken(edit: Callable[[dict], None]) -> dict:  # type: ignore[type-arg]
    m = labels_mapping(CLASS_TO_IDX, 224)
    edit(m)
    return m


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("idx_to_class"), "idx_to_class: missing key"),
        (lambda m: m.update(num_classes=4), "class_to_idx: must map 4 labels"),
        (lambda m: m.update(num_classes="5"), "num_classes: must be a positive integer"),
        (lambda m: m["class_to_idx"].update({"2": 7}), "indices must be the integers 0..4"),
        (lambda m: m["idx_to_class"].update({"0": "00"}), "idx_to_class: must be the inverse"),
        (lambda m: m["normalization"].update(std=[0.2, 0.2]), "normalization.std: must be a list"),
        (lambda m: m["normalization"].update(std=[0.2, 0.0, 0.2]), "values must be > 0"),
        (lambda m: m["preprocessing"].pop("center_crop"), "preprocessing.center_crop: missing"),
        (lambda m: m["preprocessing"].update(layout="NHWC"), "preprocessing.layout: only 'NCHW'"),
        (lambda m: m["preprocessing"].update(resize_shorter=8), "must be >= center_crop"),
    ],
)
def test_read_labels_mapping_errors(
    tmp_path: Path,
    edit: Callable[[dict], None],  # type: ignore[type-arg]
    message: str,
) -> None:
    path = tmp_path / "labels_mapping.json"
    path.write_text(json.dumps(_broken(edit)))
    with pytest.raises(ValueError, match=r"labels_mapping\.json: ") as err:
        read_labels_mapping(path)
    assert message in str(err.value)


def test_read_labels_mapping_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        read_labels_mapping(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        read_labels_mapping(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_labels_mapping(tmp_path / "list.json")


# ---------------------------------------------------------------------------------------------
# ImageDataset


@pytest.fixture
def index(make_jsonl_dataset: MakeDataset, tmp_path: Path) -> DatasetIndex:
    root = make_jsonl_dataset(
        tmp_path / "ds",
        classes=["0", "00", "1", "10"],
        per_split={"train": {"0": 6, "00": 3, "1": 2, "10": 1}, "valid": 2, "test": 1},
        size=(40, 28),
    )
    return index_dataset(root)


def test_dataset_items(index: DatasetIndex) -> None:
    ds = ImageDataset(index.train.samples, "train", 32, jpeg_p=0.5, seed=1)
    assert len(ds) == 12 and ds.targets == index.train.targets
    item = ds[5]
    assert set(item) == {"image", "target", "index"}
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
    assert item["target"].dtype == torch.int64 and item["target"].shape == ()
    assert int(item["target"]) == index.train.samples[5].target
    assert item["index"].dtype == torch.int64 and int(item["index"]) == 5
    with pytest.raises(IndexError):
        ds[12]


def test_eval_items_follow_the_contract(index: DatasetIndex) -> None:
    val = index.splits["val"].samples
    ds = ImageDataset(val, "eval", 32, jpeg_p=1.0)  # jpeg_p is ignored in eval mode
    for i in range(len(ds)):
        expected = eval_image(open_rgb(val[i].path), 32)
        np.testing.assert_array_equal(ds[i]["image"].permute(1, 2, 0).numpy(), expected)


def test_train_item_without_jpeg_is_plain_letterbox(index: DatasetIndex) -> None:
    s = index.train.samples
    ds = ImageDataset(s, "train", 32, train_fit="stretch", jpeg_p=0.0)
    expected = train_image(open_rgb(s[3].path), 32, "stretch")
    np.testing.assert_array_equal(ds.pixels(3), expected)


def test_jpeg_is_applied_at_native_size_then_fit(index: DatasetIndex) -> None:
    s = index.train.samples
    ds = ImageDataset(s, "train", 32, jpeg_p=1.0, jpeg_quality=(7, 7))
    expected = train_image(jpeg_degrade(open_rgb(s[0].path), 7), 32, "letterbox")
    np.testing.assert_array_equal(ds.pixels(0), expected)


def test_jpeg_draws_depend_only_on_seed_epoch_index(index: DatasetIndex) -> None:
    s = index.train.samples

    def images(seed: int, epoch: int) -> list[np.ndarray]:
        ds = ImageDataset(s, "train", 32, jpeg_p=0.7, jpeg_quality=(5, 60), seed=seed)
        ds.set_epoch(epoch)
        assert ds.epoch == epoch
        return [ds[i]["image"].numpy() for i in range(len(ds))]

    e3 = images(seed=4, epoch=3)
    again = images(seed=4, epoch=3)
    assert all(np.array_equal(a, b) for a, b in zip(e3, again, strict=True))
    e4 = images(seed=4, epoch=4)
    assert sum(not np.array_equal(a, b) for a, b in zip(e3, e4, strict=True)) >= 3
    other_seed = images(seed=5, epoch=3)
    assert any(not np.array_equal(a, b) for a, b in zip(e3, other_seed, strict=True))


def test_decode_failure_names_the_annotation_row(index: DatasetIndex) -> None:
    sample = index.train.samples[2]
    sample.path.write_bytes(b"\xff\xd8\xff garbage that is no longer a JPEG")
    ds = ImageDataset(index.train.samples, "train", 32)
    with pytest.raises(DataError, match=r"annotations\.jsonl:3: cannot decode image"):
        ds[2]


def test_dataset_argument_checks(index: DatasetIndex) -> None:
    s = index.train.samples
    with pytest.raises(ValueError, match="mode"):
        ImageDataset(s, "test", 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="jpeg_p"):
        ImageDataset(s, "train", 32, jpeg_p=1.5)
    with pytest.raises(ValueError, match="jpeg_quality"):
        ImageDataset(s, "train", 32, jpeg_quality=(60, 5))
    with pytest.raises(ValueError, match="epoch"):
        ImageDataset(s, "train", 32).set_epoch(-1)


def _epoch_batches(
    loader: DataLoader[Item], ds: ImageDataset, sampler: WeightedClassSampler, epoch: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds.set_epoch(epoch)
    sampler.set_epoch(epoch)
    return [(b["index"].clone(), b["image"].clone()) for b in loader]


def test_workers_give_the_same_batches_as_the_main_process(index: DatasetIndex) -> None:
    """Persistent workers see set_epoch through shared memory; results match num_workers=0."""
    s = index.train.samples
    runs = []
    for workers in (0, 2):
        ds = ImageDataset(s, "train", 24, jpeg_p=0.5, jpeg_quality=(5, 40), seed=9)
        sampler = WeightedClassSampler([1.0] * len(s), seed=9)
        loader = DataLoader(
            ds,
            batch_size=4,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        runs.append([_epoch_batches(loader, ds, sampler, e) for e in (0, 1)])
    for epoch in (0, 1):
        in_main, in_workers = runs[0][epoch], runs[1][epoch]
        assert len(in_main) == len(in_workers) == 3
        for (i0, x0), (i1, x1) in zip(in_main, in_workers, strict=True):
            assert torch.equal(i0, i1) and torch.equal(x0, x1)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(runs[0][0], runs[0][1], strict=True))


# ---------------------------------------------------------------------------------------------
# build_loaders / load_index


def config(root: Path, **kwargs: object) -> DataConfig:
    cfg = DataConfig(root=str(root), image_size=32, batch_size=4, num_workers=0)
    for k, v in kwargs.items():
        setattr(cfg, k, v)
    return cfg


def test_build_loaders_without_sampler(index: DatasetIndex) -> None:
    cfg = config(index.root, eval_batch_size=3)
    loaders = build_loaders(cfg, index, jpeg_p=0.3, jpeg_quality=(10, 50), seed=0)
    assert loaders.sampler is None and loaders.index is index
    assert isinstance(loaders.train.sampler, RandomSampler)
    assert loaders.train.batch_size == 4 and loaders.train.drop_last is False
    assert loaders.val.batch_size == 3 and loaders.test is not None
    assert loaders.test.batch_size == 3
    assert not isinstance(loaders.val.sampler, RandomSampler)
    assert loaders.train.pin_memory is torch.cuda.is_available()
    assert loaders.train_dataset.mode == "train" and loaders.train_dataset.jpeg_p == 0.3
    assert loaders.val_dataset.mode == "eval" and loaders.test_dataset is not None
    batch = next(iter(loaders.val))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["index"].tolist() == [0, 1, 2]
    assert sum(len(b["index"]) for b in loaders.train) == 12  # drop_last=False
    loaders.set_epoch(5)
    assert loaders.train_dataset.epoch == 5


def test_build_loaders_with_sampler_and_workers(index: DatasetIndex) -> None:
    cfg = config(index.root, sampler="auto", num_workers=2, pin_memory=True)
    loaders = build_loaders(cfg, index, jpeg_p=0.0, jpeg_quality=(10, 50), seed=3)
    assert loaders.train.sampler is loaders.sampler
    assert isinstance(loaders.sampler, WeightedClassSampler) and loaders.sampler.seed == 3
    assert loaders.train.persistent_workers and loaders.val.persistent_workers
    assert loaders.test is not None and not loaders.test.persistent_workers
    assert loaders.train.num_workers == 2
    loaders.set_epoch(2)
    assert loaders.sampler.epoch == 2 and loaders.train_dataset.epoch == 2


def test_build_loaders_errors(index: DatasetIndex, make_jsonl_dataset: MakeDataset) -> None:
    no_val = index_dataset(index.root, val="", test="")
    with pytest.raises(DataError, match="needs a validation split"):
        build_loaders(config(index.root), no_val, jpeg_p=0.0, jpeg_quality=(10, 50), seed=0)
    test_less = index_dataset(index.root, test="")
    loaders = build_loaders(config(index.root), test_less, jpeg_p=0, jpeg_quality=(9, 9), seed=0)
    assert loaders.test is None and loaders.test_dataset is None
    manual = config(index.root, sampler="manual", sampler_weights={"7": 2.0})
    with pytest.raises(DataError, match="unknown label '7'"):
        build_loaders(manual, index, jpeg_p=0.0, jpeg_quality=(10, 50), seed=0)


def test_load_index_reads_cfg_fields(index: DatasetIndex) -> None:
    loaded = load_index(config(index.root, test_split=""))
    assert loaded.class_to_idx == index.class_to_idx and loaded.test is None
    with pytest.raises(DataError, match="does not exist"):
        load_index(config(index.root.parent / "missing"))


def test_load_index_generates_missing_synthetic_data(tmp_path: Path) -> None:
    synth = SyntheticConfig(
        train_per_class=2, valid_per_class=1, test_per_class=1, image_size=32, labels=["3", "1"]
    )
    cfg = config(tmp_path / "synthetic", generate_if_missing=True, synthetic=synth)
    loaded = load_index(cfg)
    assert loaded.format == "jsonl" and loaded.class_to_idx == {"1": 0, "3": 1}
    assert len(loaded.train) == 4 and len(loaded.splits["val"]) == 2
    assert len(load_index(cfg).train) == 4  # second call: root exists, nothing regenerated


def _rank_batches(root: str, out_dir: str) -> None:
    """One of 2 debug_launcher processes: build_loaders (2 workers each) + accelerator.prepare."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    AcceleratorState._reset_state(True)  # forked from pytest: start from a clean singleton
    acc = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    index = index_dataset(root, test="")
    loaders = build_loaders(
        config(Path(root), sampler="auto", num_workers=2, test_split=""),
        index,
        jpeg_p=0.5,
        jpeg_quality=(5, 40),
        seed=7,
    )
    train = acc.prepare(loaders.train)
    result: dict[str, object] = {"num_processes": acc.num_processes}
    for epoch in (0, 1):
        loaders.set_epoch(epoch)
        train.set_epoch(epoch)
        result[str(epoch)] = [
            [b["index"].tolist(), b["image"].sum(dim=(1, 2, 3)).tolist()] for b in train
        ]
    Path(out_dir, f"rank{acc.process_index}.json").write_text(json.dumps(result))


def test_two_processes_with_workers_split_the_single_process_batches(
    index: DatasetIndex, tmp_path: Path
) -> None:
    """Under accelerator.prepare on 2 processes (gloo), each with 2 persistent workers, the
    interleaved per-process batches equal a single process's batches: same sampler draw, same
    per-sample JPEG draws."""
    from functools import partial

    from accelerate import debug_launcher

    debug_launcher(partial(_rank_batches, str(index.root), str(tmp_path)), num_processes=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["num_processes"] == ranks[1]["num_processes"] == 2
    single = build_loaders(
        config(index.root, sampler="auto", test_split=""),
        index_dataset(index.root, test=""),
        jpeg_p=0.5,
        jpeg_quality=(5, 40),
        seed=7,
    )
    for epoch in (0, 1):
        single.set_epoch(epoch)
        expected = [
            [b["index"].tolist(), b["image"].sum(dim=(1, 2, 3)).tolist()] for b in single.train
        ]
        per_rank = [ranks[0][str(epoch)], ranks[1][str(epoch)]]
        assert len(expected) == 3 and [len(r) for r in per_rank] == [2, 2]  # 12 rows, batch 4
        interleaved = [b for pair in zip(*per_rank, strict=True) for b in pair]
        assert interleaved[:3] == expected
