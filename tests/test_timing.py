"""Per-phase timings: keys, accumulation, data wait, the summary table."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from classifier_training.timing import (
    PHASES,
    PhaseTimer,
    format_epoch_times,
    key,
    timing_summary,
)


def slow_loader(n: int, wait: float) -> Iterator[int]:
    for i in range(n):
        time.sleep(wait)
        yield i


def test_phases_add_up_on_the_cpu() -> None:
    timer = PhaseTimer(torch.device("cpu"))
    timer.start_epoch()
    with timer.phase("train"):
        for _ in timer.batches(slow_loader(3, 0.02)):
            with timer.span("augment"):
                time.sleep(0.01)
            with timer.span("step"):
                time.sleep(0.03)
    with timer.phase("eval"):
        time.sleep(0.02)
    with timer.phase("checkpoint"):
        time.sleep(0.01)
    with timer.phase("hooks"):
        pass
    times = timer.epoch_times()
    assert set(times) == {key(p) for p in PHASES} | {key("epoch"), key("blocking")}
    assert times["time/data_s"] >= 0.06
    assert times["time/augment_s"] >= 0.03
    assert times["time/step_s"] >= 0.09
    parts = times["time/data_s"] + times["time/augment_s"] + times["time/step_s"]
    assert times["time/train_s"] >= parts
    assert times["time/epoch_s"] >= times["time/train_s"] + times["time/eval_s"]
    assert times["time/blocking_s"] == pytest.approx(
        times["time/epoch_s"] - times["time/train_s"] - times["time/eval_s"]
    )
    assert times["time/blocking_s"] >= times["time/checkpoint_s"] >= 0.01

    timer.start_epoch()  # a new epoch starts from zero
    assert timer.epoch_times()["time/step_s"] == 0.0


def test_data_wait_is_counted_when_the_loader_ends_too() -> None:
    timer = PhaseTimer(torch.device("cpu"))
    timer.start_epoch()
    assert list(timer.batches([])) == []
    assert list(timer.batches(iter([1, 2]))) == [1, 2]
    assert timer.epoch_times()["time/data_s"] >= 0.0


def test_console_line_and_summary() -> None:
    epoch = {
        "time/epoch_s": 10.0,
        "time/train_s": 8.0,
        "time/data_s": 0.5,
        "time/augment_s": 1.5,
        "time/step_s": 5.5,
        "time/eval_s": 1.0,
        "time/checkpoint_s": 0.6,
        "time/hooks_s": 0.1,
    }
    line = format_epoch_times(epoch)
    assert line.startswith("time 10.0 s: data 0.50, aug 1.50, step 5.50, eval 1.00")
    assert line.endswith("ckpt 0.60, hooks 0.10")
    summary = timing_summary([epoch, {**epoch, "epoch": 2.0}, {"epoch": 3.0}], 7.5)
    lines = summary.splitlines()
    assert lines[0] == "timing summary: 2 epochs, 20.0 s (mean per epoch in brackets)"
    assert any(x.split()[:4] == ["training", "loop", "16.0", "s"] for x in lines)
    assert any("forward/backward/step" in x and "55.0%" in x and "(5.50 s)" in x for x in lines)
    other = next(x for x in lines if x.strip().startswith("other"))
    assert "0.6 s" in other  # 20 - (16 + 2 + 1.2 + 0.2)
    assert lines[-1] == "  hook work in the background: 7.5 s (overlapped)"
    parts = {"a.draw": 0.5, "b.draw": 4.0, "c.draw": 2.0, "d.draw": 0.6, "e.draw": 0.4}
    named = timing_summary([epoch], 7.5, background_by_job=parts).splitlines()[-1]
    assert named == (  # the largest four, largest first
        "  hook work in the background: 7.5 s (overlapped): "
        "b.draw 4.0, c.draw 2.0, d.draw 0.6, a.draw 0.5"
    )
    assert timing_summary([]) == "timing: no epoch finished"
