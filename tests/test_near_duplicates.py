"""Cross-split near-duplicates by dHash (classifier_training.data.near_duplicates)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from classifier_training.data.index import DataError, index_dataset
from classifier_training.data.near_duplicates import (
    SHEET_FILE,
    Signature,
    check_index,
    dhash,
    find_near_duplicates,
    image_signature,
    near_duplicate_report,
    plot_near_duplicates,
)
from classifier_training.data.validate import cache_file, check_images, decode_facts
from classifier_training.hooks.dataset_stats import all_paths
from conftest import count_decodes, write_jsonl_dataset


def signature(path: Path) -> Signature | str:
    """The signature the full-decode check computes for ``path``."""
    return decode_facts(path).signature()


def scene(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A textured image (random blobs), distinct per seed."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        r = int(rng.integers(3, 12))
        draw.ellipse(
            (x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3))
        )
    return img


def test_dhash_is_stable_under_reencoding_and_resizing(tmp_path: Path) -> None:
    img = scene(0)
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.jpg", quality=70)
    img.resize((32, 24)).save(tmp_path / "c.png")
    sa, sb, sc = (signature(tmp_path / n) for n in ("a.png", "b.jpg", "c.png"))
    assert isinstance(sa, Signature) and isinstance(sb, Signature) and isinstance(sc, Signature)
    ha, hb, hc = sa.dhash, sb.dhash, sc.dhash
    assert isinstance(ha, int) and isinstance(hb, int) and isinstance(hc, int)
    assert (ha ^ hb).bit_count() <= 4 and (ha ^ hc).bit_count() <= 4
    assert sa.thumb.shape == (16, 16, 3)
    other = dhash(scene(1))
    assert other is not None and (ha ^ other).bit_count() > 10


def test_flat_and_broken_images_are_skipped(tmp_path: Path) -> None:
    assert dhash(Image.new("RGB", (20, 20), (10, 200, 30))) is None
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert str(signature(tmp_path / "bad.jpg")).startswith("cannot decode image")


def test_pairs_across_splits_only_closest_first(tmp_path: Path) -> None:
    paths = {}
    for name, seed in (("t0", 0), ("t1", 1), ("v0", 0), ("x2", 2), ("t2", 2)):
        paths[name] = tmp_path / f"{name}.png"
        scene(seed).save(paths[name])
    # t0/v0 identical pixels; x2 (test) is t2 shifted by a pixel column
    shifted = scene(2).crop((1, 0, 64, 48)).resize((64, 48))
    shifted.save(paths["x2"])
    splits = {
        "train": [(paths["t0"], "a"), (paths["t1"], "b"), (paths["t2"], "c")],
        "val": [(paths["v0"], "a"), (paths["v0"], "a")],  # listed twice: one file
        "test": [(paths["x2"], "z")],
    }
    sigs = {p: signature(p) for p in paths.values()}
    pairs = find_near_duplicates(splits, sigs, max_distance=6)
    found = [(p.path_a.name, p.path_b.name) for p in pairs]
    assert found[0] == ("t0.png", "v0.png") and pairs[0].distance == 0
    assert ("t2.png", "x2.png") in found
    assert all(p.split_a != p.split_b for p in pairs)
    assert [p.distance for p in pairs] == sorted(p.distance for p in pairs)
    assert not find_near_duplicates(splits, sigs, max_distance=0)[1:]  # only the identical one
    # the colour check: the picture in grey has the same dHash but is no near-duplicate
    scene(0).convert("L").convert("RGB").save(tmp_path / "grey.png")
    grey = signature(tmp_path / "grey.png")
    assert isinstance(grey, Signature)
    near = {"train": [(paths["t0"], "a")], "test": [(tmp_path / "grey.png", "a")]}
    both = {**sigs, tmp_path / "grey.png": grey}
    assert grey.dhash == sigs[paths["t0"]].dhash  # type: ignore[union-attr]
    assert not find_near_duplicates(near, both, max_distance=0)
    assert find_near_duplicates(near, both, max_distance=0, max_mean_diff=255.0)
    with pytest.raises(ValueError, match="max_distance"):
        find_near_duplicates(splits, sigs, max_distance=65)
    fig = plot_near_duplicates(pairs)
    fig.savefig(tmp_path / "sheet.png")
    assert (tmp_path / "sheet.png").stat().st_size > 1000


def test_check_index_reports_a_leak_and_can_raise(tmp_path: Path) -> None:
    root = write_jsonl_dataset(tmp_path / "d", ("a", "b"), {"train": 2, "valid": 1, "test": 1})
    for seed, image in enumerate(sorted(root.glob("*/*.jpg"))):
        scene(10 + seed).save(image, quality=95)  # textured, all different
    # Leak: the test image of class "a" is a re-encode of a train image.
    Image.open(root / "train" / "c00_001.jpg").save(root / "test" / "c00_000.jpg", quality=60)
    index = index_dataset(root)
    facts = check_images(all_paths(index), cache=cache_file(root))
    check = check_index(index, facts, max_distance=2)
    assert check is not None
    leaked = [p for p in check.pairs if p.path_b.name == "c00_000.jpg" and p.split_b == "test"]
    assert [p.path_a.name for p in leaked] == ["c00_001.jpg"]
    assert len(check.pairs) == 1
    report = check.report
    assert report["pairs"] == len(check.pairs) and report["max_distance"] == 2
    json.dumps(report)  # JSON-ready
    assert "cross-split pair" in check.summary()
    check.raise_if_leaking(False, tmp_path)  # reporting only
    with pytest.raises(DataError, match=f"near-duplicate leak.*{SHEET_FILE}"):
        check.raise_if_leaking(True, tmp_path)
    assert check_index(index, facts, max_distance=-1) is None


def decoded_again(path: Path) -> Signature | str:
    """The signature as the report computed it before the check carried it: a second decode of
    its own (``Image.open(path).convert("RGB")``)."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except OSError as err:
        return f"cannot decode: {err}"
    return image_signature(rgb)


def test_signatures_from_the_check_pair_like_a_second_decode_and_decode_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_jsonl_dataset(tmp_path / "d", ("a", "b", "c"), {"train": 4, "valid": 2, "test": 2})
    for seed, image in enumerate(sorted(root.glob("*/*.jpg"))):
        scene(20 + seed).save(image, quality=95)
    train = root / "train"
    # A re-encode (test), a one-pixel shift (valid), the same picture in grey (same dHash, other
    # colours: no pair), a flat image (skipped) and a truncated file (skipped).
    Image.open(train / "c00_001.jpg").save(root / "test" / "c00_000.jpg", quality=60)
    shifted = Image.open(train / "c01_002.jpg").crop((1, 0, 64, 48)).resize((64, 48))
    shifted.save(root / "valid" / "c01_000.jpg", quality=95)
    Image.open(train / "c02_003.jpg").convert("L").save(root / "valid" / "c02_001.jpg")
    Image.new("RGB", (64, 48), (90, 90, 200)).save(root / "test" / "c02_000.jpg")
    data = (root / "test" / "c01_001.jpg").read_bytes()
    (root / "test" / "c01_001.jpg").write_bytes(data[: len(data) // 2])
    index = index_dataset(root, check_images=False)
    splits = {s.name: [(x.path, x.label) for x in s.samples] for s in index.splits.values()}
    again = {p: decoded_again(p) for samples in splits.values() for p, _ in samples}
    expected = find_near_duplicates(splits, again, 8)

    decodes = count_decodes(monkeypatch)
    cache = cache_file(root)
    cold = check_index(index, check_images(all_paths(index), cache=cache), 8)
    assert cold is not None and len(decodes) == len(again)
    assert [p.as_dict() for p in cold.pairs] == [p.as_dict() for p in expected]
    found = {(p.path_a.name, p.split_b, p.path_b.name) for p in cold.pairs}
    assert {
        ("c00_001.jpg", "test", "c00_000.jpg"),
        ("c01_002.jpg", "valid", "c01_000.jpg"),
    } <= found
    assert ("c02_003.jpg", "valid", "c02_001.jpg") not in found
    report = cold.report
    assert (report["flat_files_skipped"], report["undecodable_files_skipped"]) == (1, 1)
    assert report == near_duplicate_report(expected, again, 8)

    # A second check over unchanged files opens no image: everything comes from the cache.
    decodes.clear()

    def no_open(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"an image was opened: {args}")

    monkeypatch.setattr(Image, "open", no_open)
    warm = check_index(index, check_images(all_paths(index), cache=cache), 8)
    assert decodes == [] and warm is not None
    assert warm.pairs == cold.pairs and warm.report == report
