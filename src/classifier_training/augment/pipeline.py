"""The train augmentation as one batched call on the training device, and eval normalisation.

    augment = BatchAugment(resolve(recipe.augment), size=recipe.data.image_size)
    generator = torch.Generator(device=images.device).manual_seed(batch_seed)
    x = augment(images_uint8, generator)      # float32 [B, 3, S, S], normalised, contiguous

Every random number comes from ``generator``, so seeding it per batch from (seed, epoch, batch
index) makes a resumed run draw exactly the same augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from classifier_training.augment import degrade, erasing, geometry, ops, photometric
from classifier_training.augment.presets import AugmentParams
from classifier_training.data.preprocess import IMAGENET_MEAN, IMAGENET_STD


def _stats(values: Sequence[float], device: torch.device) -> Tensor:
    """A [3] float32 tensor on ``device`` (cached: no host-to-device copy per batch)."""
    key = tuple(float(v) for v in values)
    if len(key) != 3:
        raise ValueError(f"normalisation mean/std need 3 values (RGB), got {list(values)}")
    return ops.constant(key, device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, reading a CUDA device without an index as the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index or a.index is None or b.index is None
    current = torch.cuda.current_device()
    index_a = a.index if a.index is not None else current
    index_b = b.index if b.index is not None else current
    return index_a == index_b


def _check_images(images: Tensor, who: str) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(
            f"{who}: expected the loader's uint8 images [B, 3, H, W], got {images.dtype}; "
            "pass the raw batch, normalisation happens here"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{who}: expected images shaped [B, 3, H, W], got {list(images.shape)}")


def normalize_batch(
    images_uint8: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """Evaluation preprocessing: ``(x / 255 - mean) / std``, contiguous float32, nothing random."""
    _check_images(images_uint8, "normalize_batch")
    device = images_uint8.device
    x = images_uint8.to(torch.float32).div_(255.0)
    return ops.normalize(x, _stats(mean, device), _stats(std, device)).contiguous()


class BatchAugment:
    """The train augmentation of :class:`AugmentParams`, batched with per-sample parameters.

    ``__call__(images_uint8 [B, 3, S, S], generator) -> float32 [B, 3, S, S]`` normalised, on
    the images' device (CPU or CUDA), fp32 internally. Order: geometry (crop, flip, affine,
    perspective in one bilinear resampling) -> colour jitter -> blur -> degradation block
    (pixelate, down-up, noise, zoom; gated per sample by ``degrade_p``) -> normalise -> erasing.
    Ops whose parameters make them the identity are left out when the object is built.
    Pixel strengths are rescaled from ``params.reference_size`` to ``size`` first
    (:meth:`AugmentParams.at_size`); ``self.params`` keeps what was given, ``self.effective``
    holds what the ops use.
    """

    def __init__(
        self,
        params: AugmentParams,
        size: int | tuple[int, int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.params = params
        sides = (size, size) if isinstance(size, int) else tuple(size)
        if len(sides) != 2 or min(sides) < 1:
            raise ValueError(
                f"BatchAugment: size must be a positive int or (height, width), got {size}"
            )
        self.size: tuple[int, int] = (int(sides[0]), int(sides[1]))
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"BatchAugment: need 3 means and 3 positive stds, got {mean}, {std}")
        self.effective = params.at_size(round(math.sqrt(self.size[0] * self.size[1])))
        p = self.effective

        self.geometry: list[geometry.GeometricOp] = []
        if p.crop_p > 0:
            self.geometry.append(geometry.RandomResizedCrop(p.crop_scale, p.crop_ratio, p.crop_p))
        if p.hflip_p > 0:
            self.geometry.append(geometry.RandomHorizontalFlip(p.hflip_p))
        if (
            p.rotate_degrees > 0
            or p.translate > 0
            or p.shear_degrees > 0
            or p.affine_scale != (1, 1)
        ):
            self.geometry.append(
                geometry.RandomAffine(
                    p.rotate_degrees, p.translate, p.affine_scale, p.shear_degrees
                )
            )
        if p.perspective_p > 0 and p.perspective_distortion > 0:
            self.geometry.append(
                geometry.RandomPerspective(p.perspective_distortion, p.perspective_p)
            )

        self.photometric: list[ops.PixelOp] = []
        if max(p.brightness, p.contrast, p.saturation, p.hue) > 0:
            self.photometric.append(
                photometric.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue)
            )
        if p.blur_p > 0 and p.blur_kernel > 1:
            self.photometric.append(photometric.GaussianBlur(p.blur_kernel, p.blur_sigma, p.blur_p))

        self.degradations: list[ops.PixelOp] = []
        if p.degrade_p > 0:
            if p.pixelate_p > 0:
                self.degradations.append(degrade.Pixelate(p.pixelate_scale, p.pixelate_p))
            if p.downup_p > 0:
                self.degradations.append(degrade.BilinearDownUp(p.downup_scale, p.downup_p))
            if p.noise_p > 0 and p.noise_sigma[1] > 0:
                self.degradations.append(degrade.GaussianNoise(p.noise_sigma, p.noise_p))
            if p.zoom_p > 0:
                self.degradations.append(
                    degrade.ZoomInOut(p.zoom_in_scale, p.zoom_out_scale, p.zoom_out_fill, p.zoom_p)
                )

        self.erasing = (
            erasing.RandomErasing(p.erase_p, p.erase_scale, p.erase_ratio, p.erase_value)
            if p.erase_p > 0
            else None
        )

    def __repr__(self) -> str:
        parts = [*self.geometry, *self.photometric]
        if self.degradations:
            inner = ", ".join(repr(op) for op in self.degradations)
            parts_text = [repr(op) for op in parts] + [
                f"RandomApply(p={self.params.degrade_p}, [{inner}])"
            ]
        else:
            parts_text = [repr(op) for op in parts]
        parts_text.append(f"Normalize(mean={self.mean}, std={self.std})")
        if self.erasing is not None:
            parts_text.append(repr(self.erasing))
        body = ",\n  ".join(parts_text)
        return f"BatchAugment(size={self.size},\n  {body})"

    def __call__(self, images_uint8: Tensor, generator: torch.Generator) -> Tensor:
        _check_images(images_uint8, "BatchAugment")
        # fp32 even when called inside the training step's autocast region (conv2d and bmm
        # would otherwise run in fp16/bf16), and never recorded by autograd
        with torch.no_grad(), torch.autocast(images_uint8.device.type, enabled=False):
            return self._augment(images_uint8, generator)

    def _augment(self, images_uint8: Tensor, generator: torch.Generator) -> Tensor:
        in_hw = (int(images_uint8.shape[2]), int(images_uint8.shape[3]))
        if in_hw != self.size:
            raise ValueError(
                f"BatchAugment(size={self.size}) got images of {in_hw[0]}x{in_hw[1]}; the loader "
                "must bring train images to data.image_size"
            )
        if not _same_device(generator.device, images_uint8.device):
            raise ValueError(
                f"BatchAugment: generator is on {generator.device} but the images are on "
                f"{images_uint8.device}; create it with torch.Generator(device=images.device)"
            )
        batch = images_uint8.shape[0]
        x = images_uint8.to(torch.float32).div_(255.0)
        if self.geometry:
            matrices = [op.matrix(batch, in_hw, self.size, generator) for op in self.geometry]
            x = geometry.warp(x, matrices, self.size, [op.fills for op in self.geometry])
        for op in self.photometric:
            x = op(x, generator)
        if self.degradations:
            gate = ops.apply_mask(self.params.degrade_p, batch, generator)
            for op in self.degradations:
                x = op(x, generator, gate)
        device = x.device
        x = ops.normalize(x, _stats(self.mean, device), _stats(self.std, device))
        if self.erasing is not None:
            x = self.erasing(x, generator)
        return x.contiguous()


__all__ = ["BatchAugment", "normalize_batch"]
