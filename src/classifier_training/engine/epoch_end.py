"""The end of an epoch: best-value bookkeeping, checkpoint, metrics log, trackers, hooks, and
early stopping agreed across processes."""

from __future__ import annotations

from typing import Any

from classifier_training.checkpoint import TrainerState, check_finite_weights
from classifier_training.engine.selection import Best, Validation, track_best
from classifier_training.engine.setup import Run
from classifier_training.hooks import run_hooks
from classifier_training.timing import format_epoch_times


def end_epoch(run: Run, state: TrainerState, epoch: int, val: Validation) -> bool:
    """Record ``epoch`` (0-based) and return whether training stops early (on every process).

    Order: ``state`` (best, patience, position ``epoch + 1``/batch 0, metrics) -> the
    ``epoch-NNN`` checkpoint (top-k by the monitored value) -> the console line (main process)
    -> the stop decision (any process's trigger stops all) -> epoch hooks, which see whether this
    is the last epoch -> ``metrics.jsonl``, the timing line and the trackers, last so that the
    epoch's line holds its ``time/*`` keys (checkpoint and hooks included) -> a pending stop
    signal ends the run (the checkpoint is written).
    """
    accelerator, cfg = run.accelerator, run.recipe.train
    best = track_best(Best.of(state), val.value, epoch, cfg.monitor_mode, cfg.early_stop_min_delta)
    best.store(state)
    state.epoch, state.batches_done = epoch + 1, 0
    state.metrics = val.metrics
    with run.timer.phase("checkpoint"):
        weights = {"raw": run.model, "EMA": run.ema_module()}
        check_finite_weights(accelerator, weights, f"in epoch {epoch + 1}")
        run.checkpoints.save(
            accelerator, f"epoch-{epoch + 1:03d}", state, run.ema_module(), val.value
        )
    if accelerator.is_main_process:
        _print_epoch(accelerator, val.metrics, cfg.monitor, state)

    patience = cfg.early_stop_patience
    if patience and state.epochs_without_improvement >= patience:
        accelerator.set_trigger()
    stop = bool(accelerator.check_trigger())
    ctx = run.ctx
    ctx.epoch, ctx.metrics, ctx.evals = epoch, val.metrics, val.evals
    ctx.is_last_epoch = stop or epoch + 1 == cfg.epochs
    ctx.best_checkpoint, ctx.last_checkpoint = run.checkpoints.best_path, run.checkpoints.last_path
    with run.timer.phase("hooks"):
        run_hooks(run.hooks, "on_epoch_end", ctx)
    metrics = {**val.metrics, **run.timer.epoch_times()}
    if accelerator.is_main_process:
        run.metrics_log.append(metrics)
        accelerator.print(f"epoch {epoch + 1} {format_epoch_times(metrics)}")
    if accelerator.trackers:
        accelerator.log(metrics, step=state.updates)
    run.guard.after_epoch(run.checkpoints.last_path)  # a stop signal ends the run here
    if stop:
        accelerator.print(
            f"early stop: {cfg.monitor} did not improve by {cfg.early_stop_min_delta} for "
            f"{patience} epochs (best {state.best_value:.4f} at epoch {state.best_epoch + 1})"
        )
    return stop


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
