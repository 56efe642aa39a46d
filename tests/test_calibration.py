"""Temperature scaling, ECE and the abstain threshold (classifier_training.deploy.calibration)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from classifier_training.deploy.calibration import (
    Calibration,
    abstain_threshold,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    nll,
    plot_reliability,
    read_calibration,
    reliability_bins,
    selective_stats,
    softmax_t,
    top1_confidence,
)


def overconfident(
    n: int = 20000, c: int = 10, scale: float = 2.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); the model reports z * scale (too sure by ``scale``)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, c))
    p = softmax_t(z)
    y = np.array([rng.choice(c, p=row) for row in p])
    return z * scale, y


def test_fit_temperature_recovers_the_overconfidence_factor() -> None:
    logits, y = overconfident(scale=2.5)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(2.5, rel=0.05)
    grid = np.exp(np.linspace(math.log(0.5), math.log(10), 400))
    best_on_grid = min(grid, key=lambda g: nll(logits, y, float(g)))
    assert nll(logits, y, t) <= nll(logits, y, float(best_on_grid)) + 1e-9


def test_fit_temperature_below_one_for_an_underconfident_model() -> None:
    logits, y = overconfident(scale=0.5, seed=1)
    assert fit_temperature(logits, y) == pytest.approx(0.5, rel=0.05)


def test_ece_matches_torchmetrics() -> None:
    logits, y = overconfident(n=3000, seed=2)
    conf, ok = top1_confidence(logits, y)
    ours = expected_calibration_error(conf, ok, n_bins=15)
    theirs = multiclass_calibration_error(
        torch.softmax(torch.from_numpy(logits), dim=1),
        torch.from_numpy(y),
        num_classes=logits.shape[1],
        n_bins=15,
        norm="l1",
    )
    assert ours == pytest.approx(float(theirs), abs=1e-6)


def test_reliability_bins_count_every_image_once() -> None:
    conf = np.array([0.05, 0.5, 0.5, 0.95, 1.0])
    ok = np.array([0, 1, 0, 1, 1], dtype=bool)
    bins = reliability_bins(conf, ok, n_bins=10)
    assert sum(b["count"] for b in bins) == 5
    assert bins[4]["count"] == 2 and bins[4]["accuracy"] == 0.5  # (0.4, 0.5]
    assert bins[9]["count"] == 2 and bins[9]["confidence"] == pytest.approx(0.975)
    assert math.isnan(bins[1]["accuracy"])


def test_abstain_threshold_keeps_the_largest_prefix_at_the_target() -> None:
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.8, 0.6, 0.4])
    ok = np.array([1, 1, 1, 1, 0, 1, 0], dtype=bool)
    # precision of the top 3 is 1.0; the 0.8 tie cannot be split: top-5 is 4/5 = 0.8
    assert abstain_threshold(conf, ok, 1.0) == (0.9, True)
    assert abstain_threshold(conf, ok, 0.8) == (0.6, True)  # top-6: 5/6
    stats = selective_stats(conf, ok, 0.9)
    assert stats == {"coverage": 3 / 7, "precision": 1.0, "accepted": 3, "total": 7}


def test_abstain_threshold_unreachable_rejects_everything_seen() -> None:
    conf = np.array([0.9, 0.7])
    ok = np.array([0, 1], dtype=bool)
    threshold, reached = abstain_threshold(conf, ok, 0.99)
    assert not reached and threshold > 0.9
    assert selective_stats(conf, ok, threshold)["coverage"] == 0.0
    with pytest.raises(ValueError, match="target precision"):
        abstain_threshold(conf, ok, 1.5)


def test_calibrate_improves_ece_and_keeps_top1(tmp_path: Path) -> None:
    val, val_y = overconfident(n=4000, seed=3)
    test, test_y = overconfident(n=4000, seed=4)
    cal = calibrate(val, val_y, test, test_y, target_precision=0.9)
    assert cal.temperature == pytest.approx(2.5, rel=0.1)
    assert cal.ece_after < cal.ece_before / 3
    assert cal.eval_split == "test" and cal.n_eval == 4000 and cal.n_fit == 4000
    # the threshold is in calibrated-confidence units and reaches the target on validation
    assert cal.threshold_reached and cal.val_precision >= 0.9
    conf, ok = top1_confidence(test, test_y, cal.temperature)
    assert cal.coverage == pytest.approx(float((conf >= cal.threshold).mean()))
    assert cal.precision == pytest.approx(float(ok[conf >= cal.threshold].mean()))
    assert (softmax_t(test, cal.temperature).argmax(1) == test.argmax(1)).all()
    summary = cal.summary()
    for key in ("temperature", "threshold", "target_precision", "coverage"):
        assert isinstance(summary[key], float)
    assert "bins_before" not in summary
    fig = plot_reliability(cal, "tiny")
    fig.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_calibrate_without_a_test_split_reports_validation() -> None:
    val, val_y = overconfident(n=500, seed=5)
    cal = calibrate(val, val_y, target_precision=0.95)
    assert cal.eval_split == "valid" and cal.coverage == cal.val_coverage


def test_bad_logits_are_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.array([[0.0, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="shape"):
        fit_temperature(np.zeros(3), np.array([0]))
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))


def test_read_calibration_validates() -> None:
    assert read_calibration({}, "m.json") is None
    ok = {"calibration": {"temperature": 1.5, "threshold": 0.7, "coverage": 0.9}}
    assert read_calibration(ok, "m.json") == {"temperature": 1.5, "threshold": 0.7}
    with pytest.raises(ValueError, match=r"m\.json: calibration\.temperature"):
        read_calibration({"calibration": {"temperature": 0, "threshold": 0.5}}, "m.json")
    with pytest.raises(ValueError, match="threshold"):
        read_calibration({"calibration": {"temperature": 1.0, "threshold": None}}, "m.json")
    assert isinstance(Calibration.__doc__, str)
