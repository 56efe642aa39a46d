"""Background hook work: same files as inline, failures surface clearly, no torch crosses."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import debug_launcher

from classifier_training.data.index import index_dataset
from classifier_training.hooks import HookFailedElsewhereError, run_hooks
from classifier_training.hooks.background import (
    BackgroundJobError,
    BackgroundWork,
    check_plain,
)
from classifier_training.hooks.base import FitContext, Hook
from classifier_training.hooks.confusion_matrix import ConfusionMatrixHook
from classifier_training.hooks.history import HistoryHook
from classifier_training.hooks.sample_predictions import SamplePredictionsHook
from classifier_training.recipe import DataConfig, HooksConfig, Recipe
from conftest import write_jsonl_dataset
from test_hooks import eval_result, metrics_row

CLASSES = ("0", "00", "1", "10", "2")


# Module-level jobs: a process worker receives them by name.
def append_line(path: Path, text: str) -> str:
    with path.open("a") as fh:
        fh.write(text + "\n")
    return text


def sleep_then_append(path: Path, text: str, seconds: float) -> str:
    time.sleep(seconds)
    return append_line(path, text)


def wait_then_append(path: Path, text: str, gate: Path) -> str:
    deadline = time.monotonic() + 120
    while not gate.exists() and time.monotonic() < deadline:  # held until the test opens it
        time.sleep(0.01)
    return append_line(path, text)


def fail(message: str) -> None:
    raise ValueError(message)


def die() -> None:
    os._exit(3)


def worker_pid() -> int:
    return os.getpid()


def ctx_for(run_dir: Path, background: BackgroundWork, main: bool = True) -> FitContext:
    logged: dict[str, Path] = {}
    accelerator = SimpleNamespace(
        is_main_process=main,
        device=torch.device("cpu"),
        print=lambda *a, **k: None,
        set_trigger=lambda: None,
        check_trigger=lambda: False,
    )
    ctx = FitContext(
        recipe=Recipe(data=DataConfig(image_size=16), hooks=HooksConfig(sample_grid=4)),
        accelerator=accelerator,  # type: ignore[arg-type]
        run_dir=run_dir,
        index=None,  # type: ignore[arg-type]
        loaders=None,  # type: ignore[arg-type]
        model=torch.nn.Identity(),
        ema=None,
        augment=None,  # type: ignore[arg-type]
        class_names=list(CLASSES),
        log_images=logged.update,
        background=background,
    )
    ctx.extra["logged"] = logged
    return ctx


def draw_epoch(run_dir: Path, background: BackgroundWork) -> dict[str, Path]:
    """One epoch end of the three drawing hooks through run_hooks; returns what was logged."""
    ctx = ctx_for(run_dir, background)
    run_dir.mkdir(parents=True)
    # The sample grid reads its tiles' images from the validation split's files.
    data = write_jsonl_dataset(
        run_dir.parent / f"data-{run_dir.name}", CLASSES, {"train": 1, "valid": 2, "test": 1}
    )
    ctx.index = index_dataset(data)
    (run_dir / "metrics.jsonl").write_text(
        "".join(f"{__import__('json').dumps(metrics_row(e))}\n" for e in (1, 2))
    )
    ctx.epoch, ctx.is_last_epoch = 1, True
    ctx.evals = {"val": eval_result([0, 1, 2, 3, 4, 0], [0, 2, 2, 3, 0, 0], 5)}
    hooks: list[Hook] = [ConfusionMatrixHook(), HistoryHook(), SamplePredictionsHook()]
    run_hooks(hooks, "on_epoch_end", ctx)
    run_hooks([], "on_fit_end", ctx)
    background.close()
    logged: dict[str, Path] = ctx.extra["logged"]
    return logged


FILES = (
    "epochs/002/confusion_matrix.png",
    "epochs/002/confusion_matrix_normalized.png",
    "epochs/002/confused_pairs.json",
    "epochs/002/sample_predictions.png",
    "history/loss.png",
    "history/accuracy.png",
    "history/lr.png",
)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_background_writes_the_same_files_as_inline(tmp_path: Path, mode: str) -> None:
    inline = draw_epoch(tmp_path / "inline", BackgroundWork("inline"))
    other = draw_epoch(tmp_path / mode, BackgroundWork(mode))  # type: ignore[arg-type]
    for name in FILES:
        a, b = tmp_path / "inline" / name, tmp_path / mode / name
        assert a.read_bytes() == b.read_bytes(), name
    # The images reach the trackers once their files exist (the `then` callbacks).
    assert {k: p.relative_to(tmp_path / mode) for k, p in other.items()} == {
        k: p.relative_to(tmp_path / "inline") for k, p in inline.items()
    }
    assert set(other) == {
        "val/confusion_matrix",
        "val/confusion_matrix_normalized",
        "val/sample_predictions",
    }


def test_process_worker_is_another_process_started_up_front(tmp_path: Path) -> None:
    work = BackgroundWork("process")
    pids: list[int] = []
    work.submit(worker_pid, then=pids.append)
    work.wait()
    work.close()
    assert pids and pids[0] != os.getpid()
    assert work.jobs_done == 2 - 1 and work.busy_seconds >= 0.0  # the start-up job is not counted
    # the summary names the job by module and function
    assert work.seconds_by_job == {"test_hooks_background.worker_pid": work.busy_seconds}


@pytest.mark.parametrize("mode", ["process", "thread", "inline"])
def test_a_failed_job_fails_at_the_next_collect_with_its_traceback(mode: str) -> None:
    work = BackgroundWork(mode)  # type: ignore[arg-type]
    work.submit(fail, "confusion matrix could not be drawn")
    deadline = time.monotonic() + 60
    with pytest.raises(BackgroundJobError) as info:
        while time.monotonic() < deadline:  # collect never waits: poll until the job is done
            work.collect()
            time.sleep(0.05)
    work.close()
    message = str(info.value)
    assert "test_hooks_background.fail failed: ValueError: confusion matrix could not be" in message
    if mode == "process":
        assert "worker traceback" in message and "raise ValueError(message)" in message


def test_a_dead_worker_is_reported() -> None:
    work = BackgroundWork("process")
    work.submit(die)
    with pytest.raises(BackgroundJobError, match="worker process died"):
        work.wait()
    work.close()


def test_jobs_run_in_order_and_replace_drops_a_queued_redraw(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    work = BackgroundWork("process")
    results: list[str] = []
    gate = tmp_path / "gate"  # the worker stays busy with "first" until every job is queued
    work.submit(wait_then_append, log, "first", gate, then=results.append)
    # ProcessPoolExecutor hands up to two jobs to the worker's call queue ahead of time (they
    # can no longer be cancelled): two fillers take those places whether or not the worker has
    # picked "first" up yet, so "history epoch 1" is surely still cancellable.
    for _ in range(2):
        work.submit(append_line, log, "filler", then=results.append)
    work.submit(append_line, log, "history epoch 1", replace="history", then=results.append)
    work.submit(append_line, log, "history epoch 2", replace="history", then=results.append)
    gate.touch()
    work.wait()
    work.close()
    assert log.read_text().splitlines() == ["first", "filler", "filler", "history epoch 2"]
    assert results == ["first", "filler", "filler", "history epoch 2"]


def test_backpressure_bounds_the_queue(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    work = BackgroundWork("thread", max_pending=1)
    work.submit(sleep_then_append, log, "a", 0.3)
    work.submit(append_line, log, "b")  # waits for "a" first
    assert work.jobs_done == 1 and work.pending == 1
    work.wait()
    work.close()
    assert log.read_text().splitlines() == ["a", "b"]


def test_only_plain_data_crosses() -> None:
    check_plain({"cm": np.zeros((3, 3)), "names": ["a"], "path": Path("x"), "n": 1.5})
    with pytest.raises(TypeError, match=r"\['logits'\].*torch.Tensor.*\.cpu\(\)\.numpy\(\)"):
        check_plain({"logits": torch.zeros(2)}, "job")
    with pytest.raises(TypeError, match=r"torch\.nn"):
        check_plain([torch.nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="objects are not plain"):
        check_plain(np.array([object()]))
    work = BackgroundWork("inline")
    with pytest.raises(TypeError, match="append_line arguments"):
        work.submit(append_line, torch.zeros(1), "x")


def test_hooks_run_on_the_main_process_only(tmp_path: Path) -> None:
    calls: list[str] = []

    class Spy(Hook):
        def on_epoch_end(self, ctx: FitContext) -> None:
            calls.append("called")

    run_hooks([Spy()], "on_epoch_end", ctx_for(tmp_path, BackgroundWork("inline"), main=False))
    assert calls == []
    run_hooks([Spy()], "on_epoch_end", ctx_for(tmp_path, BackgroundWork("inline"), main=True))
    assert calls == ["called"]


class _SubmitsAFailingJob(Hook):
    def on_epoch_end(self, ctx: FitContext) -> None:
        ctx.background.submit(fail, "figure could not be written (simulated)")


def _background_failure_job(out: str) -> None:
    """Two processes: rank 0's background job fails in epoch 1; both stop at epoch 2's round."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    work = BackgroundWork("process") if accelerator.is_main_process else BackgroundWork("inline")
    ctx: Any = SimpleNamespace(accelerator=accelerator, background=work)
    outcome = "no error"
    try:
        run_hooks([_SubmitsAFailingJob()], "on_epoch_end", ctx)  # epoch 1: submitted
        run_hooks([], "on_fit_end", ctx)  # waits for the job: fails here
    except HookFailedElsewhereError:
        outcome = "failed elsewhere"
    except BackgroundJobError as err:
        outcome = str(err).splitlines()[0]
    finally:
        work.close(cancel=True)
    (Path(out) / f"rank-{accelerator.process_index}.txt").write_text(outcome)


@pytest.mark.slow
def test_a_background_failure_stops_every_process(tmp_path: Path) -> None:
    debug_launcher(_background_failure_job, args=(str(tmp_path),), num_processes=2)
    assert (tmp_path / "rank-0.txt").read_text() == (
        "background hook job test_hooks_background.fail failed: "
        "ValueError: figure could not be written (simulated)"
    )
    assert (tmp_path / "rank-1.txt").read_text() == "failed elsewhere"
