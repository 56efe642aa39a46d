"""ONNX export at fit end: the verified deployment bundle in ``runs/<name>/export/``.

Runs after the engine wrote its final checkpoint, on the main process, with the recipe's
``export`` section (checkpoint, weights, opset, verify_images, atol, precision variants,
calibration). A verification failure raises: a run whose export does not match PyTorch must not
look finished. A precision variant that fails its accuracy check is left out and reported.
"""

from __future__ import annotations

import json

from classifier_training.deploy.assess import summary_lines
from classifier_training.deploy.onnx_export import EXPORT_INFO_FILE, export_run
from classifier_training.hooks.base import FitContext, Hook


class ExportHook(Hook):
    """Exports and verifies the run; leaves the bundle path in ``ctx.extra["export_dir"]``."""

    name = "export"

    def on_fit_end(self, ctx: FitContext) -> None:
        if ctx.best_checkpoint is None and ctx.last_checkpoint is None:
            ctx.accelerator.print("export skipped: the run has no checkpoint yet")
            return
        # the run's own splits, checked before epoch 1: not indexed again
        known = list(ctx.index.splits.values()) if ctx.index is not None else []
        out = export_run(ctx.run_dir, ctx.recipe.export, known_splits=known)
        info = json.loads((out / EXPORT_INFO_FILE).read_text(encoding="utf-8"))
        ver = info["verification"]
        ctx.accelerator.print(
            f"exported {out}/model.onnx ({info['weights']} weights of "
            f"{info['checkpoint']['path']}): onnxruntime vs PyTorch on {ver['n_images']} "
            f"{info['data']['verify_split']} images, top-1 agrees {ver['top1_agree']}, "
            f"max |logit diff| {ver['max_abs_diff']:.2e}"
        )
        for line in summary_lines(info):
            ctx.accelerator.print(line)
        ctx.extra["export_dir"] = out
        ctx.extra["export_verification"] = ver
