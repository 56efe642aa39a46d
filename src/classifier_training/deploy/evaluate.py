"""Evaluate an exported model with onnxruntime on a dataset split (no torch).

    python -m classifier_training.deploy.evaluate --model runs/<name>/export --data data/jerseys \\
        [--split valid] [--format auto] [--out DIR] [--batch-size 32]

The split is indexed with the model's own class map (``labels_mapping.json``), and rows whose
label is not one of its classes are skipped and counted, exactly as the training index does; the
images go through the same preprocessing module as training-time evaluation. So the top-1 number
equals the PyTorch evaluation of the same weights on the same split.

Writes ``<out>/summary.json``::

    {"source": "onnx-<arch>", "split": "valid", "total": N, "top1_correct": .., "top1_accuracy": ..,
     "top5_correct": .., "top5_accuracy": .., "per_class": {label: {correct, total, accuracy}},
     "skipped_unknown": .., "model": .., "data": ..}

and ``<out>/predictions.jsonl`` (one line per image: image, label, top-5 predictions).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from classifier_training.data.index import DataError, index_split
from classifier_training.data.preprocess import open_rgb
from classifier_training.deploy.onnx_classifier import OnnxClassifier, softmax
from classifier_training.io import atomic_write_json, atomic_write_text


def evaluate_onnx(
    model: str | Path,
    data_root: str | Path,
    split: str = "valid",
    format: Literal["auto", "jsonl", "imagefolder"] = "auto",
    out: str | Path | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Top-1/top-5 and per-class accuracy of an exported model on ``data_root/split``.

    Writes ``summary.json`` and ``predictions.jsonl`` into ``out`` when given; returns the
    summary.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    clf = OnnxClassifier(model)
    class_to_idx = {str(k): int(v) for k, v in clf.mapping["class_to_idx"].items()}
    index = index_split(data_root, split, class_to_idx, format)
    k = min(5, clf.num_classes)
    top1 = top5 = 0
    per_class = {label: [0, 0] for label in class_to_idx}  # label -> [correct, total]
    records: list[dict[str, Any]] = []
    samples = index.samples
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = []
        for s in chunk:
            try:
                images.append(open_rgb(s.path))
            except (OSError, ValueError) as err:
                raise DataError(f"{s.source}: cannot decode image {s.path}: {err}") from err
        probs = softmax(clf.logits(clf.preprocess(images)))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        for s, row, idx in zip(chunk, probs, order, strict=True):
            hit1 = int(idx[0]) == s.target
            hit5 = s.target in idx.tolist()
            top1 += hit1
            top5 += hit5
            per_class[s.label][0] += hit1
            per_class[s.label][1] += 1
            records.append(
                {
                    "image": str(s.path),
                    "label": s.label,
                    "correct": hit1,
                    "predictions": [
                        {
                            "class_id": int(i),
                            "label": clf.idx_to_class[int(i)],
                            "confidence": float(row[i]),
                        }
                        for i in idx
                    ],
                }
            )
    total = len(samples)
    arch = clf.metadata.get("arch") or clf.model_path.stem
    summary: dict[str, Any] = {
        "source": f"onnx-{arch}",
        "split": split,
        "total": total,
        "top1_correct": top1,
        "top1_accuracy": top1 / total if total else 0.0,
        "top5_correct": top5,
        "top5_accuracy": top5 / total if total else 0.0,
        "per_class": {
            label: {"correct": c, "total": t, "accuracy": c / t}
            for label, (c, t) in per_class.items()
            if t > 0
        },
        "skipped_unknown": index.skipped_unknown,
        "model": str(clf.model_path),
        "data": str(Path(data_root) / split),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        atomic_write_json(out / "summary.json", summary)
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """A console table: overall accuracy, then per-class accuracy sorted worst first."""
    lines = [
        f"{summary['source']} on {summary['data']}: {summary['total']} images "
        f"({summary['skipped_unknown']} skipped: label not a model class)",
        f"top-1 {summary['top1_accuracy']:.4f} ({summary['top1_correct']}/{summary['total']})   "
        f"top-5 {summary['top5_accuracy']:.4f} ({summary['top5_correct']}/{summary['total']})",
        "",
        f"{'label':>10}  {'correct':>7}  {'total':>5}  {'accuracy':>8}",
    ]
    per_class = sorted(summary["per_class"].items(), key=lambda kv: kv[1]["accuracy"])
    for label, c in per_class:
        lines.append(f"{label:>10}  {c['correct']:>7}  {c['total']:>5}  {c['accuracy']:>8.3f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m classifier_training.deploy.evaluate",
        description="Accuracy of an exported ONNX model on a JSONL or ImageFolder split.",
    )
    p.add_argument("--model", required=True, help="export folder (model.onnx + labels)")
    p.add_argument("--data", required=True, help="dataset root holding the split folder")
    p.add_argument("--split", default="valid", help="split folder name (default valid)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "imagefolder"])
    p.add_argument(
        "--out", default=None, help="output folder (default: eval-<split> beside the bundle)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime call")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    model = Path(args.model)
    # Default beside the bundle (runs/<name>/eval-<split>), never inside it: the bundle is
    # what gets shipped.
    bundle = model if model.is_dir() else model.parent
    out = Path(args.out) if args.out else bundle.parent / f"eval-{args.split}"
    try:
        summary = evaluate_onnx(model, args.data, args.split, args.format, out, args.batch_size)
    except (OSError, ValueError) as err:  # DataError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"\nwrote {out / 'summary.json'} and {out / 'predictions.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
