"""``augment_preview.png`` at fit start: the first train images and augmented draws of them.

The images are the first 16 items of the train dataset as the loader workers prepare them
(decode, JPEG draw, letterbox/stretch), augmented on the training device by the run's own
:class:`~classifier_training.augment.pipeline.BatchAugment` through
:func:`classifier_training.augment.preview.save_preview` (seeded with ``train.seed``), so the
picture shows exactly what the model is trained on.
"""

from __future__ import annotations

import torch

from classifier_training.augment.preview import save_preview
from classifier_training.hooks.base import FitContext, Hook

PREVIEW_IMAGES = 16


class AugmentPreviewHook(Hook):
    """Writes ``runs/<name>/augment_preview.png``."""

    name = "augment_preview"

    def on_fit_start(self, ctx: FitContext) -> None:
        dataset = ctx.loaders.train_dataset
        n = min(PREVIEW_IMAGES, len(dataset))
        if n == 0:
            return
        images = torch.stack([dataset[i]["image"] for i in range(n)])
        path = save_preview(
            images.to(ctx.accelerator.device),
            ctx.augment,
            ctx.run_dir / "augment_preview.png",
            seed=ctx.recipe.train.seed,
        )
        ctx.log_images({"train/augment_preview": path})
