"""Epoch hooks by name (the recipe's ``hooks.enabled``), built in the order given."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from classifier_training.evaluation import EvalResult
from classifier_training.hooks.augment_preview import AugmentPreviewHook
from classifier_training.hooks.background import BackgroundJobError, BackgroundWork
from classifier_training.hooks.base import FitContext, Hook
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


class HookFailedElsewhereError(RuntimeError):
    """A hook raised on another process; that process's log has the cause."""


def run_hooks(
    hooks: Sequence[Hook],
    phase: Literal["on_fit_start", "on_epoch_end", "on_fit_end"],
    ctx: FitContext,
) -> None:
    """Call ``phase`` on every hook on the main process, then synchronise the processes.

    Only the main process runs hooks (they write the run folder); the others go straight to the
    closing all-reduce. Before the hooks, finished background jobs are collected (so a job that
    failed during the last epoch fails the run now); the fit-end round first waits for every
    job (fit-end hooks such as the export see every file) and again for what they submitted.

    A failure on the main process (a hook, or a background job) would leave the other processes
    waiting at the next barrier until the collective timeout. Instead every process learns of it
    through Accelerate's trigger (an all-reduce) and raises too.
    """
    accelerator = ctx.accelerator
    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            if phase == "on_fit_end":
                ctx.background.wait()
            else:
                ctx.background.collect()
            for hook in hooks:
                getattr(hook, phase)(ctx)
            if phase == "on_fit_end":
                ctx.background.wait()
        except Exception as err:  # re-raised below, on every process
            error = err
            accelerator.set_trigger()
    if accelerator.check_trigger():
        if error is not None:
            raise error
        raise HookFailedElsewhereError(f"a hook failed in {phase} on another process")


__all__ = [
    "HOOKS",
    "BackgroundJobError",
    "BackgroundWork",
    "EvalResult",
    "FitContext",
    "Hook",
    "HookFailedElsewhereError",
    "build_hooks",
    "run_hooks",
]
