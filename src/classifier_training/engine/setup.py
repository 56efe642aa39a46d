"""Build a run's parts once: ``setup(recipe)`` -> the frozen ``Run`` bundle and the trainer state.

Order matters for exact resume and reproducibility: the model is created (its init draws from
the seeded RNG) before the optimizer, everything is prepared by Accelerate, then a resume
restores Accelerate's state (weights, optimizer, RNG), the EMA and the ``TrainerState``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import torch
from accelerate import Accelerator
from timm.scheduler.scheduler import Scheduler
from timm.utils.model_ema import ModelEmaV3

from classifier_training.augment.pipeline import BatchAugment
from classifier_training.augment.presets import AugmentParams, resolve
from classifier_training.checkpoint import CheckpointManager, TrainerState, load_checkpoint
from classifier_training.data.cache import SplitCaches, open_caches
from classifier_training.data.imbalance import class_counts, inverse_frequency_weights
from classifier_training.data.index import DatasetIndex
from classifier_training.data.labels import labels_mapping, write_labels_mapping
from classifier_training.data.loaders import Loaders, build_loaders, load_index
from classifier_training.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from classifier_training.hooks import BackgroundWork, build_hooks
from classifier_training.hooks.base import FitContext, Hook
from classifier_training.model import create_model
from classifier_training.optim import (
    build_criterion,
    build_optimizer,
    build_scheduler,
    updates_per_epoch,
)
from classifier_training.recipe import Recipe, recipe_to_dict, save_recipe
from classifier_training.run_folder import RunGuard
from classifier_training.runtime import RuntimeInfo, build_accelerator, describe_runtime
from classifier_training.timing import PhaseTimer
from classifier_training.tracking import MetricsLog, Progress, init_wandb


@dataclass(frozen=True)
class Run:
    """The parts of one training run, built once by ``setup``.

    Nothing here is reassigned during training; the loop position and bookkeeping live in the
    ``TrainerState`` that ``setup`` returns beside it (``ctx`` is the hooks' view, which the
    engine refreshes at each epoch end).
    """

    recipe: Recipe
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module  # prepared (may be DDP-wrapped)
    train_model: torch.nn.Module  # what the training step calls: ``model``, or it compiled
    ema: ModelEmaV3 | None  # never prepared: a prepared nn.Module would be DDP-wrapped
    optimizer: torch.optim.Optimizer  # prepared
    scheduler: Scheduler  # stepped per update
    criterion: torch.nn.Module  # on the device (training)
    eval_criterion: torch.nn.Module  # on the CPU (gathered logits)
    augment: BatchAugment
    generator: torch.Generator  # the augmentation's, reseeded per batch
    loaders: Loaders  # the raw loaders and datasets (epoch seeding, previews)
    train_loader: Any  # prepared loaders (Accelerate's DataLoaderShard / Dispatcher)
    val_loader: Any
    test_loader: Any | None
    batches_per_epoch: int  # per process, after ``train.max_batches_per_epoch``
    channels_last: bool
    class_names: list[str]  # index order
    selected: Literal["ema", "raw"]  # the weights behind val/, checkpoints and export
    checkpoints: CheckpointManager
    metrics_log: MetricsLog
    progress: Progress
    hooks: tuple[Hook, ...]
    ctx: FitContext
    guard: RunGuard  # the run folder's lock, stop signals, step-checkpoint cadence
    timer: PhaseTimer  # per-phase seconds of the current epoch (``time/*`` metrics)

    def ema_module(self) -> torch.nn.Module | None:
        """The EMA weights' module (what checkpoints store as ``ema``), or None."""
        return self.ema.module if self.ema is not None else None


def setup(recipe: Recipe) -> tuple[Run, TrainerState]:
    """Build every part of the run named by ``recipe``; restore them when resuming.

    Returns the frozen bundle and the trainer state (fresh, or the checkpoint's on resume).
    Side effects: the run folder with ``recipe.yaml`` and ``labels_mapping.json``, seeded RNGs,
    and the W&B tracker when enabled. The run folder stays locked until ``run.guard`` closes
    (``train`` closes it; so does a failing setup).
    """
    accelerator, runtime = build_accelerator(recipe, recipe.run_dir)
    guard = RunGuard(accelerator, recipe)  # lock, then resume / refuse / overwrite
    try:
        return _setup(recipe, accelerator, runtime, guard)
    except BaseException:
        guard.close()
        raise


def _setup(
    recipe: Recipe, accelerator: Accelerator, runtime: RuntimeInfo, guard: RunGuard
) -> tuple[Run, TrainerState]:
    # Every image is decoded (the main process first, the others then hit the check's cache)
    # before anything is written: bad input stops here and leaves the run folder as it was.
    with accelerator.main_process_first():
        index = load_index(recipe.data, recipe.train.monitor)
    run_dir = recipe.run_dir
    guard.admit(index)  # a resume is checked against its checkpoint before anything is written
    if accelerator.is_main_process:
        save_recipe(recipe, run_dir / "recipe.yaml")
    class_names = _labels(recipe, accelerator, run_dir, index)
    data = recipe.data
    caches, aug_params, loaders = _build_data(recipe, accelerator, index)
    if accelerator.is_local_main_process:  # the RAM cache's files go with the run
        guard.close_with_run(caches.release)
    parts = _build_trainables(recipe, accelerator, loaders, index, class_names)
    compiled = ", torch.compile on" if recipe.train.compile else ""
    accelerator.print(describe_runtime(accelerator, runtime, workers=data.num_workers,
                                       extra=caches.describe() + compiled))  # fmt: skip
    # Forked now, before W&B's threads and the loader workers exist (main process only).
    background = BackgroundWork(
        recipe.hooks.background if accelerator.is_main_process else "inline"
    )
    guard.close_with_run(lambda: background.close(cancel=True))  # jobs not started are dropped
    augment = BatchAugment(aug_params, recipe.data.image_size, IMAGENET_MEAN, IMAGENET_STD)
    generator = torch.Generator(device=accelerator.device)
    checkpoints = CheckpointManager(
        run_dir,
        recipe.train.monitor,
        recipe.train.monitor_mode,
        recipe.train.keep_top_k,
        background=recipe.train.checkpoint_background,
    )
    guard.attach(checkpoints)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    state = _restore(guard, accelerator, parts.ema, metrics_log)
    parts.scheduler.step_update(state.updates)
    state.wandb_run_id = init_wandb(
        accelerator,
        recipe.logging,
        recipe.name,
        run_dir,
        recipe_to_dict(recipe),
        state.wandb_run_id,
    )
    tracker = _TrackerLog(accelerator, state)
    ctx = FitContext(
        recipe=recipe,
        accelerator=accelerator,
        run_dir=run_dir,
        index=index,
        loaders=loaders,
        model=parts.model,
        ema=parts.ema,
        augment=augment,
        class_names=class_names,
        log_images=tracker.images,
        log_metrics=tracker.metrics,
        background=background,
    )
    run = Run(
        recipe=recipe,
        run_dir=run_dir,
        accelerator=accelerator,
        augment=augment,
        generator=generator,
        loaders=loaders,
        class_names=class_names,
        selected="ema" if parts.ema is not None and recipe.ema.select == "ema" else "raw",
        checkpoints=checkpoints,
        metrics_log=metrics_log,
        progress=Progress(
            recipe.logging.progress, recipe.logging.log_every, accelerator.is_main_process
        ),
        hooks=tuple(build_hooks(recipe.hooks.enabled)),
        ctx=ctx,
        guard=guard,
        timer=PhaseTimer(accelerator.device),
        **parts._asdict(),
    )
    return run, state


def _build_data(
    recipe: Recipe, accelerator: Accelerator, index: DatasetIndex
) -> tuple[SplitCaches, AugmentParams, Loaders]:
    """The decoded-image caches, the resolved augmentation and the loaders (whose JPEG
    re-encode draws come from the augmentation's degradation settings)."""
    data = recipe.data
    caches = open_caches(index, mode=data.cache, image_size=data.image_size,
                         train_fit=data.train_fit, cache_dir=data.cache_dir,
                         first=accelerator.local_main_process_first)  # fmt: skip
    aug_params = resolve(recipe.augment)
    loaders = build_loaders(
        data,
        index,
        jpeg_p=aug_params.degrade_p * aug_params.jpeg_p,
        jpeg_quality=aug_params.jpeg_quality,
        seed=recipe.train.seed,
        num_processes=accelerator.num_processes,
        caches=caches.caches,
    )
    return caches, aug_params, loaders


class _Trainables(NamedTuple):
    """What ``_build_trainables`` hands to ``Run`` (same field names)."""

    model: torch.nn.Module
    train_model: torch.nn.Module
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    criterion: torch.nn.Module
    eval_criterion: torch.nn.Module
    train_loader: Any
    val_loader: Any
    test_loader: Any | None
    batches_per_epoch: int
    channels_last: bool


def _build_trainables(
    recipe: Recipe,
    accelerator: Accelerator,
    loaders: Loaders,
    index: DatasetIndex,
    class_names: list[str],
) -> _Trainables:
    """Model, optimizer and criteria, prepared by Accelerate with the loaders; EMA; schedule.

    The loss weighs classes by inverse train frequency (one copy on the device for training,
    one on the CPU for gathered evaluation logits).
    """
    class_weights = inverse_frequency_weights(class_counts(index.train.targets, len(class_names)))
    device = accelerator.device
    channels_last = recipe.model.channels_last == "on" or (
        recipe.model.channels_last == "auto" and device.type == "cuda"
    )
    model = create_model(recipe.model, len(class_names))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(recipe.optim, model)
    criterion = build_criterion(recipe.loss, class_weights.to(device))
    eval_criterion = build_criterion(recipe.loss, class_weights)  # on gathered CPU logits
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, loaders.train, loaders.val
    )
    test_loader = accelerator.prepare(loaders.test) if loaders.test is not None else None
    ema = _build_ema(recipe, accelerator, model)
    batches_per_epoch = len(train_loader)
    if recipe.train.max_batches_per_epoch:
        batches_per_epoch = min(batches_per_epoch, recipe.train.max_batches_per_epoch)
    scheduler = build_scheduler(
        recipe.schedule,
        optimizer,
        lr=recipe.optim.lr,
        epochs=recipe.train.epochs,
        updates_per_epoch=updates_per_epoch(batches_per_epoch, recipe.train.grad_accum_steps),
    )
    # Only the training step is compiled: checkpoints, EMA and evaluation keep the plain module
    # (its state dict has no ``_orig_mod.`` prefixes).
    train_model = cast(torch.nn.Module, torch.compile(model)) if recipe.train.compile else model
    return _Trainables(
        model,
        train_model,
        ema,
        optimizer,
        scheduler,
        criterion,
        eval_criterion,
        train_loader,
        val_loader,
        test_loader,
        batches_per_epoch,
        channels_last,
    )


def _labels(
    recipe: Recipe, accelerator: Accelerator, run_dir: Path, index: DatasetIndex
) -> list[str]:
    """Class names in index order; the main process writes labels_mapping.json."""
    class_names = [name for name, _ in sorted(index.class_to_idx.items(), key=lambda kv: kv[1])]
    if accelerator.is_main_process:
        mapping = labels_mapping(index.class_to_idx, recipe.data.image_size)
        write_labels_mapping(run_dir / "labels_mapping.json", mapping)
    return class_names


def _build_ema(
    recipe: Recipe, accelerator: Accelerator, model: torch.nn.Module
) -> ModelEmaV3 | None:
    """timm's EMA of the prepared (on-device) bare model, or None when ``ema.enabled`` is off."""
    if not recipe.ema.enabled:
        return None
    ema = ModelEmaV3(
        accelerator.unwrap_model(model),
        decay=recipe.ema.decay,
        use_warmup=recipe.ema.warmup,
        warmup_gamma=recipe.ema.warmup_gamma,
        warmup_power=recipe.ema.warmup_power,
    )
    # prepare() put an autocast ``forward`` on the model instance, and the deepcopy carried it
    # over: without these two attributes the EMA evaluates in fp32, the deployment precision.
    for attr in ("forward", "_original_forward"):
        ema.module.__dict__.pop(attr, None)
    return ema


def _restore(
    guard: RunGuard, accelerator: Accelerator, ema: ModelEmaV3 | None, metrics_log: MetricsLog
) -> TrainerState:
    """A fresh state, or on resume: Accelerate's state, the EMA weights and the trainer state
    of the checkpoint the guard chose and verified.

    ``metrics.jsonl`` loses the lines of epochs after the checkpoint (they will be replayed).
    """
    if guard.choice is None:
        return TrainerState()
    state = guard.resumed_position(load_checkpoint(accelerator, guard.choice.path, ema))
    accelerator.print(guard.choice.describe())
    if accelerator.is_main_process:
        metrics_log.truncate_after(state.epoch)
        logged = metrics_log.read()
        if state.metrics.get("epoch") == state.epoch and (
            not logged or logged[-1].get("epoch", 0) < state.epoch
        ):  # stopped after the checkpoint, before the epoch's line (written after the hooks)
            metrics_log.append(state.metrics)
    return state


class _TrackerLog:
    """``FitContext.log_images`` / ``log_metrics``: to the trackers at the current update count."""

    def __init__(self, accelerator: Accelerator, state: TrainerState) -> None:
        self.accelerator, self.state = accelerator, state

    def images(self, images: dict[str, Path]) -> None:
        if self.accelerator.trackers:
            import wandb

            logged = {k: wandb.Image(str(p)) for k, p in images.items()}
            self.accelerator.log(logged, step=self.state.updates)

    def metrics(self, values: dict[str, float]) -> None:
        if self.accelerator.trackers:
            self.accelerator.log(values, step=self.state.updates)
