"""``augment_preview.png`` at fit start: the first train images and augmented draws of them.

The images are 16 items of the train dataset drawn from as many classes as possible (the first
image of each of 16 classes spread over the class list, or several per class when there are
fewer classes; :func:`spread_over_classes`), as the loader workers prepare them
(decode, JPEG draw, letterbox/stretch), augmented on the training device by the run's own
:class:`~classifier_training.augment.pipeline.BatchAugment` through
:func:`classifier_training.augment.preview.save_preview` (seeded with ``train.seed``), so the
picture shows exactly what the model is trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from classifier_training.augment.preview import save_preview
from classifier_training.hooks.base import FitContext, Hook

PREVIEW_IMAGES = 16


def spread_over_classes(targets: Sequence[int], n: int) -> list[int]:
    """Up to ``n`` dataset positions covering as many classes as possible.

    Classes are taken evenly spaced over the sorted class ids present; round ``r`` adds the
    ``r``-th image of each chosen class, so with fewer classes than ``n`` every class shows
    several images. Deterministic (no randomness, same picture for the same data).
    """
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    classes = sorted(by_class)
    if len(classes) > n:
        step = len(classes) / n
        classes = [classes[int(k * step)] for k in range(n)]
    out: list[int] = []
    for r in range(max((len(by_class[c]) for c in classes), default=0)):
        for c in classes:
            if r < len(by_class[c]) and len(out) < n:
                out.append(by_class[c][r])
    return out


class AugmentPreviewHook(Hook):
    """Writes ``runs/<name>/augment_preview.png``."""

    name = "augment_preview"

    def on_fit_start(self, ctx: FitContext) -> None:
        dataset = ctx.loaders.train_dataset
        picks = spread_over_classes(ctx.index.train.targets, PREVIEW_IMAGES)
        if not picks:
            return
        images = torch.stack([dataset[i]["image"] for i in picks])
        path = save_preview(
            images.to(ctx.accelerator.device),
            ctx.augment,
            ctx.run_dir / "augment_preview.png",
            seed=ctx.recipe.train.seed,
        )
        ctx.log_images({"train/augment_preview": path})
