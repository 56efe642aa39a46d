"""After the last epoch: the test split, evaluated once with the best selected weights."""

from __future__ import annotations

import torch

from classifier_training.checkpoint import TrainerState, load_weights
from classifier_training.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from classifier_training.engine.setup import Run
from classifier_training.evaluation import evaluate
from classifier_training.io import atomic_write_json
from classifier_training.model import create_model
from classifier_training.runtime import exact_fp32


def test_best(run: Run, state: TrainerState) -> dict[str, float]:
    """The run's final metrics: the last epoch's, plus ``test/`` ones when there is a test split.

    The best checkpoint (or the last, without a monitored value) is loaded into a plain fp32
    model, the deployment's precision (the prepared model would autocast), so the onnxruntime
    evaluator reproduces these numbers exactly. Writes ``test_metrics.json`` (main process) and
    leaves the pass in ``ctx.evals["test"]`` for the fit-end hooks.
    """
    recipe, accelerator = run.recipe, run.accelerator
    final_metrics = dict(state.metrics)
    best = run.checkpoints.best_path or run.checkpoints.last_path
    if not (recipe.train.eval_test and run.test_loader is not None and best is not None):
        return final_metrics
    net = create_model(recipe.model, len(run.class_names), pretrained=False)
    net.load_state_dict(load_weights(best, run.selected))
    net = net.to(accelerator.device)
    if run.channels_last:
        net = net.to(memory_format=torch.channels_last)
    with exact_fp32():  # no TF32 convolutions: the onnxruntime evaluator's fp32
        result = evaluate(
            net,
            run.test_loader,
            accelerator,
            run.eval_criterion,
            run.class_names,
            split="test",
            weights=run.selected,
            prefix="test",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            channels_last=run.channels_last,
        )
    run.ctx.evals["test"] = result
    final_metrics.update(result.metrics)
    if accelerator.is_main_process:
        atomic_write_json(
            run.run_dir / "test_metrics.json",
            {"checkpoint": str(best), **result.metrics},
            sort_keys=True,
        )
        accelerator.print(
            f"test ({run.selected} weights of {best.name}): "
            f"top-1 {result.metrics.get('test/acc_top1', float('nan')):.4f} "
            f"top-5 {result.metrics.get('test/acc_top5', float('nan')):.4f}"
        )
    if accelerator.trackers:
        accelerator.log(result.metrics, step=state.updates)
    return final_metrics
