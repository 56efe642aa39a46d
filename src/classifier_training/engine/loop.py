"""One training epoch: augment -> forward -> backward -> clip -> step -> EMA -> schedule.

An *update* is one optimizer step that really happened: the last micro-batch of a
``grad_accum_steps`` window, unless fp16 found an overflow and skipped it. The EMA, the schedule
and every action keyed on ``updates % n`` move on updates only, so a skipped step repeats none
of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from classifier_training.checkpoint import TrainerState
from classifier_training.engine.setup import Run


class LoopCallback:
    """An observer inside the step loop (debugging, tests, profilers); override what you need.

    Unlike epoch hooks these run on every process, every batch, without synchronisation; an
    exception raised here stops the run where it is (the last checkpoint stays loadable).
    """

    def on_batch_start(self, batch: dict[str, torch.Tensor], state: TrainerState) -> None:
        """Before the step on ``batch`` (a per-process loader batch, before augmentation)."""

    def on_batch_end(self, state: TrainerState, updated: bool) -> None:
        """After the step, its logging and any periodic checkpoint; ``updated``: a real step."""


@dataclass(frozen=True)
class StepOutput:
    loss: torch.Tensor  # detached device scalar: reading it forces a GPU sync
    logits: torch.Tensor  # detached [B, C] float32
    grad_norm: torch.Tensor | None  # the clipped-from norm, on the window's last micro-batch
    updated: bool  # an optimizer step happened (window complete, not skipped by fp16)
    skipped: bool  # the window was complete but fp16's GradScaler skipped the step (overflow)


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """Seed of the augmentation generator for one batch: a pure function of the loop position."""
    return (seed * 1_000_003 + epoch * 100_003 + batch) % (2**63 - 1)


def periodic_due(updated: bool, updates: int, every: int) -> bool:
    """An every-``every``-updates action is due: an update happened now and landed on a multiple.

    Keyed on ``updated`` because ``updates`` stands still over accumulation micro-batches and
    fp16-skipped steps, which would otherwise repeat the action.
    """
    return updated and every > 0 and updates % every == 0


def train_one_epoch(
    run: Run, state: TrainerState, epoch: int, callbacks: Sequence[LoopCallback] = ()
) -> dict[str, float]:
    """Train ``epoch`` from ``state.batches_done`` on; return its train metrics (all processes).

    Mutates ``state.batches_done`` and ``state.updates``. Metrics: ``epoch`` (1-based),
    ``updates``, ``train/loss`` and ``train/acc_top1`` (over this run's batches of the epoch,
    summed across processes), ``train/lr``, ``train/grad_norm`` (the last clipped window),
    ``train/img_per_s`` (global), ``train/skipped_steps`` (fp16 overflows, this process).
    Per-batch phases go to ``run.timer`` (data wait, augmentation, step).
    """
    accelerator, recipe = run.accelerator, run.recipe
    # Order of the epoch = f(seed, epoch): set it explicitly, also after a resume.
    run.train_loader.set_epoch(epoch)
    run.loaders.set_epoch(epoch)  # JPEG draws and weighted sampler; Accelerate's may not reach them
    batches: Any = run.train_loader
    if state.batches_done:
        batches = accelerator.skip_first_batches(run.train_loader, state.batches_done)
        batches.set_epoch(epoch)
    run.model.train()
    run.progress.start_epoch(epoch, recipe.train.epochs, run.batches_per_epoch, state.batches_done)
    device = accelerator.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = torch.zeros((), device=device)
    grad_norm = torch.zeros(())
    skipped = 0
    for batch in run.timer.batches(batches):
        if state.batches_done >= run.batches_per_epoch:
            break
        for callback in callbacks:
            callback.on_batch_start(batch, state)
        out = train_step(run, state, batch, epoch)
        if out.grad_norm is not None:
            grad_norm = out.grad_norm
        skipped += out.skipped
        loss_sum += out.loss * len(batch["target"])
        correct += (out.logits.argmax(1) == batch["target"]).sum()
        seen += len(batch["target"])
        _report_step(run, state, out, len(batch["target"]))
        # Step checkpoint every N updates, every M minutes or on SIGTERM/SIGINT (then stops).
        periodic = periodic_due(out.updated, state.updates, recipe.train.checkpoint_every_updates)
        run.guard.after_batch(run, state, periodic)
        for callback in callbacks:
            callback.on_batch_end(state, out.updated)
    images_per_s = run.progress.end_epoch()
    totals = accelerator.reduce(torch.stack([loss_sum, correct, seen]), reduction="sum")
    return {
        "epoch": float(epoch + 1),
        "updates": float(state.updates),
        "train/loss": float(totals[0] / totals[2].clamp(min=1)),
        "train/acc_top1": float(totals[1] / totals[2].clamp(min=1)),
        "train/lr": float(run.optimizer.param_groups[0]["lr"]),
        "train/grad_norm": float(grad_norm),
        "train/img_per_s": images_per_s * accelerator.num_processes,
        "train/skipped_steps": float(skipped),
    }


def train_step(
    run: Run, state: TrainerState, batch: dict[str, torch.Tensor], epoch: int
) -> StepOutput:
    """One micro-batch under ``accumulate``; on an update also the EMA and the schedule."""
    accelerator, recipe = run.accelerator, run.recipe
    run.generator.manual_seed(
        batch_seed(recipe.train.seed, epoch, state.batches_done) + accelerator.process_index
    )
    grad_norm = None
    with run.timer.span("augment"):  # outside ``accumulate``: it touches no gradient
        images = run.augment(batch["image"], run.generator)
        if run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
    with run.timer.span("step"), accelerator.accumulate(run.model):
        logits = run.train_model(images).float()
        loss = run.criterion(logits, batch["target"])
        accelerator.backward(loss)
        if accelerator.sync_gradients and recipe.optim.clip_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(
                run.model.parameters(), recipe.optim.clip_grad_norm
            )
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    state.batches_done += 1
    # fp16 overflow skipped the step: then the EMA and schedule must not move either.
    skipped = bool(accelerator.sync_gradients and accelerator.optimizer_step_was_skipped)
    updated = bool(accelerator.sync_gradients and not skipped)
    if updated:
        with run.timer.span("step"):
            state.updates += 1
            if run.ema is not None:
                # step = updates + 1 makes timm's warmup d = 1 - (1 + (n+1)/gamma)^-power;
                # gamma 9, power 1 give the reference's d = min(decay, (1+n)/(10+n)).
                run.ema.update(accelerator.unwrap_model(run.model), step=state.updates + 2)
            run.scheduler.step_update(state.updates)
    return StepOutput(loss.detach(), logits.detach(), grad_norm, updated, skipped)


def _report_step(run: Run, state: TrainerState, out: StepOutput, batch_size: int) -> None:
    """Per-update tracker values (every ``logging.log_every`` updates) and the progress display."""
    accelerator = run.accelerator
    lr = run.optimizer.param_groups[0]["lr"]
    if accelerator.trackers and periodic_due(
        out.updated, state.updates, run.recipe.logging.log_every
    ):
        step_values = {"train/loss_step": float(out.loss), "train/lr": lr}
        accelerator.log(step_values, step=state.updates)
    run.progress.step(batch_size * accelerator.num_processes, state.updates, out.loss, lr)
