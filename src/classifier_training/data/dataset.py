"""Map-style dataset for loader workers: decode, cheap native-size work, fixed-size uint8.

Train items: decode → JPEG re-encode with probability ``jpeg_p`` at quality ``U{lo..hi}`` (at the
image's native size, before any resize) → :func:`train_image` (letterbox/stretch). Eval items:
:func:`eval_image` (resize shorter side, centre crop). Random augmentation beyond JPEG runs later,
batched on the device.

With a decoded-image cache (:mod:`classifier_training.data.cache`) the decode and resize are a
gather from the cached array, and the JPEG re-encode runs on the cached pixels
(:func:`~classifier_training.data.cache.jpeg_on_cached`, same draws).

Randomness is a pure function of ``(seed, epoch, index)``: each train item draws from
``numpy.random.default_rng([seed, epoch, i])``. The epoch lives in a shared-memory int64 tensor
written by :meth:`ImageDataset.set_epoch` in the main process, so persistent workers see it and an
item is the same whatever the worker count or after a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch.utils.data import Dataset

from classifier_training.data.cache import DecodedCache, jpeg_on_cached
from classifier_training.data.index import DataError, Sample
from classifier_training.data.preprocess import (
    TrainFit,
    eval_image,
    jpeg_degrade,
    open_rgb,
    train_image,
)

Item = dict[str, torch.Tensor]


def drop_single_sample_batch(num_samples: int, batch_size: int, num_processes: int) -> bool:
    """Whether the train loader must drop its last batch because it would hold one sample.

    BatchNorm in train mode needs more than one value per channel: a batch of one fails outright
    where the last feature map is 1x1 (small inputs) and gives meaningless batch statistics
    otherwise. With one process the last batch holds ``num_samples % batch_size`` samples, so
    when that is 1, ``drop_last`` leaves out exactly that sample (a different one each shuffled
    epoch). With several processes Accelerate's default ``even_batches`` completes the final
    batch of every process to ``batch_size`` with samples from the start of the epoch, so no
    process sees a short batch and nothing is dropped (``drop_last`` there would make Accelerate
    drop whole batches to keep the processes even).
    """
    return num_processes == 1 and batch_size > 1 and num_samples % batch_size == 1


class ImageDataset(Dataset[Item]):
    """``__getitem__(i)`` → ``{"image": uint8 [3,S,S], "target": int64 [], "index": int64 []}``."""

    def __init__(
        self,
        samples: Sequence[Sample],
        mode: Literal["train", "eval"],
        image_size: int,
        train_fit: TrainFit = "letterbox",
        jpeg_p: float = 0.0,
        jpeg_quality: tuple[int, int] = (5, 55),
        seed: int = 0,
        cache: DecodedCache | None = None,
    ) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if train_fit not in ("letterbox", "stretch"):
            raise ValueError(f"train_fit must be 'letterbox' or 'stretch', got {train_fit!r}")
        if not 0.0 <= jpeg_p <= 1.0:
            raise ValueError(f"jpeg_p must be in [0, 1], got {jpeg_p}")
        lo, hi = jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"jpeg_quality must satisfy 1 <= lo <= hi <= 100, got {jpeg_quality}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.samples = list(samples)
        self.mode = mode
        self.image_size = image_size
        self.train_fit: TrainFit = train_fit
        self.jpeg_p = float(jpeg_p)
        self.jpeg_quality = (int(lo), int(hi))
        self.seed = int(seed)
        if cache is not None:
            cache.check(mode, image_size, train_fit, len(self.samples))
        self.cache = cache
        # Shared memory: set_epoch in the main process is seen by already-running workers.
        self._epoch = torch.zeros(1, dtype=torch.int64)
        self._epoch.share_memory_()  # type: ignore[no-untyped-call]  # unannotated in torch

    @property
    def targets(self) -> list[int]:
        return [s.target for s in self.samples]

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds the train-time randomness (call before iterating)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch[0] = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> Image.Image:
        """Decode sample ``i`` as RGB; a failure is a DataError naming the annotation row."""
        sample = self.samples[i]
        try:
            return open_rgb(sample.path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{sample.source}: cannot decode image {sample.path}: {err}") from err

    def pixels(self, i: int) -> npt.NDArray[np.uint8]:
        """Sample ``i`` as uint8 HWC, exactly as ``__getitem__`` prepares it."""
        quality = self._jpeg_quality(i)
        if self.cache is not None:
            if quality is None:
                return np.array(self.cache.hwc(i))  # a copy: the map is read-only and shared
            cached, native = self.cache.hwc(i), self.cache.native_size(i)
            return jpeg_on_cached(cached, native, self.image_size, self.train_fit, quality)
        img = self.load(i)
        if self.mode == "eval":
            return eval_image(img, self.image_size)
        if quality is not None:
            img = jpeg_degrade(img, quality)
        return train_image(img, self.image_size, self.train_fit)

    def _jpeg_quality(self, i: int) -> int | None:
        """The JPEG quality drawn for train item ``i`` this epoch, or None (no re-encode)."""
        if self.mode == "eval" or self.jpeg_p <= 0.0:
            return None
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if rng.random() >= self.jpeg_p:
            return None
        lo, hi = self.jpeg_quality
        return int(rng.integers(lo, hi + 1))

    def __getitems__(self, indices: list[int]) -> list[Item]:
        """A batch's items (the DataLoader's batched fetch); with a cache the images come from
        one gather out of the map, and only the JPEG draws are re-encoded."""
        if self.cache is None:
            return [self[i] for i in indices]
        cache = self.cache
        images = torch.from_numpy(cache.images[np.asarray(indices, dtype=np.int64)])
        items = []
        for j, i in enumerate(indices):
            quality = self._jpeg_quality(i)
            if quality is not None:
                hwc = jpeg_on_cached(
                    cache.hwc(i), cache.native_size(i), self.image_size, self.train_fit, quality
                )
                images[j] = torch.from_numpy(hwc).permute(2, 0, 1)
            target = torch.tensor(self.samples[i].target, dtype=torch.int64)
            items.append({"image": images[j], "target": target, "index": torch.tensor(i)})
        return items

    def __getitem__(self, i: int) -> Item:
        if not 0 <= i < len(self.samples):
            raise IndexError(f"index {i} out of range for {len(self.samples)} samples")
        hwc = self.pixels(i)
        return {
            "image": torch.from_numpy(hwc).permute(2, 0, 1),
            "target": torch.tensor(self.samples[i].target, dtype=torch.int64),
            "index": torch.tensor(i, dtype=torch.int64),
        }
