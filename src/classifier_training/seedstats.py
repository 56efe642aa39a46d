"""Seed-to-seed statistics: mean, spread and confidence intervals, and paired comparisons.

A training run is one draw from the distribution that seeds (initialisation, data order,
augmentation) induce. For n runs of one recipe with values ``x_1..x_n`` of a metric:

- ``mean = sum(x) / n``; ``std = sqrt(sum((x - mean)^2) / (n - 1))`` (the sample standard
  deviation: how far two runs of the same code typically land apart);
- the 95% confidence interval of the recipe's expected value is the Student t-interval
  ``mean +- t(0.975, n - 1) * std / sqrt(n)``; it assumes the runs are independent and their
  metric roughly normal, and it is wide for small n (t(0.975, 1) = 12.71, t(0.975, 2) = 4.30).

Two recipes run over the *same* seeds give pairs ``(a_i, b_i)``; seed effects shared by both
arms cancel in ``d_i = b_i - a_i``, which is why pairing beats comparing two means. The paired
t-test: ``t = mean(d) / (std(d) / sqrt(n))`` with n - 1 degrees of freedom, two-sided p-value
``P(|T| >= |t|)``, and the 95% interval ``mean(d) +- t(0.975, n - 1) * std(d) / sqrt(n)``. The
difference is called distinguishable from seed noise when that interval excludes 0 (p < 0.05).

Why not scipy: the Student t distribution is the only piece the stack (torch, numpy) lacks, and
for integer degrees of freedom its CDF has a short closed form (Abramowitz & Stegun 26.7.3-4),
so a 40 MB runtime dependency is not needed; the tests check it against published quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

CONFIDENCE = 0.95
"""Level of every interval and test here."""


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer ``df >= 1`` degrees of freedom (exact).

    With ``theta = atan(t / sqrt(df))`` and ``c = cos(theta)^2``, ``A = P(|T| <= |t|)`` is
    ``sin(theta) * (1 + c/2 + 1*3/(2*4) c^2 + ... + 1*3*..*(df-3)/(2*4*..*(df-2)) c^((df-2)/2))``
    for even df, and ``2/pi * (theta + sin(theta) cos(theta) * (1 + 2/3 c + ... +
    2*4*..*(df-3)/(3*5*..*(df-2)) c^((df-3)/2)))`` for odd df (the sum is empty for df = 1).
    """
    if df < 1:
        raise ValueError(f"t_cdf: degrees of freedom must be >= 1, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c = math.cos(theta) ** 2
    s = math.sin(theta)
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(2, df, 2):  # k = 2, 4, ..., df - 2
            term *= c * (k - 1) / k
            total += term
        inside = s * total
    else:
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(3, df, 2):  # k = 3, 5, ..., df - 2
            term *= c * (k - 1) / k
            total += term
        inside = 2.0 / math.pi * (theta + s * math.cos(theta) * total)
    inside = min(max(inside, 0.0), 1.0)
    return 0.5 + 0.5 * inside if t >= 0 else 0.5 - 0.5 * inside


def t_quantile(p: float, df: int) -> float:
    """The t with ``t_cdf(t, df) == p`` (``0 < p < 1``), by bisection to ~1e-12 relative."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    return min(1.0, 2.0 * (1.0 - t_cdf(abs(t), df)))


@dataclass(frozen=True)
class Summary:
    """Seed statistics of one metric of one recipe; spread fields are NaN below 2 values."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    min: float
    max: float
    values: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None)."""
        return _json_ready(asdict(self))


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample std and the 95% t-interval of the mean of ``values`` (see module doc)."""
    xs = tuple(float(v) for v in values)
    if not xs:
        raise ValueError("summarize: no values (did every run fail?)")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return Summary(n, mean, math.nan, math.nan, math.nan, xs[0], xs[0], xs)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, min(xs), max(xs), xs)


@dataclass(frozen=True)
class Paired:
    """Paired comparison of arm B against arm A over the same seeds: d = b - a."""

    n: int
    mean_diff: float
    std_diff: float
    ci_low: float
    ci_high: float
    t: float
    p_value: float
    distinguishable: bool
    """True when the 95% interval of the mean difference excludes 0 (p < 0.05)."""
    diffs: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None)."""
        return _json_ready(asdict(self))

    def verdict(self, metric: str, name_a: str = "A", name_b: str = "B") -> str:
        """One sentence: the difference, its interval, and whether seed noise explains it."""
        if self.n < 2:
            return (
                f"{metric}: {name_b} - {name_a} = {self.mean_diff:+.4f} from one seed; "
                "run at least 2 seeds (better 5) to tell it from seed noise"
            )
        ci = f"95% CI [{self.ci_low:+.4f}, {self.ci_high:+.4f}]"
        test = f"paired t = {self.t:.2f}, p = {self.p_value:.3f}, n = {self.n}"
        if self.distinguishable:
            better = name_b if self.mean_diff > 0 else name_a
            return (
                f"{metric}: {name_b} - {name_a} = {self.mean_diff:+.4f} ({ci}; {test}): "
                f"distinguishable from seed noise, {better} is higher"
            )
        return (
            f"{metric}: {name_b} - {name_a} = {self.mean_diff:+.4f} ({ci}; {test}): "
            "NOT distinguishable from seed noise"
        )


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Paired t-test and 95% interval of ``b - a`` (same seeds, same order; see module doc)."""
    if len(a) != len(b):
        raise ValueError(f"paired: arms differ in length ({len(a)} vs {len(b)}); pair by seed")
    if not a:
        raise ValueError("paired: no pairs")
    diffs = tuple(float(y) - float(x) for x, y in zip(a, b, strict=True))
    n = len(diffs)
    mean = math.fsum(diffs) / n
    if n < 2:
        return Paired(n, mean, math.nan, math.nan, math.nan, math.nan, math.nan, False, diffs)
    std = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    sem = std / math.sqrt(n)
    # identical differences (sem 0): no noise at all, so any non-zero shift is certain
    shift = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    t = mean / sem if sem > 0.0 else shift
    p_value = t_two_sided_p(t, n - 1)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * sem
    low, high = mean - half, mean + half
    distinguishable = low > 0.0 or high < 0.0
    return Paired(n, mean, std, low, high, t, p_value, distinguishable, diffs)


def summarize_runs(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, Summary]:
    """Per-metric summaries of ``{seed: {metric: value}}``, over the metrics every seed has."""
    if not per_seed:
        raise ValueError("summarize_runs: no runs")
    common = set.intersection(*(set(m) for m in per_seed.values()))
    seeds = sorted(per_seed)
    return {k: summarize([per_seed[s][k] for s in seeds]) for k in sorted(common)}


def compare_runs(
    a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]]
) -> dict[str, Paired]:
    """Per-metric paired comparisons of B against A over the seeds both arms have."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(
            f"compare: the arms share no seed (A: {sorted(a)}, B: {sorted(b)}); "
            "run both over the same seeds"
        )
    common = set.intersection(*(set(a[s]) & set(b[s]) for s in seeds))
    return {k: paired([a[s][k] for s in seeds], [b[s][k] for s in seeds]) for k in sorted(common)}


def _json_ready(data: dict[str, Any]) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        return v

    return {k: conv(v) for k, v in data.items()}


__all__ = [
    "CONFIDENCE",
    "Paired",
    "Summary",
    "compare_runs",
    "paired",
    "summarize",
    "summarize_runs",
    "t_cdf",
    "t_quantile",
    "t_two_sided_p",
]
