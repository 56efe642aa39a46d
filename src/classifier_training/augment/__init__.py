"""Batched train augmentation on the training device, presets, and a preview grid.

``BatchAugment(resolve(recipe.augment), size)(images_uint8, generator)`` turns the loader's
uint8 ``[B, 3, S, S]`` batch into normalised float32 with per-sample random parameters drawn
from ``generator``; ``normalize_batch`` is the deterministic evaluation preprocessing.
"""

from classifier_training.augment.pipeline import BatchAugment, normalize_batch
from classifier_training.augment.presets import (
    PRESETS,
    AugmentParams,
    imagenet,
    jersey,
    none,
    resolve,
)

__all__ = [
    "PRESETS",
    "AugmentParams",
    "BatchAugment",
    "imagenet",
    "jersey",
    "none",
    "normalize_batch",
    "resolve",
]
