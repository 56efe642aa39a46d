"""Train an image classifier: ``accelerate launch src/train.py --recipe recipes/quickstart.yaml``.

The algorithm, top to bottom (the pieces live in ``classifier_training``):

1. recipe -> run directory (fresh, or an explicit resume), Accelerator, seeds
2. dataset index (class map from train) -> labels_mapping.json -> loaders
3. timm model, EMA (never prepared), optimizer, loss; ``accelerator.prepare``; per-update schedule
4. resume: Accelerate state + EMA + trainer state; the schedule is rebuilt from the update count
5. each epoch: batched augmentation on the device -> forward/backward under ``accumulate`` ->
   clip -> step -> EMA + schedule per update; evaluate raw and EMA weights; checkpoint (top-k);
   metrics.jsonl + trackers; epoch hooks; early stopping agreed across processes
6. test split with the best selected weights; fit-end hooks (export)
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from timm.utils.model_ema import ModelEmaV3

from classifier_training.augment.pipeline import BatchAugment
from classifier_training.augment.presets import IMAGENET_MEAN, IMAGENET_STD, resolve
from classifier_training.checkpoint import (
    EMA_FILE,
    CheckpointError,
    CheckpointManager,
    TrainerState,
    find_resume_checkpoint,
    load_weights,
)
from classifier_training.data.imbalance import class_counts, inverse_frequency_weights
from classifier_training.data.labels import labels_mapping, write_labels_mapping
from classifier_training.data.loaders import build_loaders, load_index
from classifier_training.evaluation import evaluate
from classifier_training.hooks import build_hooks, run_hooks
from classifier_training.hooks.base import EvalResult, FitContext
from classifier_training.model import PretrainedWeightsError, create_model
from classifier_training.onnx_export import ExportError
from classifier_training.optim import (
    build_criterion,
    build_optimizer,
    build_scheduler,
    updates_per_epoch,
)
from classifier_training.recipe import Recipe, parse_recipe, recipe_to_dict, save_recipe
from classifier_training.runtime import build_accelerator
from classifier_training.synthetic import SyntheticDatasetError
from classifier_training.tracking import MetricsLog, Progress, init_wandb

log = logging.getLogger("train")


class TrainingInterruptedError(RuntimeError):
    """Raised by ``stop_after_updates`` (tests/debugging) right after a step checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainerState
    best_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


def prepare_run_dir(recipe: Recipe) -> Path:
    """Create the run directory; refuse to silently mix a new run into an old one's checkpoints."""
    run_dir = recipe.run_dir
    has_checkpoints = (run_dir / "checkpoints" / "ledger.json").exists()
    if has_checkpoints and not recipe.train.resume:
        if not recipe.train.overwrite:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints of an earlier run. Resume it with "
                "--train.resume auto, start over with --train.overwrite true, or pick another "
                "--train.output_dir."
            )
        shutil.rmtree(run_dir / "checkpoints")
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """Seed of the augmentation generator for one batch: a pure function of the loop position."""
    return (seed * 1_000_003 + epoch * 100_003 + batch) % (2**63 - 1)


def train(
    recipe: Recipe,
    *,
    batch_callback: Callable[[dict[str, torch.Tensor]], None] | None = None,
    stop_after_updates: int = 0,
) -> TrainResult:
    """Run a whole training job; see the module docstring for the algorithm."""
    # 1. run directory, accelerator, seeds ---------------------------------------------------
    run_dir = prepare_run_dir(recipe)
    accelerator = build_accelerator(recipe, run_dir)
    main = accelerator.is_main_process
    if main:
        save_recipe(recipe, run_dir / "recipe.yaml")

    # 2. data ----------------------------------------------------------------------------------
    with accelerator.main_process_first():  # the synthetic dataset is generated once
        index = load_index(recipe.data)
    class_names = [name for name, _ in sorted(index.class_to_idx.items(), key=lambda kv: kv[1])]
    num_classes = len(class_names)
    if main:
        mapping = labels_mapping(index.class_to_idx, recipe.data.image_size)
        write_labels_mapping(run_dir / "labels_mapping.json", mapping)
    aug_params = resolve(recipe.augment)
    loaders = build_loaders(
        recipe.data,
        index,
        jpeg_p=aug_params.degrade_p * aug_params.jpeg_p,
        jpeg_quality=aug_params.jpeg_quality,
        seed=recipe.train.seed,
    )
    train_targets = index.train.targets
    class_weights = inverse_frequency_weights(class_counts(train_targets, num_classes))

    # 3. model, EMA, optimizer, loss, schedule ------------------------------------------------
    device = accelerator.device
    channels_last = recipe.model.channels_last == "on" or (
        recipe.model.channels_last == "auto" and device.type == "cuda"
    )
    model = create_model(recipe.model, num_classes)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(recipe.optim, model)
    criterion = build_criterion(recipe.loss, class_weights.to(device))
    eval_criterion = build_criterion(recipe.loss, class_weights)  # on gathered CPU logits
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, loaders.train, loaders.val
    )
    test_loader = accelerator.prepare(loaders.test) if loaders.test is not None else None
    ema = None
    if recipe.ema.enabled:
        # Built from the prepared (on-device) bare model and never passed to prepare():
        # an nn.Module given to prepare() would be DDP-wrapped.
        ema = ModelEmaV3(
            accelerator.unwrap_model(model),
            decay=recipe.ema.decay,
            use_warmup=recipe.ema.warmup,
            warmup_gamma=recipe.ema.warmup_gamma,
            warmup_power=recipe.ema.warmup_power,
        )
    batches_per_epoch = len(train_loader)
    if recipe.train.max_batches_per_epoch:
        batches_per_epoch = min(batches_per_epoch, recipe.train.max_batches_per_epoch)
    upe = updates_per_epoch(batches_per_epoch, recipe.train.grad_accum_steps)
    scheduler = build_scheduler(
        recipe.schedule,
        optimizer,
        lr=recipe.optim.lr,
        epochs=recipe.train.epochs,
        updates_per_epoch=upe,
    )
    augment = BatchAugment(aug_params, recipe.data.image_size, IMAGENET_MEAN, IMAGENET_STD)
    generator = torch.Generator(device=device)
    use_ema = ema is not None and recipe.ema.select == "ema"
    selected: Literal["ema", "raw"] = "ema" if use_ema else "raw"
    monitor = recipe.train.monitor
    checkpoints = CheckpointManager(
        run_dir, monitor, recipe.train.monitor_mode, recipe.train.keep_top_k
    )
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")

    # 4. resume ---------------------------------------------------------------------------------
    state = TrainerState()
    if recipe.train.resume:
        ckpt = find_resume_checkpoint(recipe.train.resume, run_dir)
        accelerator.load_state(str(ckpt))
        state = TrainerState.from_file(ckpt / "trainer_state.json")
        if ema is not None:
            if not (ckpt / EMA_FILE).is_file():
                raise CheckpointError(f"{ckpt}: no {EMA_FILE}, but ema.enabled is true")
            ema.module.load_state_dict(load_weights(ckpt, "ema"))
        accelerator.print(
            f"resumed from {ckpt}: epoch {state.epoch + 1}, batch {state.batches_done}, "
            f"{state.updates} updates"
        )
        if main:
            metrics_log.truncate_after(state.epoch)
    scheduler.step_update(state.updates)
    state.wandb_run_id = init_wandb(
        accelerator,
        recipe.logging,
        recipe.name,
        run_dir,
        recipe_to_dict(recipe),
        state.wandb_run_id,
    )

    def log_images(images: dict[str, Path]) -> None:
        if accelerator.trackers:
            import wandb

            accelerator.log({k: wandb.Image(str(p)) for k, p in images.items()}, step=state.updates)

    val_preview = _first_images(loaders.val_dataset, recipe.hooks.sample_grid)
    ctx = FitContext(
        recipe=recipe,
        accelerator=accelerator,
        run_dir=run_dir,
        index=index,
        loaders=loaders,
        model=model,
        ema=ema,
        augment=augment,
        class_names=class_names,
        log_images=log_images,
    )
    hooks = build_hooks(recipe.hooks.enabled)
    run_hooks(hooks, "on_fit_start", ctx)

    # 5. epochs ------------------------------------------------------------------------------------
    progress = Progress(recipe.logging.progress, recipe.logging.log_every, main)
    stopped_early = False
    for epoch in range(state.epoch, recipe.train.epochs):
        # Order of the epoch = f(seed, epoch): set it explicitly, also after a resume.
        train_loader.set_epoch(epoch)
        loaders.set_epoch(
            epoch
        )  # JPEG draws and weighted sampler; Accelerate's call may not reach them
        batches: Any = train_loader
        if state.batches_done:
            batches = accelerator.skip_first_batches(train_loader, state.batches_done)
            batches.set_epoch(epoch)
        model.train()
        progress.start_epoch(epoch, recipe.train.epochs, batches_per_epoch, state.batches_done)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = torch.zeros((), device=device)
        grad_norm = torch.zeros(())
        for batch in batches:
            if state.batches_done >= batches_per_epoch:
                break
            if batch_callback is not None:
                batch_callback(batch)
            generator.manual_seed(
                batch_seed(recipe.train.seed, epoch, state.batches_done) + accelerator.process_index
            )
            with accelerator.accumulate(model):
                images = augment(batch["image"], generator)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                logits = model(images).float()
                loss = criterion(logits, batch["target"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.optim.clip_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), recipe.optim.clip_grad_norm
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_done += 1
            loss_sum += loss.detach() * len(batch["target"])
            correct += (logits.detach().argmax(1) == batch["target"]).sum()
            seen += len(batch["target"])
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                # fp16 overflow skipped the step: then the EMA and schedule must not move either.
                state.updates += 1
                if ema is not None:
                    # step = updates + 1 makes timm's warmup d = 1 - (1 + (n+1)/gamma)^-power;
                    # gamma 9, power 1 give the reference's d = min(decay, (1+n)/(10+n)).
                    ema.update(accelerator.unwrap_model(model), step=state.updates + 2)
                scheduler.step_update(state.updates)
            lr = optimizer.param_groups[0]["lr"]
            if accelerator.trackers and state.updates % recipe.logging.log_every == 0:
                step_values = {"train/loss_step": float(loss.detach()), "train/lr": lr}
                accelerator.log(step_values, step=state.updates)
            progress.step(
                len(batch["target"]) * accelerator.num_processes,
                state.updates,
                loss.detach(),
                lr,
            )
            every = recipe.train.checkpoint_every_updates
            periodic = accelerator.sync_gradients and every and state.updates % every == 0
            interrupt = stop_after_updates and state.updates >= stop_after_updates
            if periodic or interrupt:
                ema_module = ema.module if ema is not None else None
                checkpoints.save(accelerator, f"step-{state.updates:07d}", state, ema_module, None)
            if interrupt:
                raise TrainingInterruptedError(f"stopped after {state.updates} updates")
        images_per_s = progress.end_epoch()

        # Evaluate raw and EMA weights; the selected ones drive checkpoints and early stopping.
        totals = accelerator.reduce(torch.stack([loss_sum, correct, seen]), reduction="sum")
        metrics: dict[str, float] = {
            "epoch": float(epoch + 1),
            "updates": float(state.updates),
            "train/loss": float(totals[0] / totals[2].clamp(min=1)),
            "train/acc_top1": float(totals[1] / totals[2].clamp(min=1)),
            "train/lr": float(optimizer.param_groups[0]["lr"]),
            "train/grad_norm": float(grad_norm),
            "train/img_per_s": images_per_s * accelerator.num_processes,
        }
        evals: dict[str, EvalResult] = {}
        candidates = [("raw", model)] + ([("ema", ema.module)] if ema is not None else [])
        for weights, net in candidates:
            result = evaluate(
                net,
                val_loader,
                accelerator,
                eval_criterion,
                class_names,
                split="val",
                weights=weights,
                prefix=f"val_{weights}",
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                channels_last=channels_last,
                images=val_preview,
            )
            evals[f"val_{weights}"] = result
            metrics.update({k: v for k, v in result.metrics.items() if "/acc_class/" not in k})
        chosen = evals[f"val_{selected}"]
        chosen_metrics = {
            k.replace(f"val_{selected}/", "val/"): v for k, v in chosen.metrics.items()
        }
        metrics.update(chosen_metrics)
        evals["val"] = chosen
        if monitor not in metrics:
            raise KeyError(
                f"train.monitor={monitor!r} is not a metric; available: "
                + ", ".join(sorted(k for k in metrics if "/acc_class/" not in k))
            )
        value = metrics[monitor]

        # Early-stopping bookkeeping and checkpoint (top-k by the monitored value).
        delta = recipe.train.early_stop_min_delta
        sign = 1.0 if recipe.train.monitor_mode == "max" else -1.0
        if state.best_value is None or sign * (value - state.best_value) > delta:
            state.best_value, state.best_epoch = value, epoch
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        state.epoch, state.batches_done = epoch + 1, 0
        state.metrics = metrics
        checkpoints.save(
            accelerator,
            f"epoch-{epoch + 1:03d}",
            state,
            ema.module if ema is not None else None,
            value,
        )
        if main:
            metrics_log.append(metrics)
            _print_epoch(accelerator, metrics, monitor, state)
        if accelerator.trackers:
            accelerator.log(metrics, step=state.updates)

        patience = recipe.train.early_stop_patience
        if patience and state.epochs_without_improvement >= patience:
            accelerator.set_trigger()
        stop = accelerator.check_trigger()
        ctx.epoch, ctx.metrics, ctx.evals = epoch, metrics, evals
        ctx.is_last_epoch = stop or epoch + 1 == recipe.train.epochs
        ctx.best_checkpoint, ctx.last_checkpoint = checkpoints.best_path, checkpoints.last_path
        run_hooks(hooks, "on_epoch_end", ctx)
        sampled = ctx.extra.pop("sampler_counts", None)
        if sampled and accelerator.trackers:
            counts = {f"sampler/count/{label}": n for label, n in sampled.items()}
            accelerator.log(counts, step=state.updates)
        if stop:
            accelerator.print(
                f"early stop: {monitor} did not improve by {delta} for {patience} epochs "
                f"(best {state.best_value:.4f} at epoch {state.best_epoch + 1})"
            )
            stopped_early = True
            break

    # 6. test split with the best selected weights, then fit-end hooks -----------------------
    final_metrics = dict(state.metrics)
    best = checkpoints.best_path or checkpoints.last_path
    if recipe.train.eval_test and test_loader is not None and best is not None:
        # A plain fp32 copy (the prepared model would autocast): the deployment's precision, so
        # the onnxruntime evaluator reproduces these numbers exactly.
        net = create_model(recipe.model, num_classes, pretrained=False)
        net.load_state_dict(load_weights(best, selected))
        net = net.to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        result = evaluate(
            net,
            test_loader,
            accelerator,
            eval_criterion,
            class_names,
            split="test",
            weights=selected,
            prefix="test",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            channels_last=channels_last,
        )
        ctx.evals["test"] = result
        final_metrics.update(result.metrics)
        if main:
            _write_json(run_dir / "test_metrics.json", {"checkpoint": str(best), **result.metrics})
            accelerator.print(
                f"test ({selected} weights of {best.name}): "
                f"top-1 {result.metrics.get('test/acc_top1', float('nan')):.4f} "
                f"top-5 {result.metrics.get('test/acc_top5', float('nan')):.4f}"
            )
        if accelerator.trackers:
            accelerator.log(result.metrics, step=state.updates)
    ctx.metrics = final_metrics
    ctx.best_checkpoint, ctx.last_checkpoint = checkpoints.best_path, checkpoints.last_path
    ctx.extra["stopped_early"] = stopped_early
    run_hooks(hooks, "on_fit_end", ctx)
    accelerator.end_training()
    return TrainResult(run_dir, state, checkpoints.best_path, final_metrics)


def _first_images(dataset: Any, k: int) -> torch.Tensor:
    """The first k images of a split in dataset order (uint8), for sample grids."""
    k = min(k, len(dataset))
    if k == 0:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return torch.stack([dataset[i]["image"] for i in range(k)])


def _print_epoch(accelerator: Any, m: dict[str, float], monitor: str, st: TrainerState) -> None:
    parts = [f"epoch {int(m['epoch'])}", f"train loss {m['train/loss']:.4f}"]
    for key in (
        "val/loss",
        "val/acc_top1",
        "val/acc_top5",
        "val/f1_macro",
        "val_raw/acc_top1",
        "val_ema/acc_top1",
    ):
        if key in m:
            parts.append(f"{key} {m[key]:.4f}")
    parts.append(f"best {monitor} {st.best_value:.4f} (epoch {st.best_epoch + 1})")
    accelerator.print(" | ".join(parts))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json
    import os

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# Errors that describe bad input or an unusable run folder: one clear line, no traceback.
USER_ERRORS = (
    ValueError,  # RecipeError, DataError, augmentation parameters, labels mapping
    CheckpointError,
    PretrainedWeightsError,
    SyntheticDatasetError,
    ExportError,
    FileNotFoundError,
)


def main(argv: Sequence[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress reaches logs as it happens
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("accelerate", "timm"):  # per-file save/load notices drown the progress
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        recipe = parse_recipe(argv)
        train(recipe)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
