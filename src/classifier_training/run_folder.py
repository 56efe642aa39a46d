"""The guard of one run folder for the length of a run: one writer, a checked start, clean stops.

:class:`RunGuard` is built by ``engine.setup`` right after the Accelerator (so every decision can
be shared by all processes) and entered by ``train`` around the epochs. In order:

1. the main process takes the folder's lock (:mod:`run_lock`), so a second run stops at once;
2. ``admit(index)``, once the dataset is indexed and checked (bad input stops first) and before
   anything is written: the main process decides how the run starts (:func:`checkpoint.
   plan_start`: a verified resume, a new run, or a refusal) and, on resume, compares the
   checkpoint's ``compat.json`` with this run (:mod:`compat`); every process gets the same
   decision or the same error. Only then does ``--train.overwrite`` delete an earlier run's
   checkpoints, are orphan ``.tmp-*`` folders removed, and may the caller write ``recipe.yaml``
   and ``labels_mapping.json``. A run refused before this point leaves no trace: the lock file
   (and the folder) it created are removed again;
3. during the epochs (``with guard:``) SIGTERM/SIGINT are turned into a flag (:mod:`preemption`);
   ``after_batch`` writes the step checkpoints (every N updates, every M minutes, or on a stop
   signal, all agreed across processes) and raises :class:`PreemptedError` after a stop
   checkpoint; ``after_epoch`` raises it right after an epoch checkpoint;
4. ``close()`` (on leaving ``with``, or when setup fails) closes what the run registered with
   ``close_with_run`` (checkpoint writer, hook worker, RAM image cache), then releases the lock
   and the handlers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from classifier_training.agreement import share_from_main
from classifier_training.checkpoint import (
    CheckpointManager,
    TrainerState,
    check_finite_weights,
    remove_orphans,
)
from classifier_training.compat import COMPAT_FILE, ResumeCheck, check_resume, run_record
from classifier_training.data.index import DatasetIndex
from classifier_training.preemption import PreemptedError, StopPoll, StopSignals
from classifier_training.recipe import Recipe
from classifier_training.resume import ResumeChoice, clear_checkpoints, plan_start
from classifier_training.run_lock import RunLock


class RunGuard:
    """Lock, start decision, resume check, stop signals and checkpoint cadence of one run."""

    def __init__(self, accelerator: Any, recipe: Recipe) -> None:
        self.accelerator = accelerator
        self.recipe = recipe
        self.run_dir = Path(recipe.run_dir)
        self.lock = RunLock(self.run_dir)
        self.signals = StopSignals()
        self.record_json = ""
        self.next_epoch_boundary = False
        self.choice: ResumeChoice | None = None
        self.admitted = False  # from then on the run writes into the folder
        self.checkpoints: CheckpointManager | None = None
        self._closers: list[Callable[[], None]] = []

        try:
            share_from_main(accelerator, self.lock.acquire)
            self.poll = StopPoll(accelerator, self.signals, recipe.train.checkpoint_every_minutes)
        except BaseException:
            self.close()
            raise

    def admit(self, index: DatasetIndex) -> None:
        """Check a resume against its checkpoint's record; raises before anything is written.

        Afterwards the run folder is this run's to write: orphans of killed writes are gone and
        ``record_json`` holds the compat.json every checkpoint of this run will carry.
        """
        acc, recipe, cfg = self.accelerator, self.recipe, self.recipe.train

        def check() -> tuple[ResumeChoice | None, ResumeCheck]:
            choice = plan_start(self.run_dir, cfg.resume, cfg.overwrite, cfg.resume_fallback)
            record = run_record(
                recipe,
                index,
                num_processes=acc.num_processes,
                mixed_precision=str(acc.mixed_precision),
            )
            result = ResumeCheck(record)
            if choice is not None:
                force = recipe.train.resume_force
                result = check_resume(choice.path, record, choice.state, force=force)
            elif recipe.train.overwrite and clear_checkpoints(self.run_dir):
                acc.print(
                    f"--train.overwrite: deleted the earlier run's checkpoints in {self.run_dir}"
                )
            for name in remove_orphans(self.run_dir):
                acc.print(f"removed {self.run_dir / 'checkpoints' / name} (a killed write)")
            return choice, result

        self.choice, result = share_from_main(acc, check)
        self.admitted = True
        for warning in result.warnings:
            acc.print(f"warning: {warning}")
        self.record_json = json.dumps(result.record, indent=2, sort_keys=True) + "\n"
        self.next_epoch_boundary = result.next_epoch_boundary

    def attach(self, checkpoints: CheckpointManager) -> None:
        """Every checkpoint of this run carries the compat record."""
        checkpoints.extra_files[COMPAT_FILE] = self.record_json
        self.checkpoints = checkpoints
        self.close_with_run(checkpoints.close)  # a background write ends under the lock

    def resumed_position(self, state: TrainerState) -> TrainerState:
        """The loaded state, moved to the next epoch boundary when the process count changed."""
        if self.next_epoch_boundary:
            state.epoch, state.batches_done = state.epoch + 1, 0
        return state

    def after_batch(self, run: Any, state: TrainerState, periodic: bool) -> None:
        """Step checkpoint when ``periodic`` (every N updates), when the time cadence is due or
        on a stop signal (both agreed at the end of an accumulation window); then stop."""
        stop = due = False
        if self.accelerator.sync_gradients:
            stop, due = self.poll.poll()
        path = None
        if periodic or due or stop:
            name = f"step-{state.updates:07d}"
            weights = {"raw": run.model, "EMA": run.ema_module()}
            check_finite_weights(self.accelerator, weights, f"by update {state.updates}")
            path = run.checkpoints.save(
                self.accelerator, name, state, run.ema_module(), None, durable=stop
            )
            self.poll.checkpoint_written()
        if stop:
            raise PreemptedError(self.signals.requested or "a stop signal", path)

    def after_epoch(self, checkpoint: Path | None) -> None:
        """After the epoch checkpoint (and its metrics line): stop here if a signal came, once
        that checkpoint is durable."""
        self.poll.checkpoint_written()
        stop, _ = self.poll.poll()
        if stop:
            if self.checkpoints is not None:
                self.checkpoints.settle(self.accelerator)
            raise PreemptedError(self.signals.requested or "a stop signal", checkpoint)

    def close_with_run(self, closer: Callable[[], None]) -> None:
        """Call ``closer`` in :meth:`close`, newest first, before the lock is released: the parts
        of a run that must not outlive it, also when setup fails half-way (the checkpoint
        writer, the background hook worker, the RAM image cache)."""
        self._closers.append(closer)

    def close(self) -> None:
        """Restore the signal handlers, run the closers and unlock; a run that was never admitted
        (it wrote nothing) also removes the lock file and folder it created."""
        self.signals.restore()
        try:
            for closer in reversed(self._closers):
                closer()
        finally:
            self.lock.release(discard=not self.admitted)

    def __enter__(self) -> RunGuard:
        self.signals.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
