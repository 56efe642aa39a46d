"""Honest reports: sample grid, confusion cadence and order, lr per update, results.csv,
augmentation preview classes, near-duplicates in the dataset statistics."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor

from classifier_training.data.index import DataError, index_dataset
from classifier_training.display import natural_key, natural_order
from classifier_training.evaluation import EvalResult
from classifier_training.hooks.augment_preview import spread_over_classes
from classifier_training.hooks.base import FitContext
from classifier_training.hooks.confusion_matrix import (
    ConfusionMatrixHook,
    draw_reasons,
    plot_confusion,
)
from classifier_training.hooks.dataset_stats import DatasetStatsHook
from classifier_training.hooks.history import (
    HistoryHook,
    lr_per_update,
    plot_lr,
    results_csv,
)
from classifier_training.hooks.sample_predictions import (
    BORDER,
    CAPTION_PX,
    COLUMNS,
    GAP,
    MARGIN,
    PITCH,
    RIGHT,
    TILE,
    WRONG,
    SamplePredictionsHook,
    Tile,
    caption,
    panel_tops,
    plot_sample_predictions,
    select_samples,
    tile_origin,
)
from classifier_training.recipe import DataConfig, HooksConfig, Recipe
from conftest import write_jsonl_dataset
from test_near_duplicates import scene

CLASSES = ("0", "00", "1", "10", "2")
SIZE = 32


def ctx_for(run_dir: Path, **kw: Any) -> FitContext:
    printed: list[str] = []
    accelerator = SimpleNamespace(
        is_main_process=True, device=torch.device("cpu"), print=printed.append
    )
    ctx = FitContext(
        recipe=kw.pop("recipe", None) or Recipe(data=DataConfig(image_size=SIZE)),
        accelerator=cast(Any, accelerator),
        run_dir=run_dir,
        index=kw.pop("index", None),
        loaders=kw.pop("loaders", None),
        model=torch.nn.Identity(),
        ema=None,
        augment=kw.pop("augment", None),
        class_names=list(kw.pop("class_names", CLASSES)),
        log_images=lambda images: None,
    )
    ctx.extra["printed"] = printed
    return ctx


def evaluation(logits: np.ndarray, targets: list[int]) -> EvalResult:
    return EvalResult(
        split="val",
        weights="ema",
        loss=0.1,
        logits=torch.tensor(logits, dtype=torch.float32),
        targets=torch.tensor(targets),
        indices=torch.arange(len(targets)),
    )


# ---------------------------------------------------------------------------------------------
# Natural order


def test_natural_order_puts_2_before_10_and_keeps_0_before_00() -> None:
    labels = ["0", "00", "1", "10", "2", "23", "3", "B", "a7"]
    assert [labels[i] for i in natural_order(labels)] == [
        "0",
        "00",
        "1",
        "2",
        "3",
        "10",
        "23",
        "B",
        "a7",
    ]
    assert natural_key("7a") < natural_key("10")


def test_confusion_matrix_is_drawn_in_natural_order() -> None:
    cm = np.diag([1, 2, 3, 4, 5]).astype(np.int64)  # plain-string order 0, 00, 1, 10, 2
    fig = plot_confusion(cm, list(CLASSES), "t", normalize=False)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "00", "1", "2", "10"]
    # the diagonal moved with the labels: "2" (count 5) is now the 4th row
    texts = {(round(t.get_position()[1]), t.get_text()) for t in ax.texts}
    assert (3, "5") in texts and (4, "4") in texts


# ---------------------------------------------------------------------------------------------
# Confusion matrix cadence


def test_draw_reasons() -> None:
    assert draw_reasons(9, 10, False, False) == ["every 10"]
    assert draw_reasons(3, 10, True, False) == ["best"]
    assert draw_reasons(4, 10, False, True) == ["last"]
    assert draw_reasons(4, 0, False, False) == []


def test_confusion_at_best_last_and_every_n_and_old_best_removed(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path, recipe=Recipe(hooks=HooksConfig(confusion_every=3)))
    logits = np.eye(5, dtype=np.float32)
    ctx.evals = {"val": evaluation(logits, [0, 1, 2, 3, 4])}
    hook = ConfusionMatrixHook()
    best_epochs = {0: 1, 1: 2, 2: 2, 3: 2, 4: 2, 5: 6, 6: 6}  # 0-based epoch -> best (1-based)
    drawn_each = []
    for epoch, best in best_epochs.items():
        ctx.epoch = epoch
        ctx.is_last_epoch = epoch == 6
        ctx.best_checkpoint = tmp_path / "checkpoints" / f"epoch-{best:03d}"
        hook.on_epoch_end(ctx)
        drawn_each.append(
            sorted(p.parent.name for p in (tmp_path / "epochs").glob("*/confusion_matrix.png"))
        )
    # epoch 1 (best only) is replaced by epoch 2, which stays the best through epoch 5: both
    # are recorded, neither drawn (a best-only epoch is drawn at the end if still the best)
    assert drawn_each[1] == [] and drawn_each[4] == ["003"]
    drawn = sorted(p.parent.name for p in (tmp_path / "epochs").glob("*/confusion_matrix.png"))
    # epoch 6 is the final best (and every 3); epoch 2 gave way to it; 7 is the last
    assert drawn == ["003", "006", "007"]
    assert not (tmp_path / "epochs" / "002" / "confused_pairs.json").exists()
    info = json.loads((tmp_path / "epochs" / "006" / "confused_pairs.json").read_text())
    assert info["drawn_because"] == ["best", "every 3"]
    assert not (tmp_path / "epochs" / "001" / "confused_pairs.json").exists()


def test_confusion_matrix_at_42_classes_is_readable(tmp_path: Path) -> None:
    n = 42
    names = sorted(str(i) for i in range(n))
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 3, (n, n)) + np.diag(rng.integers(5, 12, n))
    fig = plot_confusion(cm.astype(np.int64), names, "t", normalize=True)
    ax = fig.axes[0]
    assert all(t.get_fontsize() >= 9 for t in ax.get_xticklabels())
    width_in, _ = fig.get_size_inches()
    assert width_in / n >= 0.4  # about 0.4 in (44 px at 110 dpi) per class
    assert [t.get_text() for t in ax.get_yticklabels()][:12] == [str(i) for i in range(12)]


# ---------------------------------------------------------------------------------------------
# Sample grid


def test_select_samples_confident_mistakes_first_then_one_per_class() -> None:
    # rows: target, prediction, confidence
    probs = np.array(
        [
            [0.9, 0.1, 0.0],  # class 0 right
            [0.6, 0.4, 0.0],  # class 1 wrong (0.6)
            [0.05, 0.95, 0.0],  # class 2 wrong, predicted 1 at 0.95
            [0.1, 0.8, 0.1],  # class 1 right
            [0.0, 0.3, 0.7],  # class 2 right
        ]
    )
    targets = np.array([0, 1, 2, 1, 2])
    mistakes, per_class = select_samples(probs, targets, ["10", "2", "3"], max_mistakes=5)
    assert mistakes == [2, 1]
    # natural order of the labels "10", "2", "3" is 2, 3, 10 -> classes 1, 2, 0
    assert per_class == [1, 2, 0]
    assert select_samples(probs, targets, ["10", "2", "3"], max_mistakes=1)[0] == [2]


def test_sample_grid_from_the_index_images(tmp_path: Path) -> None:
    root = write_jsonl_dataset(tmp_path / "data", CLASSES, {"train": 1, "valid": 2, "test": 1})
    index = index_dataset(root)
    n = len(index.val.samples)
    targets = [s.target for s in index.val.samples]
    logits = np.full((n, 5), -1.0, dtype=np.float32)
    logits[np.arange(n), targets] = 2.0
    logits[3, (targets[3] + 1) % 5] = 5.0  # one confident mistake
    ctx = ctx_for(tmp_path / "run", index=index)
    ctx.epoch = 0
    ctx.evals = {"val": evaluation(logits, targets)}
    SamplePredictionsHook().on_epoch_end(ctx)
    assert (tmp_path / "run" / "epochs" / "001" / "sample_predictions.png").is_file()


def _rgb(colour: str) -> tuple[int, int, int]:
    return cast(tuple[int, int, int], ImageColor.getrgb(colour))


def test_sample_sheet_tiles_frames_and_captions() -> None:
    """One image: each tile framed green (right) or red (wrong), the image upscaled nearest."""
    checker = np.kron([[0, 255], [255, 0]], np.ones((4, 4))).astype(np.uint8)  # 8x8, 4px cells
    tiles = [Tile(np.stack([checker] * 3, axis=-1), "2", "10", 0.97)]
    per_class = [Tile(np.zeros((8, 8, 3), np.uint8), c, c, 0.5) for c in CLASSES]
    per_class[1] = Tile(np.full((6, 12), 200, np.uint8), "00", "1", 0.6)  # grey, not square
    assert caption(tiles[0]) == "true 2\npred 10 97%"
    sheet = plot_sample_predictions(tiles, per_class, "grid", total_mistakes=3)
    assert sheet.mode == "RGB" and sheet.width == COLUMNS * PITCH + 2 * MARGIN
    pixels = np.asarray(sheet)
    first, second = panel_tops(len(tiles))
    x, y = tile_origin(first, 0)
    assert tuple(pixels[y, x]) == _rgb(WRONG)
    inner = pixels[y + BORDER : y + BORDER + TILE, x + BORDER : x + BORDER + TILE, 0]
    half = TILE // 2  # nearest-neighbour: two sharp cells per side, no blur
    assert set(np.unique(inner)) == {0, 255}
    assert inner[0, 0] == 0 and inner[0, half] == 255 and inner[half, 0] == 255
    x2, y2 = tile_origin(second, 0)  # the per-class panel: "0" right, green
    assert tuple(pixels[y2, x2]) == _rgb(RIGHT)
    assert tuple(pixels[y2, x2 + PITCH]) == _rgb(WRONG)  # "00" predicted "1"
    grey = pixels[y2 + BORDER : y2 + BORDER + TILE, x2 + PITCH + BORDER + TILE // 2]
    assert tuple(grey[TILE // 2]) == (200, 200, 200) and tuple(grey[0]) == (255, 255, 255)
    # captions are drawn in the tile's colour above it
    above = pixels[y2 - 2 * CAPTION_PX : y2, x2 : x2 + TILE]
    assert (above == _rgb(RIGHT)).all(axis=-1).any()
    empty = plot_sample_predictions([], [], "nothing")
    assert empty.width == sheet.width and empty.height < sheet.height


def test_long_class_names_are_cut_to_their_column() -> None:
    long = Tile(np.zeros((8, 8, 3), np.uint8), "a" * 60, "b" * 60, 0.5)
    sheet = plot_sample_predictions([long], [], "grid")
    x, y = tile_origin(panel_tops(1)[0], 0)
    row = np.asarray(sheet)[y - 2 * CAPTION_PX : y]
    red = np.flatnonzero((row == _rgb(WRONG)).all(axis=-1).any(axis=0))
    assert red.min() >= x - GAP // 2 and red.max() < x - GAP // 2 + PITCH


# ---------------------------------------------------------------------------------------------
# History: lr per update, results.csv


def test_lr_per_update_shows_the_warmup() -> None:
    recipe = Recipe()
    recipe.train.epochs, recipe.schedule.warmup_epochs, recipe.optim.lr = 4, 1.0, 1e-2
    lrs = lr_per_update(recipe, updates_per_epoch=10)
    assert len(lrs) == 41
    assert lrs[0] == pytest.approx(1e-2 * recipe.schedule.warmup_lr_factor)
    assert lrs[5] == pytest.approx((lrs[0] + 1e-2) / 2)  # linear warmup, half way
    assert max(lrs) == pytest.approx(1e-2) and lrs.index(max(lrs)) == 10
    assert lrs[-1] == pytest.approx(1e-2 * recipe.schedule.min_lr_factor, rel=1e-3)
    fig = plot_lr(lrs, 20, 10, 10, [(10.0, lrs[10]), (20.0, lrs[20])])
    lines = fig.axes[0].get_lines()
    assert len(lines[0].get_xdata()) == 21  # one point per update done


def test_history_writes_results_csv_and_lr_per_update(tmp_path: Path) -> None:
    recipe = Recipe()
    recipe.train.epochs, recipe.schedule.warmup_epochs = 3, 1.0
    lrs = lr_per_update(recipe, updates_per_epoch=7)
    rows = [
        {"epoch": float(e), "updates": float(7 * e), "train/lr": lrs[7 * e], "train/loss": 1.0 / e}
        for e in (1, 2)
    ]
    rows[1]["val/acc_class/10"] = 0.5
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = ctx_for(tmp_path, recipe=recipe)
    HistoryHook().on_epoch_end(ctx)
    with (tmp_path / "results.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0])[:2] == ["epoch", "updates"]
    assert list(table[0])[-1] == "val/acc_class/10"
    assert [float(r["train/loss"]) for r in table] == [1.0, 0.5]
    assert table[0]["val/acc_class/10"] == ""
    assert (tmp_path / "history" / "lr.png").is_file()
    assert results_csv([]) == "\n"


# ---------------------------------------------------------------------------------------------
# Augmentation preview, near-duplicates in the dataset statistics


def test_preview_spreads_over_classes() -> None:
    targets = [0] * 50 + [1] * 3 + [2] * 50
    picks = spread_over_classes(targets, 7)
    assert sorted({targets[i] for i in picks}) == [0, 1, 2]
    assert picks[:3] == [0, 50, 53]
    many = [c for c in range(42) for _ in range(3)]
    picks = spread_over_classes(many, 16)
    assert len({many[i] for i in picks}) == 16


def test_dataset_stats_reports_near_duplicates_and_can_stop(tmp_path: Path) -> None:
    root = write_jsonl_dataset(tmp_path / "data", CLASSES, {"train": 2, "valid": 1, "test": 1})
    for seed, image in enumerate(sorted(root.glob("*/*.jpg"))):
        scene(100 + seed).save(image, quality=95)
    Image.open(root / "train" / "c01_000.jpg").save(root / "test" / "c01_000.jpg", quality=50)
    index = index_dataset(root)
    loaders = SimpleNamespace(train=SimpleNamespace(drop_last=False))
    ctx = ctx_for(tmp_path / "run", index=index, loaders=loaders)
    DatasetStatsHook().on_fit_start(ctx)
    stats = json.loads((tmp_path / "run" / "dataset_stats.json").read_text())
    near = stats["near_duplicates"]
    assert near["pairs"] == 1 and near["pairs_by_splits"] == {"train/test": 1}
    assert near["closest"][0]["a"]["path"].endswith("train/c01_000.jpg")
    assert (tmp_path / "run" / "dataset_near_duplicates.png").is_file()
    assert any("1 cross-split pair" in line for line in ctx.extra["printed"])

    strict = ctx_for(
        tmp_path / "run2",
        index=index,
        loaders=loaders,
        recipe=Recipe(hooks=HooksConfig(fail_on_near_duplicates=True)),
    )
    with pytest.raises(DataError, match="near-duplicate leak: 1 image pair"):
        DatasetStatsHook().on_fit_start(strict)
    assert (tmp_path / "run2" / "dataset_stats.json").is_file()  # the report is still written
