"""What the weighted sampler actually drew in the epoch that just ended, per class.

Active only when the train loader uses a
:class:`~classifier_training.data.imbalance.WeightedClassSampler` (``data.sampler`` auto or
manual). For class ``c``, with ``N = len(last_indices)`` rows drawn and row weights ``w``::

    sampled_c  = #{i in last_indices : target_i = c}
    expected_c = N * sum(w_i : target_i = c) / sum(w_i)

Written to ``epochs/NNN/sampler_distribution.json``; the sampled counts go to the trackers as
``sampler/count/<label>`` (``ctx.log_metrics``). The full table is printed at the first and the last
epoch, a one-line summary otherwise.
"""

from __future__ import annotations

from typing import Any

import torch

from classifier_training.data.imbalance import WeightedClassSampler
from classifier_training.hooks.base import FitContext, Hook
from classifier_training.hooks.common import format_table
from classifier_training.io import atomic_write_json


def sampler_distribution(
    sampler: WeightedClassSampler, targets: list[int], class_names: list[str]
) -> dict[str, dict[str, Any]]:
    """Per class: train rows, sampled count, expected count and sampled/expected ratio."""
    num_classes = len(class_names)
    t = torch.tensor(targets, dtype=torch.long)
    drawn = torch.tensor(sampler.last_indices, dtype=torch.long)
    sampled = torch.bincount(t[drawn], minlength=num_classes)
    weights = sampler.weights.to(torch.float64)
    share = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, t, weights)
    expected = len(drawn) * share / weights.sum()
    rows = torch.bincount(t, minlength=num_classes)
    out: dict[str, dict[str, Any]] = {}
    for c, label in enumerate(class_names):
        e = float(expected[c])
        out[label] = {
            "train_rows": int(rows[c]),
            "sampled": int(sampled[c]),
            "expected": e,
            "ratio": int(sampled[c]) / e if e > 0 else None,
        }
    return out


class SamplerDistributionHook(Hook):
    """Per-class sampled vs expected counts of the weighted sampler, every epoch."""

    name = "sampler_distribution"

    def on_epoch_end(self, ctx: FitContext) -> None:
        sampler = ctx.loaders.sampler
        if not isinstance(sampler, WeightedClassSampler) or not sampler.last_indices:
            return
        dist = sampler_distribution(sampler, ctx.index.train.targets, ctx.class_names)
        n = len(sampler.last_indices)
        atomic_write_json(
            ctx.epoch_dir() / "sampler_distribution.json",
            {"epoch": ctx.epoch + 1, "num_samples": n, "classes": dist},
        )
        ctx.log_metrics({f"sampler/count/{label}": d["sampled"] for label, d in dist.items()})
        ratios = [d["ratio"] for d in dist.values() if d["ratio"] is not None]
        if ctx.epoch == 0 or ctx.is_last_epoch:
            rows = [
                [
                    label,
                    d["train_rows"],
                    d["sampled"],
                    f"{d['expected']:.0f}",
                    f"{d['ratio']:.2f}x" if d["ratio"] is not None else "-",
                ]
                for label, d in dist.items()
            ]
            ctx.accelerator.print(
                format_table(
                    ["class", "train rows", "sampled", "expected", "ratio"],
                    rows,
                    title=f"Sampler distribution (epoch {ctx.epoch + 1}, {n} draws)",
                )
            )
        elif ratios:
            ctx.accelerator.print(
                f"sampler (epoch {ctx.epoch + 1}, {n} draws): sampled/expected per class "
                f"{min(ratios):.2f}x..{max(ratios):.2f}x"
            )
