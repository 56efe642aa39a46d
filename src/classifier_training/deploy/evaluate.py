"""Evaluate an exported model with onnxruntime on a dataset split (no torch); compare two bundles.

    python -m classifier_training.deploy.evaluate --model runs/<name>/export --data data/jerseys \\
        [--split valid] [--format auto] [--out DIR] [--batch-size 32] \\
        [--compare OLD_BUNDLE [--alpha 0.05] [--max-class-drop 0.10]] [--errors-dir DIR]

The split is indexed with the model's own class map (``labels_mapping.json``), and rows whose
label is not one of its classes are skipped and counted, exactly as the training index does; the
images go through the same preprocessing module as training-time evaluation. So the top-1 number
equals the PyTorch evaluation of the same weights on the same split. ``--model`` may be a bundle
folder or any of its ``.onnx`` variants; confidences are calibrated (``softmax(logits / T)``)
when the bundle has a calibration.

Writes ``<out>/summary.json``::

    {"source": "onnx-<arch>", "split": "valid", "total": N, "top1_correct": .., "top1_accuracy": ..,
     "top5_correct": .., "top5_accuracy": .., "per_class": {label: {correct, total, accuracy}},
     "skipped_unknown": .., "model": .., "data": .., "abstain": {..} (calibrated bundles)}

and ``<out>/predictions.jsonl`` (one line per image: image, label, correct, top-5 predictions).

``--compare OLD`` runs the old bundle on the same images and applies the regression gate of
:mod:`classifier_training.deploy.compare` (accuracies, per-class changes, flipped images, exact
McNemar test); the report goes to ``<out>/compare.json``. Exit status: 0 pass, 1 error, 3 the new
bundle regressed (significantly worse, or a class dropped by more than ``--max-class-drop``).

``--errors-dir DIR`` (a new or empty folder) receives a copy of every misclassified image as
``true_<label>__pred_<label>/<file name>`` and ``predictions.jsonl`` with every image's label,
prediction, calibrated confidence and, for mistakes, the copied file.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from classifier_training.data.index import DataError, Sample, SplitIndex, index_split
from classifier_training.data.preprocess import open_rgb
from classifier_training.deploy.calibration import selective_stats
from classifier_training.deploy.compare import (
    DEFAULT_ALPHA,
    DEFAULT_MAX_CLASS_DROP,
    compare_predictions,
    format_comparison,
)
from classifier_training.deploy.onnx_classifier import OnnxClassifier
from classifier_training.io import atomic_write_json, atomic_write_text

Format = Literal["auto", "jsonl", "imagefolder"]
REGRESSION_EXIT = 3


def split_logits(
    clf: OnnxClassifier, samples: Sequence[Sample], batch_size: int = 32
) -> npt.NDArray[np.float32]:
    """Raw logits [N, C] of ``clf`` on ``samples``, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts = [np.empty((0, clf.num_classes), np.float32)]
    for start in range(0, len(samples), batch_size):
        images = []
        for s in samples[start : start + batch_size]:
            try:
                images.append(open_rgb(s.path))
            except (OSError, ValueError) as err:
                raise DataError(f"{s.source}: cannot decode image {s.path}: {err}") from err
        parts.append(clf.logits(clf.preprocess(images)))
    return np.concatenate(parts)


def _records(
    clf: OnnxClassifier, samples: Sequence[Sample], probs: npt.NDArray[np.float32], k: int
) -> list[dict[str, Any]]:
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        {
            "image": str(s.path),
            "label": s.label,
            "correct": int(idx[0]) == s.target,
            "predictions": [
                {
                    "class_id": int(i),
                    "label": clf.idx_to_class[int(i)],
                    "confidence": float(row[i]),
                }
                for i in idx
            ],
        }
        for s, row, idx in zip(samples, probs, order, strict=True)
    ]


def summarize(
    clf: OnnxClassifier,
    index: SplitIndex,
    logits: npt.NDArray[np.float32],
    data: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary (see the module docstring) and the per-image records."""
    samples = index.samples
    probs = clf.probabilities(logits)
    k = min(5, clf.num_classes)
    records = _records(clf, samples, probs, k)
    y = np.array([s.target for s in samples], dtype=np.int64)
    top5 = sum(
        s.target in [p["class_id"] for p in r["predictions"]]
        for s, r in zip(samples, records, strict=True)
    )
    right = probs.argmax(axis=1) == y if len(y) else np.zeros(0, bool)
    per_class: dict[str, dict[str, Any]] = {}
    for label, c in clf.mapping["class_to_idx"].items():
        sel = y == int(c)
        if sel.any():
            n_ok = int(right[sel].sum())
            per_class[label] = {
                "correct": n_ok,
                "total": int(sel.sum()),
                "accuracy": n_ok / int(sel.sum()),
            }
    total = len(samples)
    summary: dict[str, Any] = {
        "source": f"onnx-{clf.metadata.get('arch') or clf.model_path.stem}",
        "split": index.name,
        "total": total,
        "top1_correct": int(right.sum()),
        "top1_accuracy": float(right.mean()) if total else 0.0,
        "top5_correct": int(top5),
        "top5_accuracy": top5 / total if total else 0.0,
        "per_class": per_class,
        "skipped_unknown": index.skipped_unknown,
        "model": str(clf.model_path),
        "data": data,
    }
    if clf.calibration is not None and total:
        stats = selective_stats(probs.max(axis=1), right, clf.calibration["threshold"])
        summary["abstain"] = {
            "temperature": clf.temperature,
            "threshold": clf.calibration["threshold"],
            **stats,
        }
    return summary, records


def evaluate_onnx(
    model: str | Path,
    data_root: str | Path,
    split: str = "valid",
    format: Format = "auto",
    out: str | Path | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Top-1/top-5 and per-class accuracy of an exported model on ``data_root/split``.

    Writes ``summary.json`` and ``predictions.jsonl`` into ``out`` when given; returns the
    summary.
    """
    clf = OnnxClassifier(model)
    index = _index(clf, data_root, split, format)
    summary, records = summarize(
        clf, index, split_logits(clf, index.samples, batch_size), str(Path(data_root) / split)
    )
    if out is not None:
        _write_results(Path(out), summary, records)
    return summary


def _index(clf: OnnxClassifier, data_root: str | Path, split: str, format: Format) -> SplitIndex:
    class_to_idx = {str(k): int(v) for k, v in clf.mapping["class_to_idx"].items()}
    return index_split(data_root, split, class_to_idx, format)


def _write_results(
    out: Path, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]
) -> None:
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_json(out / "summary.json", summary)


def _safe(label: str) -> str:
    """A label as a folder-name part: path separators and control characters become ``_``."""
    return re.sub(r"[\\/\x00-\x1f]", "_", label) or "_"


def write_errors_dir(
    errors_dir: Path, samples: Sequence[Sample], records: Sequence[dict[str, Any]]
) -> int:
    """Copy misclassified images to ``true_<a>__pred_<b>/<name>``; write ``predictions.jsonl``.

    Refuses a non-empty folder (old files would mix with these). Returns the number of copies.
    """
    if errors_dir.exists() and any(errors_dir.iterdir()):
        raise ValueError(f"--errors-dir {errors_dir}: not empty; pass a new or empty folder")
    errors_dir.mkdir(parents=True, exist_ok=True)
    lines, copied = [], 0
    for s, r in zip(samples, records, strict=True):
        top = r["predictions"][0]
        row = {
            "image": str(s.path),
            "label": s.label,
            "pred": top["label"],
            "confidence": top["confidence"],
            "correct": r["correct"],
        }
        if not r["correct"]:
            folder = errors_dir / f"true_{_safe(s.label)}__pred_{_safe(top['label'])}"
            folder.mkdir(exist_ok=True)
            target = folder / s.path.name
            if target.exists():  # two files with the same name in different folders
                target = folder / f"{copied:06d}_{s.path.name}"
            shutil.copy2(s.path, target)
            row["error_file"] = str(target.relative_to(errors_dir))
            copied += 1
        lines.append(json.dumps(row) + "\n")
    atomic_write_text(errors_dir / "predictions.jsonl", "".join(lines))
    return copied


def compare_bundles(
    new: OnnxClassifier,
    old: OnnxClassifier,
    index: SplitIndex,
    new_logits: npt.NDArray[np.float32],
    *,
    batch_size: int = 32,
    alpha: float = DEFAULT_ALPHA,
    max_class_drop: float = DEFAULT_MAX_CLASS_DROP,
) -> dict[str, Any]:
    """Run ``old`` on the images ``new`` was evaluated on and apply the regression gate."""
    if old.idx_to_class != new.idx_to_class:
        raise ValueError(
            f"{old.model_path} and {new.model_path} have different class maps "
            "(labels_mapping.json): the bundles cannot be compared image by image"
        )
    old_logits = split_logits(old, index.samples, batch_size)
    names = [new.idx_to_class[i] for i in range(new.num_classes)]
    probs = new.probabilities(new_logits)
    report = compare_predictions(
        [s.target for s in index.samples],
        old_logits.argmax(axis=1),
        probs.argmax(axis=1),
        names,
        [str(s.path) for s in index.samples],
        new_confidence=probs.max(axis=1),
        alpha=alpha,
        max_class_drop=max_class_drop,
    )
    return {
        "old_model": str(old.model_path),
        "new_model": str(new.model_path),
        "split": index.name,
        **report,
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """A console table: overall accuracy, then per-class accuracy sorted worst first."""
    lines = [
        f"{summary['source']} on {summary['data']}: {summary['total']} images "
        f"({summary['skipped_unknown']} skipped: label not a model class)",
        f"top-1 {summary['top1_accuracy']:.4f} ({summary['top1_correct']}/{summary['total']})   "
        f"top-5 {summary['top5_accuracy']:.4f} ({summary['top5_correct']}/{summary['total']})",
    ]
    ab = summary.get("abstain")
    if ab:
        lines.append(
            f"calibrated (T = {ab['temperature']:.3f}): abstaining below {ab['threshold']:.3f} "
            f"keeps {ab['coverage']:.1%} of the images at precision {ab['precision'] or 0:.4f}"
        )
    lines += ["", f"{'label':>10}  {'correct':>7}  {'total':>5}  {'accuracy':>8}"]
    per_class = sorted(summary["per_class"].items(), key=lambda kv: kv[1]["accuracy"])
    for label, c in per_class:
        lines.append(f"{label:>10}  {c['correct']:>7}  {c['total']:>5}  {c['accuracy']:>8.3f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m classifier_training.deploy.evaluate",
        description="Accuracy of an exported ONNX model on a JSONL or ImageFolder split; "
        "with --compare, the regression gate against an older bundle.",
    )
    p.add_argument("--model", required=True, help="export folder (model.onnx + labels) or .onnx")
    p.add_argument("--data", required=True, help="dataset root holding the split folder")
    p.add_argument("--split", default="valid", help="split folder name (default valid)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "imagefolder"])
    p.add_argument(
        "--out", default=None, help="output folder (default: eval-<split> beside the bundle)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime call")
    p.add_argument("--compare", default=None, metavar="OLD", help="older bundle to gate against")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="McNemar significance level")
    p.add_argument(
        "--max-class-drop",
        type=float,
        default=DEFAULT_MAX_CLASS_DROP,
        help="largest allowed drop of one class's accuracy (absolute, default 0.10)",
    )
    p.add_argument("--errors-dir", default=None, help="copy misclassified images here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    model = Path(args.model)
    # Default beside the bundle (runs/<name>/eval-<split>), never inside it: the bundle is
    # what gets shipped.
    bundle = model if model.is_dir() else model.parent
    out = Path(args.out) if args.out else bundle.parent / f"eval-{args.split}"
    try:
        clf = OnnxClassifier(model)
        old = OnnxClassifier(args.compare) if args.compare else None
        index = _index(clf, args.data, args.split, args.format)
        logits = split_logits(clf, index.samples, args.batch_size)
        summary, records = summarize(clf, index, logits, str(Path(args.data) / args.split))
        _write_results(out, summary, records)
        print(format_summary(summary))
        print(f"\nwrote {out / 'summary.json'} and {out / 'predictions.jsonl'}")
        if args.errors_dir:
            n = write_errors_dir(Path(args.errors_dir), index.samples, records)
            print(f"copied {n} misclassified image(s) into {args.errors_dir}")
        if old is None:
            return 0
        report = compare_bundles(
            clf,
            old,
            index,
            logits,
            batch_size=args.batch_size,
            alpha=args.alpha,
            max_class_drop=args.max_class_drop,
        )
    except (OSError, ValueError) as err:  # DataError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    atomic_write_json(out / "compare.json", report)
    print("\n" + format_comparison(report, str(old.model_path), str(clf.model_path)))
    print(f"\nwrote {out / 'compare.json'}")
    return 0 if report["passed"] else REGRESSION_EXIT


if __name__ == "__main__":
    sys.exit(main())
