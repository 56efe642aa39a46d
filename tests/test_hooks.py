"""Epoch hooks on hand-built FitContexts: files written, contents right, main process only."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from classifier_training import io as cio
from classifier_training.augment.pipeline import BatchAugment
from classifier_training.augment.presets import resolve
from classifier_training.data.dataset import ImageDataset
from classifier_training.data.imbalance import WeightedClassSampler
from classifier_training.data.index import DatasetIndex, index_dataset
from classifier_training.data.synthetic import DEFAULT_LABELS
from classifier_training.evaluation import EvalResult
from classifier_training.hooks import HOOKS, build_hooks, run_hooks
from classifier_training.hooks import history as history_module
from classifier_training.hooks.base import FitContext, Hook
from classifier_training.hooks.confusion_matrix import ConfusionMatrixHook, confusion_counts
from classifier_training.hooks.export import ExportHook
from classifier_training.hooks.history import HistoryHook
from classifier_training.hooks.model_info import ModelInfoHook, model_info
from classifier_training.hooks.sample_predictions import SamplePredictionsHook, select_samples
from classifier_training.hooks.sampler_distribution import SamplerDistributionHook
from classifier_training.recipe import AugmentConfig, DataConfig, HooksConfig, Recipe, load_recipe
from conftest import write_jsonl_dataset
from test_onnx_export import make_run

SIZE = 32
CLASSES = ("0", "00", "1", "10", "2")


def fake_accelerator(main: bool = True) -> Any:
    """What hooks use of an Accelerator: is_main_process, device, print, unwrap_model."""
    printed: list[str] = []
    return SimpleNamespace(
        is_main_process=main,
        device=torch.device("cpu"),
        print=lambda *a, **k: printed.append(" ".join(map(str, a))),
        unwrap_model=lambda m: m,
        set_trigger=lambda: None,
        check_trigger=lambda: False,
        printed=printed,
    )


def make_ctx(
    run_dir: Path,
    *,
    class_names: tuple[str, ...] = CLASSES,
    index: DatasetIndex | None = None,
    loaders: Any = None,
    model: torch.nn.Module | None = None,
    augment: Any = None,
    recipe: Recipe | None = None,
    main: bool = True,
) -> FitContext:
    logged: dict[str, Path] = {}
    logged_metrics: dict[str, float] = {}
    ctx = FitContext(
        recipe=recipe or Recipe(data=DataConfig(image_size=SIZE)),
        accelerator=fake_accelerator(main),
        run_dir=run_dir,
        index=cast(Any, index),
        loaders=loaders,
        model=model or torch.nn.Identity(),
        ema=None,
        augment=augment,
        class_names=list(class_names),
        log_images=logged.update,
        log_metrics=logged_metrics.update,
    )
    ctx.extra["logged"] = logged
    ctx.extra["logged_metrics"] = logged_metrics
    return ctx


def assert_png(path: Path, min_side: int = 200) -> tuple[int, int]:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side
        return im.size


def eval_result(targets: list[int], preds: list[int], num_classes: int) -> EvalResult:
    logits = torch.full((len(targets), num_classes), -2.0)
    logits[torch.arange(len(preds)), torch.tensor(preds)] = 3.0
    return EvalResult(
        split="val",
        weights="ema",
        loss=0.5,
        logits=logits,
        targets=torch.tensor(targets),
        indices=torch.arange(len(targets)),
    )


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_matches_the_recipe_defaults() -> None:
    assert set(HOOKS) == set(HooksConfig().enabled)
    hooks = build_hooks(["history", "export"])
    assert [h.name for h in hooks] == ["history", "export"]
    assert all(isinstance(h, Hook) for h in hooks)
    with pytest.raises(ValueError, match=r"unknown hook.*'nope'.*valid hooks: dataset_stats"):
        build_hooks(["history", "nope"])
    with pytest.raises(ValueError, match="listed twice"):
        build_hooks(["history", "history"])


# ---------------------------------------------------------------------------------------------
# Confusion matrix


def confusion_case(num_classes: int) -> tuple[list[int], list[int]]:
    """6 samples per class; class 1 is mostly read as class 2, every 5th class loses one."""
    targets, preds = [], []
    for c in range(num_classes):
        for k in range(6):
            targets.append(c)
            if c == 1 and k < 4:
                preds.append(2)
            elif c % 5 == 0 and k == 0:
                preds.append((c + 3) % num_classes)
            else:
                preds.append(c)
    return targets, preds


def test_confusion_matrix_at_42_classes(tmp_path: Path) -> None:
    names = DEFAULT_LABELS
    assert len(names) == 42
    targets, preds = confusion_case(len(names))
    ctx = make_ctx(tmp_path, class_names=names)
    ctx.epoch, ctx.is_last_epoch = 0, True
    ctx.best_checkpoint = tmp_path / "checkpoints" / "epoch-001"  # the best and last epoch
    ctx.evals = {"val": eval_result(targets, preds, len(names))}
    ConfusionMatrixHook().on_epoch_end(ctx)
    ctx.background.wait()  # the figures' tracker images are logged once written
    out = tmp_path / "epochs" / "001"
    assert_png(out / "confusion_matrix.png", min_side=1500)
    assert_png(out / "confusion_matrix_normalized.png", min_side=1500)
    pairs = json.loads((out / "confused_pairs.json").read_text())
    assert pairs["epoch"] == 1 and pairs["weights"] == "ema"
    top = pairs["pairs"][0]
    assert (top["true"], top["predicted"], top["count"]) == (names[1], names[2], 4)
    assert top["rate"] == pytest.approx(4 / 6)
    counts = [p["count"] for p in pairs["pairs"]]
    assert counts == sorted(counts, reverse=True)
    assert any("most confused" in line for line in ctx.accelerator.printed)
    assert set(ctx.extra["logged"]) == {"val/confusion_matrix", "val/confusion_matrix_normalized"}


def test_a_best_only_epoch_is_drawn_at_the_end_if_it_is_still_the_best(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, recipe=Recipe(hooks=HooksConfig(confusion_every=0)))
    hook = ConfusionMatrixHook()
    epochs = tmp_path / "epochs"
    for epoch, preds in enumerate(([0, 0, 2], [0, 1, 1], [0, 2, 2])):
        ctx.epoch, ctx.is_last_epoch = epoch, epoch == 2
        ctx.best_checkpoint = tmp_path / "checkpoints" / f"epoch-{min(epoch, 1) + 1:03d}"
        ctx.evals = {"val": eval_result([0, 1, 2], preds, len(CLASSES))}
        hook.on_epoch_end(ctx)
        ctx.background.wait()
        if epoch == 0:  # the best so far: its counts are recorded, the drawing waits
            record = json.loads((epochs / "001" / "confused_pairs.json").read_text())
            assert [row[:3] for row in record["counts"][:3]] == [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
            assert not (epochs / "001" / "confusion_matrix.png").exists()
    assert not (epochs / "001" / "confused_pairs.json").exists()  # epoch 2 became the best
    for folder in ("002", "003"):  # the best (drawn at the end from its record) and the last
        assert_png(epochs / folder / "confusion_matrix.png")
        assert_png(epochs / folder / "confusion_matrix_normalized.png")
    record = json.loads((epochs / "002" / "confused_pairs.json").read_text())
    assert record["drawn_because"] == ["best"] and record["counts"][1][:3] == [0, 1, 0]

    # After a resume, a fresh hook still draws the best epoch from its record.
    (epochs / "002" / "confusion_matrix.png").unlink()
    ctx.epoch = 3
    ConfusionMatrixHook().on_epoch_end(ctx)
    ctx.background.wait()
    assert_png(epochs / "002" / "confusion_matrix.png")


def test_confusion_counts_rows_are_true_classes() -> None:
    cm = confusion_counts(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_confusion_matrix_every_n_epochs_and_always_the_last(tmp_path: Path) -> None:
    recipe = Recipe(hooks=HooksConfig(confusion_every=2))
    ctx = make_ctx(tmp_path, recipe=recipe)
    ctx.evals = {"val": eval_result([0, 1, 2], [0, 2, 2], len(CLASSES))}
    hook = ConfusionMatrixHook()
    ctx.epoch = 0
    hook.on_epoch_end(ctx)
    assert not (tmp_path / "epochs" / "001" / "confusion_matrix.png").exists()
    ctx.epoch = 1
    hook.on_epoch_end(ctx)
    assert (tmp_path / "epochs" / "002" / "confusion_matrix.png").is_file()
    ctx.epoch, ctx.is_last_epoch = 2, True
    hook.on_epoch_end(ctx)
    assert (tmp_path / "epochs" / "003" / "confusion_matrix.png").is_file()


# ---------------------------------------------------------------------------------------------
# Model info


def test_model_info_counts_flops_exactly_for_a_linear_model(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    model.train()
    info = model_info(model, 16, runs=2)
    assert info["total_params"] == 768 * 10 + 10
    assert info["trainable_params"] == info["total_params"]
    assert info["gflops"] == pytest.approx(2 * 768 * 10 / 1e9)
    assert info["size_mb"] == pytest.approx((768 * 10 + 10) * 4 / 2**20)
    assert info["cpu_latency_ms"] > 0
    assert model.training  # the hook works on a copy

    ctx = make_ctx(tmp_path, model=model, recipe=Recipe(data=DataConfig(image_size=16)))
    ModelInfoHook().on_fit_start(ctx)
    written = json.loads((tmp_path / "model_info.json").read_text())
    assert written["total_params"] == 7690 and written["num_classes"] == len(CLASSES)
    assert any("GFLOPs" in line for line in ctx.accelerator.printed)


SEEN_DTYPES: list[torch.dtype] = []


class DtypeProbe(torch.nn.Module):
    """Records the dtype its layer computes in (a module-level list: model_info runs a copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.lin(x.flatten(1))
        SEEN_DTYPES.append(y.dtype)
        return y


def test_model_info_times_the_fp32_model_not_the_mixed_precision_wrapper() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        model = Accelerator(cpu=True, mixed_precision="bf16").prepare(DtypeProbe())
        SEEN_DTYPES.clear()
        model_info(model, 4, runs=1)
        assert SEEN_DTYPES and set(SEEN_DTYPES) == {torch.float32}  # as deployed
        model(torch.zeros(1, 3, 4, 4))
        assert SEEN_DTYPES[-1] == torch.bfloat16  # the training model keeps its autocast
    finally:
        AcceleratorState._reset_state(True)


# ---------------------------------------------------------------------------------------------
# History


def metrics_row(e: int) -> dict[str, float]:
    return {
        "epoch": float(e),
        "train/loss": 2.0 / e,
        "train/acc_top1": 0.2 * e,
        "train/lr": 1e-3 * e,
        "val/loss": 2.2 / e,
        "val/acc_top1": 0.15 * e,
        "val/acc_top5": 0.3 * e,
        "val_raw/acc_top1": 0.14 * e,
        "val_ema/acc_top1": 0.15 * e,
        "val_raw/loss": 2.3 / e,
        "val_ema/loss": 2.2 / e,
    }


def test_history_includes_the_current_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = tmp_path / "metrics.jsonl"
    figures: dict[str, Figure] = {}
    real_save: Callable[[Figure, Path], Path] = cio.save_figure

    def capture(fig: Figure, path: Path, dpi: int = 150) -> Path:
        figures[path.name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(history_module, "save_figure", capture)
    ctx = make_ctx(tmp_path)
    hook = HistoryHook()
    for k in (1, 2, 3):
        with metrics.open("a") as fh:  # the engine appends epoch k's line, then calls hooks
            fh.write(json.dumps(metrics_row(k)) + "\n")
        ctx.epoch = k - 1
        hook.on_epoch_end(ctx)
        for name in ("loss.png", "accuracy.png", "lr.png"):
            assert_png(tmp_path / "history" / name)
            lines = figures[name].axes[0].get_lines()
            assert lines and all(max(np.asarray(line.get_xdata())) == k for line in lines)
    labels = {line.get_label() for line in figures["accuracy.png"].axes[0].get_lines()}
    assert labels == {
        "train/acc_top1",
        "val/acc_top1 (selected weights)",
        "val/acc_top5 (selected weights)",
        "val_raw/acc_top1",
        "val_ema/acc_top1",
    }
    labels = {line.get_label() for line in figures["loss.png"].axes[0].get_lines()}
    assert labels == {"train/loss", "val/loss (selected weights)", "val_raw/loss", "val_ema/loss"}


def test_history_redrawn_into_kept_axes_equals_a_fresh_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The figures are kept between epochs and emptied: same lines, colours, limits as new."""
    saved: list[dict[str, Figure]] = [{}, {}]
    real_save = cio.save_figure

    def capture(fig: Figure, path: Path, dpi: int = 150) -> Path:
        saved[1 if path.name in saved[0] else 0][path.name] = fig
        return real_save(fig, path, dpi=dpi)

    monkeypatch.setattr(history_module, "save_figure", capture)
    long = [metrics_row(e) for e in range(1, 40)]
    short = [{k: v for k, v in metrics_row(e).items() if "raw" not in k} for e in (1, 2, 3)]
    history_module.write_history_figures(long, None, tmp_path)
    history_module.write_history_figures(short, None, tmp_path)

    def summary(ax: Any) -> list[tuple[Any, ...]]:
        return [
            (ln.get_label(), ln.get_color(), list(ln.get_xdata()), list(ln.get_ydata()))
            for ln in ax.get_lines()
        ]

    for name, keys, log_y in (
        ("loss.png", history_module.LOSS_KEYS, False),
        ("accuracy.png", history_module.ACC_KEYS, False),
        ("lr.png", history_module.LR_KEYS, True),
    ):
        assert saved[0][name] is saved[1][name]  # the same Figure, redrawn
        redrawn = saved[1][name].axes[0]
        fresh = history_module.plot_series(short, keys, "t", "y", log_y=log_y).axes[0]
        assert len(saved[1][name].axes) == 1
        assert summary(redrawn) == summary(fresh) and summary(fresh)
        assert redrawn.get_ylim() == pytest.approx(fresh.get_ylim())
        assert redrawn.get_yscale() == fresh.get_yscale()
        legend, fresh_legend = redrawn.get_legend(), fresh.get_legend()
        assert legend is not None and fresh_legend is not None
        assert [t.get_text() for t in legend.get_texts()] == [
            t.get_text() for t in fresh_legend.get_texts()
        ]
        assert_png(tmp_path / name)
    # byte for byte: another thread keeps its own figures, so it draws them new
    monkeypatch.setattr(history_module, "save_figure", real_save)
    worker = threading.Thread(
        target=history_module.write_history_figures, args=(short, None, tmp_path / "new")
    )
    worker.start()
    worker.join()
    for name in ("loss.png", "accuracy.png", "lr.png"):
        assert (tmp_path / name).read_bytes() == (tmp_path / "new" / name).read_bytes(), name


def test_history_keeps_the_last_line_of_a_replayed_epoch(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"epoch": 1.0, "train/loss": 9.0}\n{"epoch": 1.0, "train/loss": 1.0}\n{truncated\n'
    )
    rows = history_module.read_history(path)
    assert rows == [{"epoch": 1.0, "train/loss": 1.0}]


def test_history_takes_the_epoch_that_just_ended_from_the_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine writes an epoch's line after the hooks (with their time in it): the hook must
    plot ``ctx.metrics`` for that epoch, and a stale line of it (a replayed epoch) loses."""
    drawn: list[list[dict[str, Any]]] = []
    monkeypatch.setattr(history_module, "save_figure", lambda fig, path, dpi=150: path)
    real_plot = history_module.plot_series

    def spy(rows: list[dict[str, Any]], *args: Any, **kwargs: Any) -> Figure:
        drawn.append(list(rows))
        return real_plot(rows, *args, **kwargs)

    monkeypatch.setattr(history_module, "plot_series", spy)
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(metrics_row(e)) + "\n" for e in (1, 2)) + '{"epoch": 3.0}\n'
    )
    ctx = make_ctx(tmp_path)
    ctx.epoch, ctx.metrics = 2, metrics_row(3)
    HistoryHook().on_epoch_end(ctx)
    ctx.background.wait()
    assert [r["epoch"] for r in drawn[0]] == [1, 2, 3]
    assert drawn[0][-1] == metrics_row(3)


# ---------------------------------------------------------------------------------------------
# Sample predictions


def test_sample_predictions_grid(tmp_path: Path) -> None:
    root = write_jsonl_dataset(tmp_path / "data", CLASSES, {"train": 1, "valid": 2, "test": 1})
    index = index_dataset(root)
    targets = [s.target for s in index.val.samples]
    preds = list(targets)
    preds[1], preds[4] = (targets[1] + 1) % 5, (targets[4] + 2) % 5  # two mistakes
    ev = eval_result(targets, preds, len(CLASSES))
    ctx = make_ctx(tmp_path / "run", index=index, recipe=Recipe(hooks=HooksConfig(sample_grid=6)))
    ctx.epoch = 4
    ctx.evals = {"val": ev}
    SamplePredictionsHook().on_epoch_end(ctx)
    ctx.background.wait()
    assert_png(tmp_path / "run" / "epochs" / "005" / "sample_predictions.png")
    assert "val/sample_predictions" in ctx.extra["logged"]
    mistakes, per_class = select_samples(
        torch.softmax(ev.logits, 1).numpy(), ev.targets.numpy(), list(CLASSES), 6
    )
    assert sorted(mistakes) == [1, 4] and len(per_class) == len(CLASSES)


# ---------------------------------------------------------------------------------------------
# Augmentation preview, sampler distribution


def test_augment_preview(tmp_path: Path) -> None:
    root = write_jsonl_dataset(tmp_path / "data", CLASSES, {"train": 4, "valid": 1, "test": 1})
    index = index_dataset(root)
    train = ImageDataset(index.train.samples, mode="train", image_size=SIZE)
    augment = BatchAugment(resolve(AugmentConfig()), SIZE)
    ctx = make_ctx(
        tmp_path / "run",
        index=index,
        loaders=SimpleNamespace(train_dataset=train),
        augment=augment,
    )
    from classifier_training.hooks.augment_preview import AugmentPreviewHook

    AugmentPreviewHook().on_fit_start(ctx)
    width, _ = assert_png(tmp_path / "run" / "augment_preview.png", min_side=SIZE * 4)
    assert width > 16 * SIZE  # 16 columns of images


def test_sampler_distribution(tmp_path: Path) -> None:
    root = write_jsonl_dataset(
        tmp_path / "data",
        CLASSES,
        {"train": {"0": 8, "00": 2, "1": 2, "10": 2, "2": 2}, "valid": 1, "test": 1},
    )
    index = index_dataset(root)
    targets = index.train.targets
    weights = [1.0 if t == 0 else 4.0 for t in targets]  # 8 vs 4 * 2: equal class shares
    sampler = WeightedClassSampler(weights, num_samples=400, seed=3)
    list(iter(sampler))
    ctx = make_ctx(tmp_path / "run", index=index, loaders=SimpleNamespace(sampler=sampler))
    ctx.epoch = 0
    SamplerDistributionHook().on_epoch_end(ctx)
    data = json.loads(
        (tmp_path / "run" / "epochs" / "001" / "sampler_distribution.json").read_text()
    )
    classes = data["classes"]
    assert data["num_samples"] == 400
    assert sum(c["sampled"] for c in classes.values()) == 400
    assert all(c["expected"] == pytest.approx(80.0) for c in classes.values())
    assert classes["0"]["train_rows"] == 8
    expected = {f"sampler/count/{k}": v["sampled"] for k, v in classes.items()}
    assert ctx.extra["logged_metrics"] == expected
    assert any("Sampler distribution" in line for line in ctx.accelerator.printed)

    quiet = make_ctx(tmp_path / "run2", index=index, loaders=SimpleNamespace(sampler=None))
    SamplerDistributionHook().on_epoch_end(quiet)
    assert not (tmp_path / "run2").exists()


# ---------------------------------------------------------------------------------------------
# Export at fit end; nothing on other processes


def test_export_hook(tmp_path: Path) -> None:
    fake = make_run(tmp_path)
    run: Path = fake["run"]
    recipe = load_recipe(run / "recipe.yaml")
    recipe.export.verify_images = 4
    ctx = make_ctx(run, recipe=recipe)
    ctx.best_checkpoint = run / "checkpoints" / "epoch-001"
    ExportHook().on_fit_end(ctx)
    assert ctx.extra["export_dir"] == run / "export"
    assert (run / "export" / "model.onnx").is_file()
    assert ctx.extra["export_verification"]["top1_agree"] == "4/4"
    assert any("top-1 agrees 4/4" in line for line in ctx.accelerator.printed)


def test_hooks_write_nothing_on_other_processes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ctx = make_ctx(run, main=False, index=cast(Any, None))
    ctx.epoch, ctx.is_last_epoch = 0, True
    ctx.evals = {"val": eval_result([0, 1], [0, 0], len(CLASSES))}
    (run).mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1.0, "train/loss": 1.0}\n')
    hooks = [cls() for cls in HOOKS.values()]
    for phase in ("on_fit_start", "on_epoch_end", "on_fit_end"):
        run_hooks(hooks, phase, ctx)  # type: ignore[arg-type]
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
