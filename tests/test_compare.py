"""The regression gate between two bundles' predictions (classifier_training.deploy.compare)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from classifier_training.deploy.compare import (
    compare_predictions,
    format_comparison,
    mcnemar_exact,
)

NAMES = ["0", "1", "2"]


def test_mcnemar_exact_small_cases() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    # b=0, c=5: 2 * C(5,0) / 2^5
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(5, 0) == mcnemar_exact(0, 5)
    # b=1, c=9: 2 * (1 + 10) / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)


def test_mcnemar_exact_is_exact_for_large_counts() -> None:
    # 2 * P(X <= 4900 | n = 10000, 1/2), by the normal approximation ~0.0455
    p = mcnemar_exact(4900, 5100)
    assert 0.04 < p < 0.05
    assert mcnemar_exact(5000, 5000) == 1.0
    assert math.isfinite(mcnemar_exact(0, 20000))


def test_gate_passes_for_a_better_model() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    old = np.array([0, 1, 1, 0, 2, 2])
    new = np.array([0, 0, 1, 1, 2, 2])
    r = compare_predictions(y, old, new, NAMES, [f"im{i}" for i in range(6)])
    assert r["passed"] and not r["regressed_classes"]
    assert r["old_accuracy"] == pytest.approx(4 / 6) and r["new_accuracy"] == 1.0
    assert r["mcnemar"]["wrong_to_right"] == 2 and r["mcnemar"]["right_to_wrong"] == 0
    assert [f["image"] for f in r["wrong_to_right"]] == ["im1", "im3"]
    assert "PASS" in format_comparison(r, "old", "new")


def test_gate_fails_on_a_class_drop_and_names_it() -> None:
    y = np.array([0] * 10 + [1] * 10 + [2] * 10)
    old = y.copy()
    new = y.copy()
    new[20:22] = 0  # class "2" loses 2 of 10 images: a drop of 0.2 > 0.1, not significant
    conf = np.linspace(0.5, 0.9, 30)
    r = compare_predictions(y, old, new, NAMES, [f"im{i}" for i in range(30)], new_confidence=conf)
    assert not r["significantly_worse"]
    assert r["regressed_classes"] == ["2"]
    assert not r["passed"]
    assert r["per_class"]["2"]["change"] == pytest.approx(-0.2)
    # most confident new mistakes first
    assert [f["image"] for f in r["right_to_wrong"]] == ["im21", "im20"]
    text = format_comparison(r, "old", "new")
    assert "REGRESSION" in text and "dropped by more than 10%: 2" in text


def test_gate_fails_when_significantly_worse() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    old = y.copy()
    new = y.copy()
    flip = rng.choice(600, 30, replace=False)
    new[flip] = (y[flip] + 1) % 3  # 30 right->wrong, 0 wrong->right
    r = compare_predictions(y, old, new, NAMES, [str(i) for i in range(600)], max_class_drop=1.0)
    assert r["significantly_worse"] and r["mcnemar"]["p_value"] < 1e-6
    assert not r["passed"] and not r["regressed_classes"]


def test_mismatched_lengths_are_an_error() -> None:
    with pytest.raises(ValueError, match="one target and one prediction per image"):
        compare_predictions([0, 1], [0], [0, 1], NAMES, ["a", "b"])
