"""One evaluation pass: deterministic preprocessing, forward, gather each sample once."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from classifier_training.augment.pipeline import normalize_batch
from classifier_training.hooks.base import EvalResult
from classifier_training.metrics import classification_metrics


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
    images: torch.Tensor | None = None,
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
    empty = torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return EvalResult(
        split=split,
        weights=weights,
        loss=loss,
        logits=all_logits,
        targets=all_targets,
        indices=all_indices,
        images=images if images is not None else empty,
        metrics=metrics,
    )
