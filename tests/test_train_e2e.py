"""End-to-end runs on tiny synthetic data (CPU): exact resume, 2 processes, run-dir safety."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from accelerate import Accelerator, PartialState, debug_launcher
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import train as train_script
from classifier_training.checkpoint import (
    CheckpointError,
    TrainerState,
    load_weights,
    resolve_checkpoint,
)
from classifier_training.data.imbalance import class_counts, inverse_frequency_weights
from classifier_training.data.loaders import build_loaders, load_index
from classifier_training.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from classifier_training.engine.loop import LoopCallback
from classifier_training.evaluation import evaluate
from classifier_training.hooks import BackgroundWork, HookFailedElsewhereError, run_hooks
from classifier_training.hooks.base import FitContext, Hook
from classifier_training.recipe import Recipe, parse_recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]


def tiny_recipe(data: Path, out: Path, *extra: str) -> Recipe:
    return parse_recipe(
        [
            "--data.root",
            str(data),
            "--data.image_size",
            "32",
            "--data.batch_size",
            "8",
            "--data.num_workers",
            "0",
            "--model.arch",
            "test_resnet",
            "--model.pretrained",
            "false",
            "--train.epochs",
            "2",
            "--train.output_dir",
            str(out),
            "--train.mixed_precision",
            "no",
            "--train.eval_test",
            "false",
            "--schedule.warmup_epochs",
            "1",
            "--logging.progress",
            "off",
            "--hooks.enabled",  # no hooks unless a test names some (later flags win)
            *extra,
        ]
    )


def weights_of(run_dir: Path, which: str = "last") -> dict[str, dict[str, torch.Tensor]]:
    ckpt = resolve_checkpoint(run_dir, which)
    return {"raw": load_weights(ckpt, "raw"), "ema": load_weights(ckpt, "ema")}


class RecordIds(LoopCallback):
    """Collects the sample ids of every loader batch, in order."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def on_batch_start(self, batch: dict[str, torch.Tensor], state: TrainerState) -> None:
        self.ids.extend(batch["index"].tolist())


class SimulatedKillError(Exception):
    """Stands in for a kill right after a periodic checkpoint."""


class KillAfter(RecordIds):
    def __init__(self, updates: int) -> None:
        super().__init__()
        self.updates = updates

    def on_batch_end(self, state: TrainerState, updated: bool) -> None:
        if state.updates >= self.updates:
            raise SimulatedKillError(f"after {state.updates} updates")


def test_resume_is_exact(tiny_data: Path, tmp_path: Path) -> None:
    """N updates uninterrupted == killed at k (mid-epoch) and resumed: same ids, same weights."""
    updates_per_epoch = 5  # 40 train rows / batch 8
    kill_at = updates_per_epoch + 2  # inside the second epoch, right after a step checkpoint
    every = ("--train.checkpoint_every_updates", str(kill_at))
    full = RecordIds()
    train_script.train(tiny_recipe(tiny_data, tmp_path / "full", *every), callbacks=[full])

    run_b = tmp_path / "interrupted"
    part = KillAfter(kill_at)
    with pytest.raises(SimulatedKillError):
        AcceleratorState._reset_state(True)
        train_script.train(tiny_recipe(tiny_data, run_b, *every), callbacks=[part])
    assert resolve_checkpoint(run_b, "last").name == f"step-{kill_at:07d}"
    AcceleratorState._reset_state(True)
    rest = RecordIds()
    train_script.train(
        tiny_recipe(tiny_data, run_b, *every, "--train.resume", "auto"), callbacks=[rest]
    )
    full_ids = full.ids
    assert part.ids + rest.ids == full_ids
    assert len(full_ids) == 2 * 40
    a, b = weights_of(tmp_path / "full"), weights_of(run_b)
    for kind in ("raw", "ema"):
        assert a[kind].keys() == b[kind].keys()
        for key in a[kind]:
            assert torch.equal(a[kind][key], b[kind][key]), (kind, key)
    # the second epoch's order differs from the first (set_epoch really reshuffles)
    assert full_ids[:40] != full_ids[40:]
    rows = [json.loads(x) for x in (run_b / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1.0, 2.0]


def test_refuses_to_mix_runs(tiny_data: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_data, tmp_path / "run", "--train.epochs", "1")
    train_script.train(recipe)
    AcceleratorState._reset_state(True)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_script.train(recipe)
    AcceleratorState._reset_state(True)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        train_script.train(tiny_recipe(tiny_data, tmp_path / "new", "--train.resume", "auto"))


def _two_process_job(data: str, out: str) -> None:
    recipe = tiny_recipe(
        Path(data),
        Path(out),
        "--data.batch_size",
        "4",
        "--data.sampler",
        "auto",
        "--train.epochs",
        "1",
    )
    ids = RecordIds()
    result = train_script.train(recipe, callbacks=[ids])
    rank = PartialState().process_index
    (Path(out) / f"ids-{rank}.json").write_text(json.dumps(ids.ids))
    if rank == 0:
        (Path(out) / "final.json").write_text(json.dumps(result.state.metrics))


def test_two_processes_match_one(tiny_data: Path, tmp_path: Path) -> None:
    """gloo DDP on CPU: disjoint shards of one weighted draw, each val sample counted once."""
    out2 = tmp_path / "ddp"
    debug_launcher(_two_process_job, args=(str(tiny_data), str(out2)), num_processes=2)
    ids0 = json.loads((out2 / "ids-0.json").read_text())
    ids1 = json.loads((out2 / "ids-1.json").read_text())
    assert len(ids0) == len(ids1) == 20

    AcceleratorState._reset_state(True)
    single = RecordIds()
    out1 = tmp_path / "single"
    recipe = tiny_recipe(
        tiny_data, out1, "--data.batch_size", "8", "--data.sampler", "auto", "--train.epochs", "1"
    )
    train_script.train(recipe, callbacks=[single])
    # the weighted sampler draws the same global list; each process takes alternate batches of 4
    merged = []
    for i in range(0, 20, 4):
        merged += ids0[i : i + 4] + ids1[i : i + 4]
    assert merged == single.ids

    # evaluation: the 2-process metrics equal a single-process evaluation of the same weights
    metrics2 = json.loads((out2 / "final.json").read_text())
    AcceleratorState._reset_state(True)

    ckpt = resolve_checkpoint(out2, "last")
    raw = load_file(str(ckpt / "model.safetensors"))
    acc = Accelerator(cpu=True)
    index = load_index(recipe.data)
    loaders = build_loaders(recipe.data, index, jpeg_p=0.0, jpeg_quality=(50, 50), seed=0)
    net = timm.create_model("test_resnet", num_classes=4)
    net.load_state_dict(raw)
    names = sorted(index.class_to_idx, key=index.class_to_idx.__getitem__)
    targets = [s.target for s in index.splits["train"].samples]
    weights = inverse_frequency_weights(class_counts(targets, 4))
    crit = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=0.1)
    res = evaluate(
        net,
        acc.prepare(loaders.val),
        acc,
        crit,
        names,
        split="val",
        weights="raw",
        prefix="val_raw",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        channels_last=False,
    )
    assert len(res.targets) == 12  # every val sample exactly once
    assert res.metrics["val_raw/acc_top1"] == pytest.approx(metrics2["val_raw/acc_top1"])
    assert res.metrics["val_raw/loss"] == pytest.approx(metrics2["val_raw/loss"], rel=1e-5)


def test_wandb_without_network_still_trains(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreachable W&B server (closed local port, fake key) never stops training."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_data, out, "--train.epochs", "1", "--logging.wandb", "true")
    result = train_script.train(recipe)
    assert result.state.epoch == 1
    assert (out / "metrics.jsonl").read_text().count("\n") == 1
    # the numbers were kept offline for a later `wandb sync`
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run was written"
    assert result.state.wandb_run_id


class _FailsOnMain(Hook):
    name = "fails_on_main"

    def on_fit_end(self, ctx: FitContext) -> None:
        # run_hooks calls hooks on the main process only: rank 1 never gets here.
        raise RuntimeError("export verification failed (simulated)")


def _hook_failure_job(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    ctx = SimpleNamespace(accelerator=accelerator, background=BackgroundWork("inline"))
    try:
        run_hooks([_FailsOnMain()], "on_fit_end", ctx)  # type: ignore[arg-type]
        outcome = "no error"
    except HookFailedElsewhereError:
        outcome = "failed elsewhere"
    except RuntimeError as err:
        outcome = str(err)
    (Path(out) / f"rank-{accelerator.process_index}.txt").write_text(outcome)


def test_a_hook_failure_on_the_main_process_stops_every_process(tmp_path: Path) -> None:
    """No process is left waiting at a barrier when rank 0's export fails."""
    debug_launcher(_hook_failure_job, args=(str(tmp_path),), num_processes=2)
    assert (tmp_path / "rank-0.txt").read_text() == "export verification failed (simulated)"
    assert (tmp_path / "rank-1.txt").read_text() == "failed elsewhere"
