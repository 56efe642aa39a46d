"""Confidence calibration of an exported model: temperature, ECE, abstain threshold (numpy only).

Fitted at export time from the fp32 model's logits on the validation split; evaluated on the
test split. Torch-free so that the consumer side (predictor, evaluator) can import it.

* Temperature scaling (Guo et al., 2017): ``p = softmax(z / T)`` with one scalar ``T > 0`` that
  minimises the validation negative log-likelihood ``NLL(T) = mean_i[logsumexp(z_i / T) -
  z_i[y_i] / T]``. NLL is convex in ``1/T``, hence unimodal in ``log T``: a golden-section search
  on ``log T`` finds the minimum without derivatives (and without scipy). Top-1 never changes.
* Expected calibration error with ``B`` equal-width confidence bins:
  ``ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` on the top-1 confidence (the definition of
  torchmetrics' ``multiclass_calibration_error(norm="l1")``, re-written here because this
  module must not import torch).
* Abstain threshold for a target precision ``P``: sort validation images by calibrated
  confidence, descending; keep the largest prefix (cut only between distinct confidences) whose
  top-1 precision is ``>= P``; the threshold is the confidence of its last image. A prediction
  with confidence ``>= threshold`` is accepted, anything below is "unknown". Coverage is the
  accepted fraction; reported on the held-out test split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_BINS = 15
LOG_T_RANGE = (math.log(0.05), math.log(20.0))
"""Search interval of ``log T``: a temperature outside [0.05, 20] means a broken model."""

FloatArray = npt.NDArray[np.float64]


def _as_logits(logits: npt.ArrayLike) -> FloatArray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise ValueError(f"expected logits [N >= 1, C >= 2], got shape {list(z.shape)}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinity; the model output is broken")
    return z


def softmax_t(logits: npt.ArrayLike, temperature: float = 1.0) -> FloatArray:
    """Row-wise ``softmax(z / T)`` in float64, stable (max subtracted)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    out: FloatArray = e / e.sum(axis=-1, keepdims=True)
    return out


def nll(logits: npt.ArrayLike, targets: npt.ArrayLike, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits / T)``."""
    z = _as_logits(logits) / temperature
    y = np.asarray(targets, dtype=np.int64)
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def fit_temperature(
    logits: npt.ArrayLike, targets: npt.ArrayLike, tol: float = 1e-5, max_iter: int = 200
) -> float:
    """``argmin_T NLL(T)`` by golden-section search on ``log T`` in :data:`LOG_T_RANGE`.

    Stops when the bracket is narrower than ``tol`` (in log T, i.e. a relative precision of
    ``tol`` on T).
    """
    z = _as_logits(logits)
    y = np.asarray(targets, dtype=np.int64)
    if y.shape != (z.shape[0],) or y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"targets must be {z.shape[0]} class indices in [0, {z.shape[1]})")
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    lo, hi = LOG_T_RANGE
    a, b = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    fa, fb = nll(z, y, math.exp(a)), nll(z, y, math.exp(b))
    for _ in range(max_iter):
        if hi - lo < tol:
            break
        if fa <= fb:  # the minimum lies in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - inv_phi * (hi - lo)
            fa = nll(z, y, math.exp(a))
        else:  # in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + inv_phi * (hi - lo)
            fb = nll(z, y, math.exp(b))
    return math.exp((lo + hi) / 2.0)


def top1_confidence(
    logits: npt.ArrayLike, targets: npt.ArrayLike, temperature: float = 1.0
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """(top-1 confidence, top-1 correct) per image under ``softmax(logits / T)``."""
    p = softmax_t(_as_logits(logits), temperature)
    pred = p.argmax(axis=1)
    return p.max(axis=1), pred == np.asarray(targets, dtype=np.int64)


def reliability_bins(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = DEFAULT_BINS
) -> list[dict[str, float]]:
    """Equal-width bins over (0, 1]: ``lo``, ``hi``, ``count``, ``accuracy``, ``confidence``
    (mean top-1 confidence); empty bins have count 0 and NaN means."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin b holds (edges[b], edges[b+1]]; confidence 0 (impossible after softmax) goes to bin 0.
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": n,
                "accuracy": float(ok[sel].mean()) if n else math.nan,
                "confidence": float(conf[sel].mean()) if n else math.nan,
            }
        )
    return bins


def expected_calibration_error(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = DEFAULT_BINS
) -> float:
    """``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over equal-width bins (0 for N = 0)."""
    bins = reliability_bins(confidence, correct, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return 0.0
    return float(
        sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    )


def abstain_threshold(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, target_precision: float
) -> tuple[float, bool]:
    """The lowest confidence threshold whose accepted set has precision ``>= target``.

    Returns ``(threshold, reached)``. When even the most confident images miss the target,
    ``reached`` is False and the threshold is just above the highest confidence seen (the
    model then abstains on everything it is that unsure about: all of validation).
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target precision must be in (0, 1], got {target_precision}")
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        raise ValueError("abstain threshold needs at least one validation image")
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    precision = np.cumsum(ok) / np.arange(1, len(ok) + 1)
    # A cut after position k is possible only where the next confidence is strictly lower.
    boundary = np.append(conf[1:] < conf[:-1], True)
    good = np.flatnonzero(boundary & (precision >= target_precision - 1e-12))
    if good.size == 0:
        return float(np.nextafter(conf[0], np.inf)), False
    return float(conf[good[-1]]), True


def selective_stats(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, threshold: float
) -> dict[str, Any]:
    """Coverage (accepted / all) and precision (correct / accepted; None when nothing is
    accepted) at ``threshold``, plus the counts."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    accepted = conf >= threshold
    n_acc = int(accepted.sum())
    return {
        "coverage": n_acc / conf.size if conf.size else 0.0,
        "precision": float(ok[accepted].mean()) if n_acc else None,
        "accepted": n_acc,
        "total": int(conf.size),
    }


@dataclass
class Calibration:
    """What export stores under ``calibration`` in labels_mapping.json and the ONNX metadata.

    ``coverage`` / ``ece_*`` are measured on ``eval_split`` (the test split when there is one,
    else validation); ``val_*`` on the validation split the temperature and threshold were
    fitted on.
    """

    temperature: float
    threshold: float
    target_precision: float
    coverage: float
    ece_before: float
    ece_after: float
    precision: float | None
    threshold_reached: bool
    eval_split: str
    fit_split: str
    n_fit: int
    n_eval: int
    val_coverage: float
    val_precision: float | None
    n_bins: int = DEFAULT_BINS
    bins_before: list[dict[str, float]] = field(default_factory=list, repr=False)
    bins_after: list[dict[str, float]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """The JSON block for labels_mapping.json / ONNX metadata (no reliability bins)."""
        out = asdict(self)
        out.pop("bins_before")
        out.pop("bins_after")
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def calibrate(
    val_logits: npt.ArrayLike,
    val_targets: npt.ArrayLike,
    eval_logits: npt.ArrayLike | None = None,
    eval_targets: npt.ArrayLike | None = None,
    *,
    target_precision: float = 0.99,
    fit_split: str = "valid",
    eval_split: str = "test",
    n_bins: int = DEFAULT_BINS,
) -> Calibration:
    """Fit T and the abstain threshold on validation; measure ECE and coverage on ``eval``.

    Without eval logits the validation split is used for both (and ``eval_split`` says so).
    """
    vz, vy = _as_logits(val_logits), np.asarray(val_targets, dtype=np.int64)
    if eval_logits is None or eval_targets is None:
        ez, ey, eval_split = vz, vy, fit_split
    else:
        ez, ey = _as_logits(eval_logits), np.asarray(eval_targets, dtype=np.int64)
    t = fit_temperature(vz, vy)
    v_conf, v_ok = top1_confidence(vz, vy, t)
    threshold, reached = abstain_threshold(v_conf, v_ok, target_precision)
    v_sel = selective_stats(v_conf, v_ok, threshold)
    e_conf0, e_ok = top1_confidence(ez, ey, 1.0)
    e_conf, _ = top1_confidence(ez, ey, t)
    e_sel = selective_stats(e_conf, e_ok, threshold)
    return Calibration(
        temperature=t,
        threshold=threshold,
        target_precision=float(target_precision),
        coverage=e_sel["coverage"],
        precision=e_sel["precision"],
        ece_before=expected_calibration_error(e_conf0, e_ok, n_bins),
        ece_after=expected_calibration_error(e_conf, e_ok, n_bins),
        threshold_reached=reached,
        eval_split=eval_split,
        fit_split=fit_split,
        n_fit=len(vy),
        n_eval=len(ey),
        val_coverage=v_sel["coverage"],
        val_precision=v_sel["precision"],
        n_bins=n_bins,
        bins_before=reliability_bins(e_conf0, e_ok, n_bins),
        bins_after=reliability_bins(e_conf, e_ok, n_bins),
    )


def read_calibration(mapping: Mapping[str, Any], where: str) -> dict[str, float] | None:
    """The ``calibration`` block of a labels mapping, validated (None when absent).

    Raises ValueError naming ``where`` when temperature or threshold are unusable.
    """
    cal = mapping.get("calibration")
    if cal is None:
        return None
    if not isinstance(cal, Mapping):
        raise ValueError(f"{where}: calibration must be an object")
    t, thr = cal.get("temperature"), cal.get("threshold")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or math.isinf(t):
        raise ValueError(f"{where}: calibration.temperature must be a number > 0, got {t!r}")
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr):
        raise ValueError(f"{where}: calibration.threshold must be a number, got {thr!r}")
    return {"temperature": float(t), "threshold": float(thr)}


def plot_reliability(cal: Calibration, title: str) -> Any:
    """Reliability diagram before/after temperature scaling (a matplotlib ``Figure``).

    Bars: accuracy per confidence bin; the diagonal is perfect calibration; the bar width of
    each bin is fixed, its count is printed above it.
    """
    from matplotlib.figure import Figure  # only the export side draws

    fig = Figure(figsize=(11, 5), layout="constrained")
    panels = (
        ("before (T = 1)", cal.bins_before, cal.ece_before),
        (f"after (T = {cal.temperature:.3f})", cal.bins_after, cal.ece_after),
    )
    for i, (name, bins, ece) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        lo = np.array([b["lo"] for b in bins])
        width = np.array([b["hi"] - b["lo"] for b in bins])
        acc = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
        conf = np.array([b["confidence"] if b["count"] else np.nan for b in bins])
        ax.bar(
            lo,
            acc,
            width=width,
            align="edge",
            color="tab:blue",
            edgecolor="white",
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.plot(lo + width / 2, conf, "o", color="tab:red", markersize=4, label="mean confidence")
        for b in bins:
            if b["count"]:
                ax.text(
                    (b["lo"] + b["hi"]) / 2,
                    min(1.0, b["accuracy"]) + 0.01,
                    str(b["count"]),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("top-1 confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {ece:.4f}")
        ax.grid(True, linestyle=":", alpha=0.5)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"{title}: {cal.eval_split} split ({cal.n_eval} images), {cal.n_bins} bins\nabstain "
        f"below {cal.threshold:.3f} keeps {cal.coverage:.1%} at precision "
        f"{cal.precision if cal.precision is not None else float('nan'):.3f} "
        f"(target {cal.target_precision})"
    )
    return fig
