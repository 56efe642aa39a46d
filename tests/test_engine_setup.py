"""``setup`` builds the frozen run bundle; the step loop moves on real updates only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from classifier_training.checkpoint import TrainerState
from classifier_training.engine.loop import LoopCallback, periodic_due, train_one_epoch
from classifier_training.engine.setup import Run, setup
from classifier_training.recipe import Recipe, parse_recipe
from conftest import write_jsonl_dataset

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
CLASSES = ("0", "1", "7")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return write_jsonl_dataset(root, CLASSES, {"train": 4, "valid": 2, "test": 1}, size=(32, 32))


def recipe_for(data: Path, out: Path, *extra: str) -> Recipe:
    return parse_recipe(
        [
            *("--data.root", str(data), "--data.image_size", "32", "--data.batch_size", "4"),
            *("--data.num_workers", "0", "--model.arch", "test_resnet"),
            *("--model.pretrained", "false", "--train.epochs", "2"),
            *("--train.output_dir", str(out), "--train.mixed_precision", "no"),
            *("--logging.progress", "off", "--hooks.enabled", *extra),
        ]
    )


def test_setup_builds_a_frozen_bundle(data: Path, tmp_path: Path) -> None:
    run, state = setup(recipe_for(data, tmp_path / "run"))
    assert isinstance(run, Run)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.model = torch.nn.Identity()  # type: ignore[misc]
    assert state == TrainerState()
    assert run.class_names == list(CLASSES)
    assert run.batches_per_epoch == 3  # 12 train rows / batch 4
    assert run.selected == "ema" and run.ema is not None and run.ema_module() is run.ema.module
    assert run.test_loader is not None and len(run.test_loader) == 1
    assert run.hooks == ()
    assert run.ctx.model is run.model and run.ctx.class_names == run.class_names
    assert (run.run_dir / "recipe.yaml").is_file()
    mapping = json.loads((run.run_dir / "labels_mapping.json").read_text())
    assert mapping  # written by the main process at setup


def test_setup_restores_state_and_schedule_on_resume(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run, state = setup(recipe_for(data, out))
    state.epoch, state.updates = 1, 3
    run.checkpoints.save(run.accelerator, "epoch-001", state, run.ema_module(), 0.5)
    run.guard.close()  # releases the run folder's lock (train() does it on the way out)
    AcceleratorState._reset_state(True)

    resumed, restored = setup(recipe_for(data, out, "--train.resume", "auto"))
    assert (restored.epoch, restored.updates) == (1, 3)
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=resumed.recipe.optim.lr)
    sched = type(resumed.scheduler)(fresh, **_scheduler_args(resumed))
    sched.step_update(3)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.param_groups[0]["lr"])


def _scheduler_args(run: Run) -> dict[str, object]:
    s = run.scheduler
    keys = ("t_initial", "lr_min", "warmup_t", "warmup_lr_init", "warmup_prefix", "t_in_epochs")
    return {k: getattr(s, k) for k in keys}


class Counter(LoopCallback):
    def __init__(self) -> None:
        self.updated: list[bool] = []

    def on_batch_end(self, state: TrainerState, updated: bool) -> None:
        self.updated.append(updated)


def test_periodic_due_only_on_an_update() -> None:
    assert periodic_due(True, 6, 3) and not periodic_due(True, 7, 3)
    assert not periodic_due(False, 6, 3)  # a skipped step leaves ``updates`` on a multiple
    assert not periodic_due(True, 6, 0)  # 0 = never


def test_skipped_steps_move_nothing(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16 overflow on every step: no update, no EMA/schedule move, no step checkpoints."""
    recipe = recipe_for(data, tmp_path / "run", "--train.checkpoint_every_updates", "1")
    run, state = setup(recipe)
    ema_before = {k: v.clone() for k, v in run.ema.module.state_dict().items()}  # type: ignore[union-attr]
    lr_before = run.optimizer.param_groups[0]["lr"]
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    seen = Counter()
    metrics = train_one_epoch(run, state, 0, [seen])
    assert seen.updated == [False, False, False]
    assert (state.updates, state.batches_done, metrics["updates"]) == (0, 3, 0.0)
    assert run.optimizer.param_groups[0]["lr"] == lr_before
    for key, value in run.ema.module.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(value, ema_before[key]), key
    assert not (run.run_dir / "checkpoints").exists()  # no step-0000000 per skipped step


def test_a_setup_failing_late_closes_the_worker_and_the_ram_cache_and_unlocks(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import classifier_training.engine.setup as setup_module
    from classifier_training.hooks import BackgroundWork

    workers: list[BackgroundWork] = []

    class Recorded(BackgroundWork):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.closed = False
            workers.append(self)

        def close(self, cancel: bool = False) -> None:
            self.closed = True
            super().close(cancel)

    def tracker_down(*args: object, **kwargs: object) -> str:
        raise RuntimeError("tracker down")

    opened = []

    def open_caches(*args: Any, **kwargs: Any) -> Any:
        opened.append(real_open_caches(*args, **kwargs))
        return opened[-1]

    real_open_caches = setup_module.open_caches
    monkeypatch.setattr(setup_module, "open_caches", open_caches)
    monkeypatch.setattr(setup_module, "BackgroundWork", Recorded)
    monkeypatch.setattr(setup_module, "init_wandb", tracker_down)
    recipe = recipe_for(data, tmp_path / "run", "--data.cache", "ram")
    with pytest.raises(RuntimeError, match="tracker down"):
        setup(recipe)
    assert len(workers) == 1 and workers[0].closed  # the forked worker does not outlive setup
    ram_files = [cache.path for cache in opened[0].caches.values()]
    assert ram_files and not any(path.exists() for path in ram_files)  # nor the RAM cache
    monkeypatch.undo()
    AcceleratorState._reset_state(True)
    overwrite = recipe_for(data, tmp_path / "run", "--train.overwrite", "true")
    run, _ = setup(overwrite)  # the lock was released: the folder can be taken again
    run.guard.close()
