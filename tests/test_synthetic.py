"""Tests for the synthetic jersey dataset generator (layout, counts, determinism, visibility)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import classifier_training.data.synthetic as synthetic
import classifier_training.data.synthetic_render as synthetic_render
from classifier_training.data.synthetic import (
    DEFAULT_LABELS,
    SPLITS,
    SyntheticDatasetError,
    ensure_synthetic,
    generate,
    long_tail_counts,
    main,
)
from classifier_training.data.synthetic_render import (
    JERSEY_COLORS,
    draws_digits,
    font_dir,
    render,
    usable_fonts,
)
from classifier_training.recipe import SyntheticConfig

SMALL_LABELS = ["7", "0", "23", "00"]
SMALL: dict[str, Any] = {
    "labels": SMALL_LABELS,
    "train_per_class": 3,
    "valid_per_class": 2,
    "test_per_class": 1,
    "image_size": 32,
}


def config(**fields: Any) -> SyntheticConfig:
    """The SMALL dataset with ``fields`` changed."""
    return SyntheticConfig(**{**SMALL, **fields})


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def read_records(jsonl: Path) -> list[dict[str, Any]]:
    lines = jsonl.read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("synth") / "jerseys"
    return out, generate(out, config())


def test_default_labels_are_42_sorted_plain_strings() -> None:
    assert isinstance(DEFAULT_LABELS, tuple)
    assert len(DEFAULT_LABELS) == 42
    assert len(set(DEFAULT_LABELS)) == 42
    assert list(DEFAULT_LABELS) == sorted(DEFAULT_LABELS)
    assert DEFAULT_LABELS[:5] == ("0", "00", "1", "10", "11")  # string order: "10" < "2"
    known = {"0", "00", "1", "2", "4", "5", "6", "8", "10", "11", "18", "20", "22", "26", "30"}
    assert known | {"35", "46"} <= set(DEFAULT_LABELS)
    assert all(label.isdigit() and len(label) <= 2 for label in DEFAULT_LABELS)


def test_layout_and_record_format(small_dataset: tuple[Path, dict[str, Any]]) -> None:
    out, summary = small_dataset
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "test", "train", "valid"]
    assert json.loads((out / "dataset.json").read_text()) == summary
    assert summary["labels"] == sorted(SMALL_LABELS)
    for split in SPLITS:
        jsonl = out / split / "annotations.jsonl"
        records = read_records(jsonl)
        images = sorted(p.relative_to(out / split).as_posix() for p in (out / split).rglob("*.jpg"))
        assert sorted(r["image"] for r in records) == images  # one record per file, no strays
        for record in records:
            assert set(record) == {"image", "prefix", "suffix", "metadata"}
            assert record["prefix"] == "Read the number."
            assert record["suffix"] in SMALL_LABELS
            assert record["image"].startswith("images/synth_")
            meta = record["metadata"]
            assert set(meta) == {"jersey_color", "number_color", "border"}
            assert meta["jersey_color"] in JERSEY_COLORS
            assert meta["border"] is True
            with Image.open(jsonl.parent / record["image"]) as image:
                assert image.format == "JPEG"
                assert image.mode == "RGB"
                assert image.size == (32, 32)


def test_counts_per_split_and_class(small_dataset: tuple[Path, dict[str, Any]]) -> None:
    out, summary = small_dataset
    expected = {"train": 3, "valid": 2, "test": 1}
    for split, per_class in expected.items():
        suffixes = [r["suffix"] for r in read_records(out / split / "annotations.jsonl")]
        counts = {label: suffixes.count(label) for label in SMALL_LABELS}
        assert counts == dict.fromkeys(SMALL_LABELS, per_class)
        assert summary["splits"][split]["total"] == per_class * len(SMALL_LABELS)
        assert summary["splits"][split]["per_class"] == dict.fromkeys(
            sorted(SMALL_LABELS), per_class
        )


def test_long_tail_counts_fall_about_60x() -> None:
    counts = long_tail_counts(DEFAULT_LABELS, 60, seed=0)
    assert list(counts) == list(DEFAULT_LABELS)
    assert max(counts.values()) == 60
    assert min(counts.values()) == 1
    assert long_tail_counts(DEFAULT_LABELS, 60, seed=0) == counts
    assert long_tail_counts(DEFAULT_LABELS, 60, seed=1) != counts  # order follows the seed
    ranked = sorted(counts.values(), reverse=True)
    geometric = [60 * (1 / 60) ** (k / 41) for k in range(42)]
    assert all(abs(n - g) <= 0.5 for n, g in zip(ranked, geometric, strict=True))


def test_long_tail_dataset_ratio_and_balanced_eval(tmp_path: Path) -> None:
    labels = [str(n) for n in range(8)]
    summary = generate(
        tmp_path / "lt",
        SyntheticConfig(
            labels=labels,
            train_per_class=120,
            valid_per_class=2,
            test_per_class=1,
            image_size=16,
            long_tail=True,
        ),
    )
    suffixes = [r["suffix"] for r in read_records(tmp_path / "lt" / "train" / "annotations.jsonl")]
    train = {label: suffixes.count(label) for label in labels}
    assert train == summary["splits"]["train"]["per_class"]
    assert max(train.values()) == 120
    assert 40 <= max(train.values()) / min(train.values()) <= 80
    assert summary["splits"]["valid"]["per_class"] == dict.fromkeys(labels, 2)
    assert summary["splits"]["test"]["per_class"] == dict.fromkeys(labels, 1)


def test_same_seed_same_bytes_other_seed_differs(
    tmp_path: Path, small_dataset: tuple[Path, dict[str, Any]]
) -> None:
    first, _ = small_dataset
    generate(tmp_path / "again", config())
    generate(tmp_path / "seed1", config(seed=1))
    assert tree_digest(tmp_path / "again") == tree_digest(first)
    assert tree_digest(tmp_path / "seed1") != tree_digest(first)


def test_changing_one_count_does_not_reshuffle_other_images(
    tmp_path: Path, small_dataset: tuple[Path, dict[str, Any]]
) -> None:
    first, _ = small_dataset
    generate(tmp_path / "more", config(train_per_class=5, labels=["0", "7"]))
    for name in ("synth_0_00002.jpg", "synth_7_00000.jpg"):
        old = (first / "train" / "images" / name).read_bytes()
        assert (tmp_path / "more" / "train" / "images" / name).read_bytes() == old
    assert (first / "valid" / "images" / "synth_7_00001.jpg").read_bytes() == (
        tmp_path / "more" / "valid" / "images" / "synth_7_00001.jpg"
    ).read_bytes()


def _blank_number_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Render the same crop without its number (same random draws, masks zeroed)."""
    real = synthetic_render._number_masks

    def blank(label: str, font_path: Path, rng: np.random.Generator, size: int) -> Any:
        outer, _ = real(label, font_path, rng, size)
        return np.zeros_like(outer), np.zeros_like(outer)

    monkeypatch.setattr(synthetic_render, "_number_masks", blank)


@pytest.mark.parametrize("jersey", sorted(JERSEY_COLORS))
def test_number_is_visible_on_every_jersey(jersey: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for seed in range(6):
        for label in ("1", "8", "00"):
            image, meta = render(label, np.random.default_rng(seed), 32, jersey_color=jersey)
            assert meta["jersey_color"] == jersey
            with_number = np.asarray(image, dtype=np.float64)
            assert with_number.std() > 5.0
            with monkeypatch.context() as patch:
                _blank_number_masks(patch)
                blank, _ = render(label, np.random.default_rng(seed), 32, jersey_color=jersey)
            distance = np.linalg.norm(with_number - np.asarray(blank, np.float64), axis=2)
            # >= 3% of the pixels move by > 60 in RGB (measured minimum over 180 crops: 4.1%).
            assert (distance > 60).mean() >= 0.03, (jersey, seed, label)


def test_different_labels_render_differently() -> None:
    one, _ = render("1", np.random.default_rng(3), 32)
    eight, _ = render("8", np.random.default_rng(3), 32)
    same, _ = render("1", np.random.default_rng(3), 32)
    assert np.array_equal(np.asarray(one), np.asarray(same))
    assert np.abs(np.asarray(one, np.int16) - np.asarray(eight, np.int16)).mean() > 3.0


def test_number_colour_contrasts_with_jersey() -> None:
    for seed in range(200):
        _, meta = render("5", np.random.default_rng(seed), 16)
        assert meta["number_color"] != meta["jersey_color"]
        assert (meta["jersey_color"], meta["number_color"]) not in {
            ("red", "orange"),
            ("maroon", "orange"),
            ("orange", "red"),
        }


def test_render_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="string of digits"):
        render("A1", rng)
    with pytest.raises(ValueError, match="more than 3 digits"):
        render("1234", rng)
    with pytest.raises(ValueError, match="jersey_color='teal'"):
        render("1", rng, jersey_color="teal")
    with pytest.raises(ValueError, match="does not contrast with a white jersey"):
        render("1", rng, jersey_color="white", number_color="white")
    with pytest.raises(ValueError, match=">= 16 px"):
        render("1", rng, 8)
    with pytest.raises(ValueError, match="no such TrueType file"):
        render("1", rng, font=Path("/nonexistent/font.ttf"))


def test_generate_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicates"):
        generate(tmp_path / "a", config(labels=["1", "1"]))
    with pytest.raises(ValueError, match="string of digits"):
        generate(tmp_path / "a", config(labels=["1", "A"]))
    with pytest.raises(ValueError, match="not one string"):
        generate(tmp_path / "a", config(labels="12"))
    with pytest.raises(ValueError, match="seed=-1"):
        generate(tmp_path / "a", config(seed=-1))
    with pytest.raises(ValueError, match="train_per_class=0"):
        generate(tmp_path / "a", config(train_per_class=0))
    with pytest.raises(ValueError, match="image_size=8"):
        generate(tmp_path / "a", config(image_size=8))
    assert not (tmp_path / "a").exists()


def test_overwrite_protection(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    generate(out, config())
    before = tree_digest(out)
    with pytest.raises(SyntheticDatasetError, match=r"not empty; pass overwrite=True"):
        generate(out, config(seed=5))
    assert tree_digest(out) == before
    generate(out, config(seed=5), overwrite=True)
    assert tree_digest(out) != before
    assert json.loads((out / "dataset.json").read_text())["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no staging or retired copies


def test_overwrite_never_deletes_a_foreign_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(SyntheticDatasetError, match="refusing to delete"):
        generate(foreign, config(), overwrite=True)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    generate(tmp_path / "empty", config())
    assert (tmp_path / "empty" / "train" / "annotations.jsonl").is_file()


def test_interrupted_generation_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = synthetic.render

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render", failing)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "ds", config())
    assert list(tmp_path.iterdir()) == []


def test_ensure_synthetic_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SyntheticConfig(
        train_per_class=2, valid_per_class=1, test_per_class=1, image_size=16, labels=["3", "33"]
    )
    root = tmp_path / "data" / "synthetic-jerseys"
    assert ensure_synthetic(root, cfg) is True
    info = json.loads((root / "dataset.json").read_text())
    assert info["labels"] == ["3", "33"]
    assert info["splits"]["train"]["total"] == 4

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("generate() called for an existing dataset")

    monkeypatch.setattr(synthetic, "generate", must_not_run)
    assert ensure_synthetic(root, cfg) is False


def test_ensure_synthetic_uses_default_labels_when_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def record(out_dir: Path, cfg: SyntheticConfig) -> dict[str, Any]:
        seen["summary"] = synthetic._plan(cfg)
        return {}

    monkeypatch.setattr(synthetic, "generate", record)
    assert ensure_synthetic(tmp_path / "x", SyntheticConfig()) is True
    summary = seen["summary"]
    assert tuple(summary["labels"]) == DEFAULT_LABELS
    assert summary["train_per_class"] == 60 and summary["image_size"] == 64
    assert summary["seed"] == 0 and summary["splits"]["train"]["total"] == 42 * 60


def test_fonts_draw_digits_and_junk_fonts_are_rejected() -> None:
    fonts = usable_fonts()
    assert len(fonts) >= 5
    assert all(path.parent == font_dir() for path in fonts)
    for junk in ("LastResortHE-Regular.ttf", "cmsy10.ttf", "DejaVuSansDisplay.ttf"):
        if (font_dir() / junk).is_file():
            assert not draws_digits(font_dir() / junk), junk


def test_cli_prints_summary_and_refuses_existing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--out", str(tmp_path / "cli"), "--labels", "9", "1", "--image-size", "16"]
    args += ["--train-per-class", "2", "--valid-per-class", "1", "--test-per-class", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "valid" in printed and "test" in printed
    assert json.loads((tmp_path / "cli" / "dataset.json").read_text())["labels"] == ["1", "9"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--long-tail", "--seed", "3"]) == 0
    info = json.loads((tmp_path / "cli" / "dataset.json").read_text())
    assert info["long_tail"] is True and info["seed"] == 3 and info["image_size"] == 16
    assert main([*args, "--overwrite", "--image_size", "8"]) == 2  # underscores work too
    assert "image_size=8" in capsys.readouterr().err


def test_cli_help_is_the_config_docs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in ("--train_per_class", "--long_tail", "--labels", "--out", "--overwrite"):
        assert name in out
    assert "Train images per class (the largest class under ``long_tail``)." in out


def test_ensure_synthetic_keeps_a_dataset_another_process_finished_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ds"
    cfg = SyntheticConfig(
        train_per_class=1, valid_per_class=1, test_per_class=1, image_size=16, labels=["5"]
    )
    real_write_split = synthetic._write_split
    raced: list[bool] = []

    def racing(split_dir: Path, split: str, counts: dict[str, int], **kwargs: Any) -> None:
        real_write_split(split_dir, split, counts, **kwargs)
        if split == "test" and not raced:  # the other process moves its copy in just before us
            raced.append(True)
            generate(root, dataclasses.replace(cfg, seed=9))

    monkeypatch.setattr(synthetic, "_write_split", racing)
    assert ensure_synthetic(root, cfg) is False
    assert json.loads((root / "dataset.json").read_text())["seed"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
