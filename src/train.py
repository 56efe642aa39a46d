"""Train an image classifier: ``accelerate launch src/train.py --recipe recipes/quickstart.yaml``.

The algorithm, top to bottom (the pieces live in ``classifier_training.engine``):

1. ``setup``: recipe -> run directory (fresh, or an explicit resume), Accelerator, seeds; dataset
   index (class map from train) -> labels_mapping.json -> loaders; timm model, EMA (never
   prepared), optimizer, loss; ``accelerator.prepare``; per-update schedule; on resume,
   Accelerate state + EMA + trainer state (the schedule is rebuilt from the update count)
2. each epoch:
   ``train_one_epoch``: batched augmentation on the device -> forward/backward under
   ``accumulate`` -> clip -> step -> EMA + schedule per update (a real, unskipped step);
   ``validate``: raw and EMA weights on val, the selected ones reported as ``val/``;
   ``end_epoch``: best value and patience (``track_best``), checkpoint (top-k), epoch hooks
   (their figures drawn in the background), early stopping agreed across processes,
   metrics.jsonl + trackers with the epoch's per-phase timings (``run.timer``)
3. ``test_best``: the test split with the best selected weights; fit-end hooks (export); the
   timing summary

The run folder is locked for the whole run (``run.guard``). Exit status: 0 done; 2 bad input or
an unusable run folder (one ``error:`` line); 75 stopped by SIGTERM/SIGINT after writing a
checkpoint (``preempted:``; resume with ``--train.resume auto``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from classifier_training.checkpoint import CheckpointError, TrainerState, TrainingDivergedError
from classifier_training.data.synthetic import SyntheticDatasetError
from classifier_training.deploy.onnx_export import ExportError
from classifier_training.engine.epoch_end import end_epoch
from classifier_training.engine.finish import test_best
from classifier_training.engine.loop import LoopCallback, train_one_epoch
from classifier_training.engine.selection import validate
from classifier_training.engine.setup import setup
from classifier_training.hooks import run_hooks
from classifier_training.model import PretrainedWeightsError
from classifier_training.preemption import EXIT_PREEMPTED, PreemptedError, watch_launcher
from classifier_training.recipe import Recipe, parse_recipe
from classifier_training.runtime import GpuUnavailableError, skip_final_collection
from classifier_training.timing import timing_summary

log = logging.getLogger("train")


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainerState
    best_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


def train(recipe: Recipe, *, callbacks: Sequence[LoopCallback] = ()) -> TrainResult:
    """Run a whole training job; see the module docstring for the algorithm.

    ``callbacks`` observe the step loop on every process (see ``LoopCallback``).
    """
    run, state = setup(recipe)
    # The guard holds the run folder's lock (SIGTERM/SIGINT -> checkpoint, PreemptedError); on
    # leaving it closes what setup opened: checkpoint writer, hook worker, RAM image cache.
    with run.guard:
        run_hooks(run.hooks, "on_fit_start", run.ctx)
        stopped_early = False
        for epoch in range(state.epoch, recipe.train.epochs):
            run.timer.start_epoch()
            with run.timer.phase("train"):
                train_metrics = train_one_epoch(run, state, epoch, callbacks)
            with run.timer.phase("eval"):
                val = validate(run, train_metrics)
            stopped_early = end_epoch(run, state, epoch, val)
            if stopped_early:
                break
        run.checkpoints.settle(run.accelerator)  # the last checkpoint is durable from here
        final_metrics = test_best(run, state)
        ctx = run.ctx
        ctx.metrics = final_metrics
        ctx.best_checkpoint = run.checkpoints.best_path
        ctx.last_checkpoint = run.checkpoints.last_path
        ctx.extra["stopped_early"] = stopped_early
        run_hooks(run.hooks, "on_fit_end", ctx)
        background, writes = ctx.background, run.checkpoints.background_seconds
        run.accelerator.print(
            timing_summary(
                run.metrics_log.read(), background.busy_seconds, writes, background.seconds_by_job
            )
        )
        run.accelerator.end_training()
    return TrainResult(run.run_dir, state, run.checkpoints.best_path, final_metrics)


# Errors that describe bad input or an unusable run folder: one clear line, no traceback.
USER_ERRORS = (
    ValueError,  # RecipeError, DataError, augmentation parameters, labels mapping
    CheckpointError,
    TrainingDivergedError,  # a clear cause and what to change; a traceback adds nothing
    PretrainedWeightsError,
    SyntheticDatasetError,
    ExportError,
    FileNotFoundError,
    GpuUnavailableError,
)


def main(argv: Sequence[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress reaches logs as it happens
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # accelerate/timm: per-file save/load notices drown the progress; matplotlib: INFO notes
    # such as matplotlib.category's "categorical units ... parsable as floats" on every plot.
    for chatty in ("accelerate", "timm", "matplotlib"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    watch_launcher()  # a launcher that dies alone must not leave this trainer running
    skip_final_collection()
    try:
        recipe = parse_recipe(argv)
        train(recipe)
    except PreemptedError as err:
        print(f"preempted: {err}; resume with --train.resume auto", file=sys.stderr)
        return EXIT_PREEMPTED
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
