"""Regression gate between two bundles evaluated on the same images (numpy + stdlib only).

Both bundles classify the same split; per image we know whether the old and the new model are
right. The images where they disagree on correctness are the discordant pairs:

* ``b`` = right -> wrong (the new bundle broke it), ``c`` = wrong -> right (it fixed it).

Under H0 "both models have the same error rate", each discordant image is a fair coin flip, so
the exact McNemar test is a binomial test with n = b + c, two-sided:

    p = min(1, 2 * sum_{k <= min(b, c)} C(n, k) / 2^n)

computed with exact integers (exact for any count). The new bundle is *significantly worse*
when it is less accurate and ``p < alpha``. Independently, a class *regresses* when its accuracy
drops by more than ``max_class_drop`` (absolute). The gate fails on either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_ALPHA = 0.05
DEFAULT_MAX_CLASS_DROP = 0.10
MAX_LISTED_FLIPS = 20
"""Flipped images printed per direction (the JSON report lists them all)."""


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (1.0 when none)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, float(2 * tail / 2**n))  # big-int true division: correctly rounded


def per_class_changes(
    y: npt.NDArray[np.int64],
    old_ok: npt.NDArray[np.bool_],
    new_ok: npt.NDArray[np.bool_],
    class_names: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Per class present in ``y``: images, right before/after, accuracies, ``change``."""
    out: dict[str, dict[str, Any]] = {}
    for c, label in enumerate(class_names):
        sel = y == c
        total = int(sel.sum())
        if total == 0:
            continue
        o, w = int(old_ok[sel].sum()), int(new_ok[sel].sum())
        out[label] = {
            "total": total,
            "old_correct": o,
            "new_correct": w,
            "old_accuracy": o / total,
            "new_accuracy": w / total,
            "change": (w - o) / total,
        }
    return out


def compare_predictions(
    targets: npt.ArrayLike,
    old_pred: npt.ArrayLike,
    new_pred: npt.ArrayLike,
    class_names: Sequence[str],
    images: Sequence[str],
    *,
    new_confidence: npt.ArrayLike | None = None,
    alpha: float = DEFAULT_ALPHA,
    max_class_drop: float = DEFAULT_MAX_CLASS_DROP,
) -> dict[str, Any]:
    """The comparison report (JSON-ready); ``passed`` is the gate's verdict.

    ``targets``/``*_pred`` are class indices into ``class_names``, one per image in ``images``.
    """
    y = np.asarray(targets, dtype=np.int64)
    old = np.asarray(old_pred, dtype=np.int64)
    new = np.asarray(new_pred, dtype=np.int64)
    if not (y.shape == old.shape == new.shape == (len(images),)):
        raise ValueError(
            f"need one target and one prediction per image: {len(images)} images, targets "
            f"{list(y.shape)}, old {list(old.shape)}, new {list(new.shape)}"
        )
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0 <= max_class_drop <= 1:
        raise ValueError(f"max_class_drop must be in [0, 1], got {max_class_drop}")
    conf = None if new_confidence is None else np.asarray(new_confidence, dtype=np.float64)
    old_ok, new_ok = old == y, new == y
    n = len(y)

    per_class = per_class_changes(y, old_ok, new_ok, class_names)
    regressed = [lab for lab, c in per_class.items() if -c["change"] > max_class_drop + 1e-12]

    def flips(mask: npt.NDArray[np.bool_]) -> list[dict[str, Any]]:
        rows = []
        for i in np.flatnonzero(mask).tolist():
            row: dict[str, Any] = {
                "image": images[i],
                "label": class_names[y[i]],
                "old_pred": class_names[old[i]],
                "new_pred": class_names[new[i]],
            }
            if conf is not None:
                row["new_confidence"] = float(conf[i])
            rows.append(row)
        if conf is not None:  # the most confident new mistakes first
            rows.sort(key=lambda r: -float(r["new_confidence"]))
        return rows

    b = int((old_ok & ~new_ok).sum())
    c = int((~old_ok & new_ok).sum())
    p = mcnemar_exact(b, c)
    old_acc = float(old_ok.mean()) if n else 0.0
    new_acc = float(new_ok.mean()) if n else 0.0
    worse = new_acc < old_acc and p < alpha
    regressed.sort(key=lambda lab: per_class[lab]["change"])
    return {
        "n_images": n,
        "old_accuracy": old_acc,
        "new_accuracy": new_acc,
        "accuracy_change": new_acc - old_acc,
        "mcnemar": {"right_to_wrong": b, "wrong_to_right": c, "p_value": p, "alpha": alpha},
        "significantly_worse": bool(worse),
        "max_class_drop": max_class_drop,
        "regressed_classes": regressed,
        "passed": not worse and not regressed,
        "per_class": per_class,
        "right_to_wrong": flips(old_ok & ~new_ok),
        "wrong_to_right": flips(~old_ok & new_ok),
    }


def format_comparison(report: dict[str, Any], old_name: str, new_name: str) -> str:
    """Console text: accuracies, McNemar, changed classes, flipped images, the verdict."""
    m = report["mcnemar"]
    n = report["n_images"]
    lines = [
        f"compare on {n} images: old {report['old_accuracy']:.4f} ({old_name})",
        f"                       new {report['new_accuracy']:.4f} ({new_name})   change "
        f"{report['accuracy_change']:+.4f}",
        f"exact McNemar: {m['right_to_wrong']} right->wrong, {m['wrong_to_right']} wrong->right, "
        f"p = {m['p_value']:.4g} (alpha {m['alpha']})",
        "",
    ]
    changed = [(lab, c) for lab, c in report["per_class"].items() if c["change"] != 0]
    changed.sort(key=lambda kv: kv[1]["change"])
    if changed:
        lines.append(f"{'label':>10}  {'images':>6}  {'old':>6}  {'new':>6}  {'change':>7}")
        for lab, c in changed:
            flag = "  REGRESSED" if lab in report["regressed_classes"] else ""
            lines.append(
                f"{lab:>10}  {c['total']:>6}  {c['old_accuracy']:>6.3f}  {c['new_accuracy']:>6.3f}"
                f"  {c['change']:>+7.3f}{flag}"
            )
    else:
        lines.append("no class changed accuracy")
    for key, name in (("right_to_wrong", "right -> wrong"), ("wrong_to_right", "wrong -> right")):
        rows = report[key]
        lines += ["", f"{name}: {len(rows)} image(s)"]
        for r in rows[:MAX_LISTED_FLIPS]:
            conf = f" ({r['new_confidence']:.2f})" if "new_confidence" in r else ""
            lines.append(
                f"  {r['image']}: true {r['label']}, old {r['old_pred']}, new {r['new_pred']}{conf}"
            )
        if len(rows) > MAX_LISTED_FLIPS:
            lines.append(f"  ... {len(rows) - MAX_LISTED_FLIPS} more in compare.json")
    lines.append("")
    reasons = []
    if report["significantly_worse"]:
        reasons.append(f"new bundle significantly worse (p = {m['p_value']:.3g} < {m['alpha']})")
    if report["regressed_classes"]:
        reasons.append(
            f"class(es) dropped by more than {report['max_class_drop']:.0%}: "
            + ", ".join(report["regressed_classes"])
        )
    lines.append("REGRESSION: " + "; ".join(reasons) if reasons else "PASS: no regression")
    return "\n".join(lines)
