"""Class imbalance: class counts, inverse-frequency weights, a distributed-safe weighted sampler.

Inverse-frequency weights (the reference's formula, also used for the loss)::

    w_c = 1 / max(count_c, 1);   w = w / sum(w) * C          # so sum(w) = C

:class:`WeightedClassSampler` draws ``num_samples`` row indices with probability proportional to
each row's weight. It draws the *whole* epoch with a ``torch.Generator`` seeded from
``(seed, epoch)`` only, so every process computes the same list; under ``accelerator.prepare``
Accelerate wraps the loader's batch sampler in ``BatchSamplerShard`` and each process keeps
disjoint batches of that one global draw. It deliberately has no ``generator`` attribute:
Accelerate would otherwise replace/synchronise it from rank 0 at every ``__iter__``, a state that
``save_state`` does not keep (accelerate#2865, PR #4232). Resume is exact from
``state_dict()`` (seed, epoch) alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Sampler

from classifier_training.data.index import DataError

SamplerMode = Literal["disabled", "auto", "manual"]


def class_counts(targets: Sequence[int], num_classes: int) -> list[int]:
    """Number of samples of each class index ``0..num_classes-1``."""
    counts = [0] * num_classes
    for t in targets:
        if not 0 <= t < num_classes:
            raise ValueError(f"target {t} is outside 0..{num_classes - 1}")
        counts[t] += 1
    return counts


def inverse_frequency_weights(counts: Sequence[int]) -> torch.Tensor:
    """float32 ``[C]``: ``w = 1/max(count, 1)`` scaled to ``sum(w) = C`` (computed in float64)."""
    if len(counts) == 0:
        raise ValueError("inverse_frequency_weights needs at least one class count")
    c = torch.tensor(counts, dtype=torch.float64).clamp(min=1.0)
    w = 1.0 / c
    w = w / w.sum() * len(counts)
    return w.to(torch.float32)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit torch seed that depends on both numbers (SeedSequence hashing, no collisions of
    the naive ``seed + epoch`` kind)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class WeightedClassSampler(Sampler[int]):
    """Weighted random sampling of dataset rows, reproducible from ``(seed, epoch)``.

    ``weights[i]`` is the (unnormalised) weight of row ``i``. Each epoch yields ``num_samples``
    indices drawn with ``torch.multinomial`` (with replacement by default). Call ``set_epoch``
    before iterating (Accelerate's prepared loader also does it); ``last_indices`` holds the
    latest epoch's draw (the same on every process).
    """

    def __init__(
        self,
        weights: Sequence[float] | torch.Tensor,
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int = 0,
    ) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.numel() == 0:
            raise ValueError("WeightedClassSampler needs at least one weight")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("sampler weights must be finite and >= 0")
        if float(w.sum()) <= 0.0:
            raise ValueError("sampler weights must not all be zero")
        n = int(w.numel()) if num_samples is None else int(num_samples)
        if n < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not replacement and n > int((w > 0).sum()):
            raise ValueError(
                f"num_samples={n} without replacement exceeds the {int((w > 0).sum())} rows "
                f"with a positive weight"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.weights = w
        self.num_samples = n
        self.replacement = replacement
        self.seed = int(seed)
        self.epoch = 0
        self.last_indices: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw the next ``__iter__`` yields."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def draw(self, epoch: int | None = None) -> list[int]:
        """The index list of ``epoch`` (default: the current one), without side effects."""
        g = torch.Generator()
        g.manual_seed(_epoch_seed(self.seed, self.epoch if epoch is None else epoch))
        idx = torch.multinomial(self.weights, self.num_samples, self.replacement, generator=g)
        return [int(i) for i in idx.tolist()]

    def __iter__(self) -> Iterator[int]:
        self.last_indices = self.draw()
        return iter(self.last_indices)

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))


def build_sampler(
    mode: SamplerMode,
    targets: Sequence[int],
    class_to_idx: Mapping[str, int],
    manual_weights: Mapping[str, float] | None,
    seed: int,
    num_samples: int | None = None,
) -> WeightedClassSampler | None:
    """The train sampler for ``data.sampler``.

    disabled → None (the loader shuffles); auto → each row weighs the inverse frequency of its
    class; manual → each class weighs 1.0 unless ``manual_weights[label]`` says otherwise.
    """
    if mode == "disabled":
        return None
    num_classes = len(class_to_idx)
    if mode == "auto":
        class_w = inverse_frequency_weights(class_counts(targets, num_classes)).tolist()
    elif mode == "manual":
        class_w = [1.0] * num_classes
        for label, weight in (manual_weights or {}).items():
            if label not in class_to_idx:
                valid = ", ".join(repr(k) for k in sorted(class_to_idx))
                raise DataError(
                    f"data.sampler_weights: unknown label {label!r}; valid labels: {valid}"
                )
            value = float(weight)
            if not math.isfinite(value) or value < 0:
                raise DataError(
                    f"data.sampler_weights[{label!r}] = {weight!r}: weights must be finite and >= 0"
                )
            class_w[class_to_idx[label]] = value
        if all(class_w[t] == 0.0 for t in set(targets)):
            raise DataError("data.sampler_weights: every train class has weight 0")
    else:
        raise DataError(f"unknown sampler mode {mode!r}; use disabled, auto or manual")
    per_row = [class_w[t] for t in targets]
    return WeightedClassSampler(per_row, num_samples=num_samples, replacement=True, seed=seed)
