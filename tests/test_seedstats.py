"""Seed statistics: Student t against published values, summaries and paired comparisons."""

from __future__ import annotations

import math

import pytest

from classifier_training.seedstats import (
    compare_runs,
    paired,
    summarize,
    summarize_runs,
    t_cdf,
    t_quantile,
    t_two_sided_p,
)

# two-sided 95% critical values t(0.975, df) from any statistics table
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 19: 2.093, 30: 2.042}


@pytest.mark.parametrize(("df", "expected"), sorted(T_975.items()))
def test_t_quantile_matches_the_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=6e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=6e-4)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-10)


def test_t_cdf_closed_forms_and_limits() -> None:
    # df = 1 is Cauchy: 1/2 + atan(t)/pi; df = 2: 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-14)
    # large df approaches the normal distribution
    assert t_cdf(1.96, 100_000) == pytest.approx(0.9750, abs=1e-4)
    assert t_cdf(math.inf, 3) == 1.0 and t_cdf(-math.inf, 3) == 0.0
    assert t_two_sided_p(0.0, 4) == 1.0
    assert t_two_sided_p(T_975[4], 4) == pytest.approx(0.05, abs=2e-4)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_cdf(1.0, 0)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\)"):
        t_quantile(1.0, 3)


def test_t_cdf_agrees_with_scipy_where_installed() -> None:
    stats = pytest.importorskip("scipy.stats")  # a dev dependency (through mlxtend)
    for df in (1, 2, 3, 4, 7, 12, 25, 60):
        for t in (-5.0, -2.1, -0.3, 0.0, 0.4, 1.7, 3.3, 8.0):
            assert t_cdf(t, df) == pytest.approx(float(stats.t.cdf(t, df)), abs=1e-12)
        assert t_quantile(0.975, df) == pytest.approx(float(stats.t.ppf(0.975, df)), rel=1e-9)


def test_summarize_gives_mean_sample_std_and_t_interval() -> None:
    # the reference's four code-identical runs of its best configuration
    s = summarize([0.942, 0.962, 0.950, 0.955])
    assert s.n == 4 and s.mean == pytest.approx(0.95225)
    assert s.std == pytest.approx(0.0084212, abs=1e-6)  # ddof = 1
    half = T_975[3] * s.std / 2
    assert (s.ci_low, s.ci_high) == pytest.approx((s.mean - half, s.mean + half), abs=1e-5)
    assert (s.min, s.max) == (0.942, 0.962)
    one = summarize([0.9])
    assert one.mean == 0.9 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert one.as_dict()["std"] is None
    with pytest.raises(ValueError, match="no values"):
        summarize([])


def test_paired_difference_t_test_and_verdict() -> None:
    a = [0.940, 0.952, 0.947, 0.960, 0.944]
    b = [0.951, 0.960, 0.959, 0.968, 0.955]  # B wins on every seed by ~0.01
    result = paired(a, b)
    d = [y - x for x, y in zip(a, b, strict=True)]
    mean = sum(d) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    assert result.mean_diff == pytest.approx(mean) and result.std_diff == pytest.approx(std)
    assert result.t == pytest.approx(mean / (std / math.sqrt(5)))
    assert result.p_value < 0.001 and result.distinguishable
    assert result.ci_low > 0
    assert "distinguishable from seed noise, B is higher" in result.verdict("test/acc_top1")
    # the same means but pairs that disagree: seed noise
    noisy = paired([0.94, 0.96, 0.95], [0.96, 0.945, 0.958])
    assert not noisy.distinguishable and noisy.ci_low < 0 < noisy.ci_high
    assert "NOT distinguishable" in noisy.verdict("val/acc_top1", "base", "new")
    # identical runs (a deterministic pipeline): no noise, no difference
    same = paired([0.9, 0.8], [0.9, 0.8])
    assert same.t == 0.0 and same.p_value == 1.0 and not same.distinguishable
    shifted = paired([0.9, 0.8], [0.91, 0.81])
    assert math.isinf(shifted.t) and shifted.p_value == 0.0 and shifted.distinguishable
    assert "at least 2 seeds" in paired([0.9], [0.91]).verdict("m")
    with pytest.raises(ValueError, match="pair by seed"):
        paired([0.9, 0.8], [0.9])


def test_runs_are_summarised_and_paired_by_seed() -> None:
    a = {0: {"test/acc_top1": 0.90, "only_a": 1.0}, 1: {"test/acc_top1": 0.92}, 2: {"x": 0.0}}
    b = {1: {"test/acc_top1": 0.95}, 0: {"test/acc_top1": 0.91}, 5: {"test/acc_top1": 0.5}}
    sums = summarize_runs({0: a[0], 1: a[1]})
    assert list(sums) == ["test/acc_top1"] and sums["test/acc_top1"].n == 2
    cmp = compare_runs({0: a[0], 1: a[1]}, b)
    assert cmp["test/acc_top1"].diffs == pytest.approx((0.01, 0.03))  # seeds 0, 1 only
    with pytest.raises(ValueError, match="share no seed"):
        compare_runs({7: a[0]}, b)
