"""``track_best`` (the pure rule behind selection and early stopping) and the ``val/`` renaming."""

from __future__ import annotations

import math

import pytest

from classifier_training.checkpoint import TrainerState
from classifier_training.engine.selection import Best, selected_as_val, track_best


def run_values(values: list[float], mode: str, min_delta: float = 0.0) -> list[Best]:
    best, trail = Best(), []
    for epoch, value in enumerate(values):
        best = track_best(best, value, epoch, mode, min_delta)  # type: ignore[arg-type]
        trail.append(best)
    return trail


def test_first_value_is_always_the_best() -> None:
    assert track_best(Best(), 0.3, 0, "max", 0.5) == Best(0.3, 0, 0)
    assert track_best(Best(), math.nan, 4, "min", 0.0).epoch == 4


def test_max_mode_counts_epochs_without_improvement() -> None:
    trail = run_values([0.5, 0.6, 0.6, 0.55, 0.7], "max")
    assert [b.value for b in trail] == [0.5, 0.6, 0.6, 0.6, 0.7]
    assert [b.epoch for b in trail] == [0, 1, 1, 1, 4]
    assert [b.epochs_without_improvement for b in trail] == [0, 0, 1, 2, 0]


def test_min_mode_prefers_lower_values() -> None:
    trail = run_values([1.0, 0.8, 0.9, 0.79], "min")
    assert [b.epoch for b in trail] == [0, 1, 1, 3]
    assert [b.epochs_without_improvement for b in trail] == [0, 0, 1, 0]


def test_min_delta_is_a_strict_margin() -> None:
    trail = run_values([0.5, 0.6, 0.75, 0.851], "max", min_delta=0.1)
    # 0.6 - 0.5 is not more than 0.1 (nor in floating point); 0.75 - 0.5 is; 0.851 - 0.75 is.
    assert [b.epoch for b in trail] == [0, 0, 2, 3]
    assert trail[1].epochs_without_improvement == 1


def test_nan_never_improves_on_a_number() -> None:
    trail = run_values([0.4, math.nan, 0.41], "max")
    assert [b.epoch for b in trail] == [0, 0, 2]
    assert trail[1].epochs_without_improvement == 1


def test_track_best_is_pure() -> None:
    before = Best(0.5, 2, 1)
    after = track_best(before, 0.4, 3, "max", 0.0)
    assert before == Best(0.5, 2, 1)
    assert after == Best(0.5, 2, 2)
    with pytest.raises(AttributeError):
        before.value = 1.0  # type: ignore[misc]


def test_best_round_trips_through_the_trainer_state() -> None:
    state = TrainerState(best_value=0.9, best_epoch=3, epochs_without_improvement=2, updates=7)
    assert Best.of(state) == Best(0.9, 3, 2)
    Best(0.95, 5, 0).store(state)
    assert (state.best_value, state.best_epoch, state.epochs_without_improvement) == (0.95, 5, 0)
    assert state.updates == 7


def test_selected_weights_become_val() -> None:
    metrics = {"val_ema/acc_top1": 0.9, "val_ema/acc_class/7": 1.0, "val_ema/loss": 0.2}
    assert selected_as_val(metrics, "ema") == {
        "val/acc_top1": 0.9,
        "val/acc_class/7": 1.0,
        "val/loss": 0.2,
    }
