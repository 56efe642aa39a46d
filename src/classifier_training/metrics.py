"""Classification metrics from gathered per-sample logits (torchmetrics' functional API).

Every number is computed from the full gathered split, so with several processes each sample
counts once. Accuracy is plain (micro) accuracy; torchmetrics' MulticlassAccuracy defaults to
macro, which is why ``average`` is always passed explicitly.

Keys (the same in metrics.jsonl, the console and W&B), for a prefix such as ``val``::

    val/loss  val/acc_top1  val/acc_top5  val/f1_macro  val/acc_class/<label>
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score


def classification_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_names: list[str],
    prefix: str,
    *,
    per_class: bool = True,
) -> dict[str, float]:
    """Top-1/top-5 micro accuracy, macro-F1 and per-class accuracy (recall) of one split.

    top-5 uses k = min(5, classes). A class absent from ``targets`` gets no per-class key
    (its accuracy is undefined, not 0).
    """
    num_classes = len(class_names)
    if logits.numel() == 0:
        return {}
    logits = logits.float()
    k = min(5, num_classes)
    out = {
        f"{prefix}/acc_top1": float(
            multiclass_accuracy(logits, targets, num_classes, average="micro", top_k=1)
        ),
        f"{prefix}/acc_top5": float(
            multiclass_accuracy(logits, targets, num_classes, average="micro", top_k=k)
        ),
        f"{prefix}/f1_macro": float(
            multiclass_f1_score(logits, targets, num_classes, average="macro")
        ),
    }
    if per_class:
        acc = multiclass_accuracy(logits, targets, num_classes, average="none", top_k=1)
        present = torch.bincount(targets, minlength=num_classes) > 0
        for i, name in enumerate(class_names):
            if present[i]:
                out[f"{prefix}/acc_class/{name}"] = float(acc[i])
    return out
