"""Plain torch DataLoaders for train/val/test (the caller passes them to ``accelerator.prepare``).

Train: ``shuffle=True`` when no weighted sampler (Accelerate's seedable sampler replaces the
``RandomSampler``), otherwise the :class:`WeightedClassSampler`; see ``drop_single_sample_batch``.
Val/test: in order, ``eval_batch_size`` (or ``batch_size``). Workers persist for train and val
(used every epoch), not for test (used once). Train-time randomness is seeded per sample from
``(seed, epoch, index)``, see :mod:`classifier_training.data.dataset`; the ``worker_init_fn``
only makes workers ignore SIGTERM/SIGINT (the trainer handles them, see ``preemption``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from classifier_training.data.cache import DecodedCache
from classifier_training.data.dataset import ImageDataset, Item, drop_single_sample_batch
from classifier_training.data.imbalance import WeightedClassSampler, build_sampler
from classifier_training.data.index import DataError, DatasetIndex, index_dataset
from classifier_training.data.validate import check_dataset
from classifier_training.preemption import ignore_stop_signals
from classifier_training.recipe import DataConfig

log = logging.getLogger(__name__)


@dataclass
class Loaders:
    """The three loaders, their datasets, the sampler (None when disabled) and the index."""

    train: DataLoader[Item]
    val: DataLoader[Item]
    test: DataLoader[Item] | None
    train_dataset: ImageDataset
    val_dataset: ImageDataset
    test_dataset: ImageDataset | None
    sampler: WeightedClassSampler | None
    index: DatasetIndex

    def set_epoch(self, epoch: int) -> None:
        """Seed the train randomness (JPEG draws, weighted sampler) for ``epoch``."""
        self.train_dataset.set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)


def load_index(cfg: DataConfig, monitor: str = "") -> DatasetIndex:
    """Index ``cfg.root`` and check it (:func:`check_dataset`: full decode of every image, two or
    more classes, a per-class ``monitor``); first render the synthetic dataset there when it is
    missing (or an empty folder) and ``cfg.generate_if_missing`` is set."""
    root = Path(cfg.root)
    if cfg.generate_if_missing and (not root.exists() or not any(root.iterdir())):
        from classifier_training.data.synthetic import ensure_synthetic

        ensure_synthetic(root, cfg.synthetic)
    index = index_dataset(
        root,
        format=cfg.format,
        train=cfg.train_split,
        val=cfg.val_split,
        test=cfg.test_split,
        check_images=False,  # check_dataset decodes every file, which a header check cannot
    )
    return check_dataset(index, cfg, monitor)


def _loader(
    dataset: ImageDataset,
    batch_size: int,
    cfg: DataConfig,
    *,
    shuffle: bool = False,
    sampler: WeightedClassSampler | None = None,
    persistent: bool = True,
    drop_last: bool = False,
) -> DataLoader[Item]:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=persistent and cfg.num_workers > 0,
        worker_init_fn=ignore_stop_signals,
    )


def build_loaders(
    cfg: DataConfig,
    index: DatasetIndex,
    *,
    jpeg_p: float,
    jpeg_quality: tuple[int, int],
    seed: int,
    num_processes: int = 1,
    caches: Mapping[str, DecodedCache] | None = None,
) -> Loaders:
    """Datasets, sampler and loaders for ``index`` as configured by ``cfg``.

    ``jpeg_p`` is the effective per-sample JPEG re-encode probability (the augmentation preset
    resolves it); ``seed`` seeds the sampler and the per-sample draws; ``num_processes`` (the
    Accelerate world size) decides whether a one-sample last train batch can occur; ``caches``
    are the decoded-image caches by split name
    (:func:`~classifier_training.data.cache.open_caches`).
    """
    caches = caches or {}
    val_split = index.val
    if val_split is None:
        raise DataError(
            f"{index.root}: training needs a validation split (data.val_split is empty)"
        )
    if cfg.batch_size < 1:
        raise DataError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    train_ds = ImageDataset(
        index.train.samples,
        mode="train",
        image_size=cfg.image_size,
        train_fit=cfg.train_fit,
        jpeg_p=jpeg_p,
        jpeg_quality=jpeg_quality,
        seed=seed,
        cache=caches.get(index.train.name),
    )
    val_ds = ImageDataset(
        val_split.samples, mode="eval", image_size=cfg.image_size, cache=caches.get(val_split.name)
    )
    test_split = index.test
    test_ds = (
        ImageDataset(
            test_split.samples,
            mode="eval",
            image_size=cfg.image_size,
            cache=caches.get(test_split.name),
        )
        if test_split is not None
        else None
    )
    sampler = build_sampler(
        cfg.sampler, train_ds.targets, index.class_to_idx, cfg.sampler_weights, seed
    )
    drop = drop_single_sample_batch(
        len(sampler) if sampler is not None else len(train_ds), cfg.batch_size, num_processes
    )
    if drop:
        log.warning(
            "train: 1 sample per epoch left out: the last batch would hold a single image, too "
            "few for BatchNorm (a different one each epoch)"
        )
    train_dl = _loader(
        train_ds, cfg.batch_size, cfg, shuffle=sampler is None, sampler=sampler, drop_last=drop
    )
    return Loaders(
        train=train_dl,
        val=_loader(val_ds, eval_batch, cfg),
        test=_loader(test_ds, eval_batch, cfg, persistent=False) if test_ds is not None else None,
        train_dataset=train_ds,
        val_dataset=val_ds,
        test_dataset=test_ds,
        sampler=sampler,
        index=index,
    )
