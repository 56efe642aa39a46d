"""One evaluation pass: deterministic preprocessing, forward, gather each sample once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from classifier_training.augment.pipeline import normalize_batch
from classifier_training.metrics import classification_metrics


@dataclass
class EvalResult:
    """One evaluation pass over a split, gathered across processes (each sample once).

    ``logits``, ``targets`` and ``indices`` are in dataset order on the CPU (the sample grid
    reads the images it shows from ``indices``).
    """

    split: str
    weights: str  # "ema" or "raw"
    loss: float
    logits: torch.Tensor  # float32 [N, C]
    targets: torch.Tensor  # int64 [N]
    indices: torch.Tensor  # int64 [N], positions in the split's sample list
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def preds(self) -> torch.Tensor:
        """Top-1 predicted class per sample."""
        return self.logits.argmax(dim=1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader[dict[str, torch.Tensor]],
    accelerator: Accelerator,
    criterion: torch.nn.Module,
    class_names: list[str],
    *,
    split: str,
    weights: str,
    prefix: str,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    channels_last: bool,
) -> EvalResult:
    """Evaluate ``model`` on a prepared ``loader`` and return gathered logits plus metrics.

    ``gather_for_metrics`` drops the samples Accelerate duplicated to even out the last batch, so
    metrics count every sample exactly once. The loss is ``criterion`` over the whole split (the
    same weighted, smoothed loss as training, so train and val losses are comparable).
    """
    was_training = model.training
    model.eval()
    logits_parts, target_parts, index_parts = [], [], []
    for batch in loader:
        x = normalize_batch(batch["image"], mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)  # fp32 unless the model is a prepared one (then the training precision)
        logits, targets, indices = accelerator.gather_for_metrics(
            (logits.float(), batch["target"], batch["index"])
        )
        logits_parts.append(logits.cpu())
        target_parts.append(targets.cpu())
        index_parts.append(indices.cpu())
    model.train(was_training)
    all_logits = torch.cat(logits_parts) if logits_parts else torch.empty(0, len(class_names))
    all_targets = torch.cat(target_parts) if target_parts else torch.empty(0, dtype=torch.long)
    all_indices = torch.cat(index_parts) if index_parts else torch.empty(0, dtype=torch.long)
    order = torch.argsort(all_indices)  # dataset order, whatever the sharding
    all_logits, all_targets, all_indices = all_logits[order], all_targets[order], all_indices[order]
    loss = float(criterion(all_logits, all_targets)) if len(all_targets) else float("nan")
    metrics = {f"{prefix}/loss": loss}
    metrics.update(classification_metrics(all_logits, all_targets, class_names, prefix))
    return EvalResult(
        split=split,
        weights=weights,
        loss=loss,
        logits=all_logits,
        targets=all_targets,
        indices=all_indices,
        metrics=metrics,
    )
