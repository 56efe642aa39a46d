"""Epoch hooks by name (the recipe's ``hooks.enabled``), built in the order given."""

from __future__ import annotations

from collections.abc import Sequence

from classifier_training.hooks.augment_preview import AugmentPreviewHook
from classifier_training.hooks.base import EvalResult, FitContext, Hook
from classifier_training.hooks.confusion_matrix import ConfusionMatrixHook
from classifier_training.hooks.dataset_stats import DatasetStatsHook
from classifier_training.hooks.export import ExportHook
from classifier_training.hooks.history import HistoryHook
from classifier_training.hooks.model_info import ModelInfoHook
from classifier_training.hooks.sample_predictions import SamplePredictionsHook
from classifier_training.hooks.sampler_distribution import SamplerDistributionHook

HOOKS: dict[str, type[Hook]] = {
    cls.name: cls
    for cls in (
        DatasetStatsHook,
        ModelInfoHook,
        AugmentPreviewHook,
        ConfusionMatrixHook,
        HistoryHook,
        SamplePredictionsHook,
        SamplerDistributionHook,
        ExportHook,
    )
}


def build_hooks(names: Sequence[str]) -> list[Hook]:
    """Instantiate the hooks named in ``names`` (recipe ``hooks.enabled``), in that order.

    Raises ValueError for an unknown or repeated name, listing the valid ones.
    """
    unknown = [n for n in names if n not in HOOKS]
    if unknown:
        raise ValueError(
            f"hooks.enabled: unknown hook(s) {', '.join(map(repr, unknown))}; "
            f"valid hooks: {', '.join(HOOKS)}"
        )
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"hooks.enabled: {', '.join(map(repr, repeated))} listed twice")
    return [HOOKS[n]() for n in names]


__all__ = ["HOOKS", "EvalResult", "FitContext", "Hook", "build_hooks"]
