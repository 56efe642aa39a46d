"""Classify images with an exported model (onnxruntime, no torch).

    python -m classifier_training.deploy.predict --model runs/<name>/export a.jpg b.jpg --top-k 3 \
        [--min-confidence auto|FLOAT]

Prints one JSON document: ``[{"image": path, "label", "class_id", "confidence", "abstained",
"predictions": [{"class_id", "label", "confidence"}, ...]}, ...]``: confidences are
``softmax(logits / T)`` with the bundle's calibrated temperature (T = 1 without calibration),
most confident first. With ``--min-confidence`` an image whose top confidence is below it gets
``"label": "unknown"`` (``auto``: the bundle's abstain threshold). ``--model`` may name any
precision variant (``runs/<name>/export/model.int8.onnx``). An image that cannot be read is
reported on stderr (one line each) and left out; the others are still classified, and the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from classifier_training.data.preprocess import open_rgb
from classifier_training.deploy.onnx_classifier import OnnxClassifier


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m classifier_training.deploy.predict",
        description="Top-k labels with softmax confidences from an exported ONNX model.",
    )
    p.add_argument("--model", required=True, help="export folder (model.onnx + labels) or .onnx")
    p.add_argument("--labels", default=None, help="labels_mapping.json (default: beside model)")
    p.add_argument("--top-k", type=int, default=5, help="labels per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime call")
    p.add_argument(
        "--min-confidence",
        default=None,
        metavar="auto|FLOAT",
        help="answer 'unknown' below this calibrated confidence (auto: the bundle's threshold)",
    )
    p.add_argument("images", nargs="+", help="image files")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        print("error: --top-k and --batch-size must be >= 1", file=sys.stderr)
        return 2
    failed = 0
    try:
        clf = OnnxClassifier(args.model, args.labels)
        threshold = clf.min_confidence(args.min_confidence)
        results = []
        for start in range(0, len(args.images), args.batch_size):
            paths, images = [], []
            for path in args.images[start : start + args.batch_size]:
                try:
                    images.append(open_rgb(path))
                    paths.append(path)
                except (OSError, ValueError) as err:
                    failed += 1
                    print(f"error: {path}: cannot read image: {err}", file=sys.stderr)
            if not images:
                continue
            answers = clf.classify(images, args.top_k, threshold)
            for path, answer in zip(paths, answers, strict=True):
                results.append({"image": str(Path(path)), **answer})
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2))
    if failed:
        print(f"{failed} of {len(args.images)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
