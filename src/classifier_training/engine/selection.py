"""Validation and model selection: raw and EMA weights evaluated, one set chosen as ``val/``.

``track_best`` is the pure rule behind top-1 selection and early stopping: a value improves on
the best so far when it is better by more than ``min_delta`` (higher for ``max``, lower for
``min``); the first value always does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from accelerate import Accelerator

from classifier_training.checkpoint import TrainerState
from classifier_training.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from classifier_training.engine.setup import Run
from classifier_training.evaluation import EvalResult, evaluate
from classifier_training.runtime import exact_fp32


@dataclass(frozen=True)
class Validation:
    """One epoch's numbers: ``metrics`` holds the train values, ``val_raw/``, ``val_ema/`` (no
    per-class accuracies) and ``val/`` (every key of the selected weights); ``evals`` is keyed
    ``val_raw``, ``val_ema`` and ``val`` (the selected pass); ``value`` is the monitored metric."""

    metrics: dict[str, float]
    evals: dict[str, EvalResult]
    value: float


@dataclass(frozen=True)
class Best:
    """The best monitored value so far, its 0-based epoch, and epochs since it last improved."""

    value: float | None = None
    epoch: int = -1
    epochs_without_improvement: int = 0

    @classmethod
    def of(cls, state: TrainerState) -> Best:
        return cls(state.best_value, state.best_epoch, state.epochs_without_improvement)

    def store(self, state: TrainerState) -> None:
        """Write these values into ``state`` (the one mutable object of a run)."""
        state.best_value, state.best_epoch = self.value, self.epoch
        state.epochs_without_improvement = self.epochs_without_improvement


def track_best(
    best: Best, value: float, epoch: int, mode: Literal["max", "min"], min_delta: float
) -> Best:
    """The bookkeeping after ``epoch`` scored ``value``: a pure function.

    Improvement: ``best.value`` is None, or ``sign * (value - best.value) > min_delta`` with
    sign +1 for ``max`` and -1 for ``min``; then the epoch becomes the best and the wait resets
    to 0, otherwise the wait grows by one. A NaN value never improves on a number.
    """
    sign = 1.0 if mode == "max" else -1.0
    if best.value is None or sign * (value - best.value) > min_delta:
        return Best(value, epoch, 0)
    return Best(best.value, best.epoch, best.epochs_without_improvement + 1)


def validate(run: Run, metrics: dict[str, float]) -> Validation:
    """Evaluate raw (and EMA) weights on the val split; add their metrics to ``metrics``.

    The selected weights' metrics are repeated under ``val/``, which is what ``train.monitor``
    normally names. Raises KeyError naming the available keys when the monitor is not one.
    """
    metrics = dict(metrics)
    evals: dict[str, EvalResult] = {}
    if run.ema is not None:
        share_main_process_buffers(run.ema.module, run.accelerator)
    candidates = [("raw", run.model)] + ([("ema", run.ema.module)] if run.ema is not None else [])
    for weights, net in candidates:
        with exact_fp32():  # the EMA pass in true fp32 like the deployment (no TF32 convs)
            result = evaluate(
                net,
                run.val_loader,
                run.accelerator,
                run.eval_criterion,
                run.class_names,
                split="val",
                weights=weights,
                prefix=f"val_{weights}",
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                channels_last=run.channels_last,
            )
        evals[f"val_{weights}"] = result
        metrics.update({k: v for k, v in result.metrics.items() if "/acc_class/" not in k})
    chosen = evals[f"val_{run.selected}"]
    metrics.update(selected_as_val(chosen.metrics, run.selected))
    evals["val"] = chosen
    monitor = run.recipe.train.monitor
    if monitor not in metrics:
        raise KeyError(
            f"train.monitor={monitor!r} is not a metric; available: "
            + ", ".join(sorted(k for k in metrics if "/acc_class/" not in k))
        )
    return Validation(metrics, evals, metrics[monitor])


def selected_as_val(metrics: dict[str, float], selected: str) -> dict[str, float]:
    """``val_<selected>/name`` -> ``val/name`` (every key, per-class accuracies included)."""
    return {k.replace(f"val_{selected}/", "val/"): v for k, v in metrics.items()}


def share_main_process_buffers(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """Give every process the main process's buffers of ``module`` (BatchNorm statistics).

    DDP broadcasts the model's buffers from rank 0 at each forward, but after the last step of
    an epoch every rank has updated its own running statistics once more, and each rank's EMA
    averaged its own copies. Without this, every process would evaluate its shard with slightly
    different EMA statistics, and the metrics would not be those of the checkpoint (rank 0's).
    """
    if accelerator.num_processes == 1:
        return
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer.data, src=0)
