"""What export learns about the bundle on real images: split accuracy, calibration, variants.

Run by :func:`classifier_training.deploy.onnx_export.export_run` after the fp32 graph matched
PyTorch, on every image of the validation and test splits, through the deployment
preprocessing, with onnxruntime (so every number is what a consumer gets):

1. the requested fp16 / INT8 variants are written next to ``model.onnx`` (INT8 calibrated on
   ``int8_calibration_images`` training images taken class by class);
2. one pass over validation + test runs every model on the same decoded batch;
3. the fp32 logits give the split accuracies of the exported weights (test = the honest number;
   validation selected the checkpoint) and the calibration (temperature + abstain threshold
   fitted on validation, ECE and coverage measured on test);
4. each variant is compared with fp32 (:func:`~classifier_training.deploy.variants.
   variant_report`); one that drops more than ``max_accuracy_drop`` is deleted with the reason;
5. every model still present is timed at batch 1 and 32, and gets its metadata (the fp32
   metadata plus ``precision`` and ``calibration``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from classifier_training.data.index import DataError, Sample, SplitIndex, index_split
from classifier_training.data.preprocess import eval_image, open_rgb, to_nchw_float
from classifier_training.deploy import variants as V
from classifier_training.deploy.calibration import Calibration, calibrate, plot_reliability
from classifier_training.io import save_figure
from classifier_training.recipe import ExportConfig, Recipe

log = logging.getLogger(__name__)

BATCH = 64


class AssessmentError(ValueError):
    """An image cannot be decoded, or no labelled split is there to assess the bundle on."""


@dataclass
class Assessment:
    """The numbers export.json, labels_mapping.json and the model card report."""

    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: Calibration | None = None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)


def _batches(
    samples: Sequence[Sample], image_size: int, norm: Mapping[str, Sequence[float]]
) -> Iterator[npt.NDArray[np.float32]]:
    for start in range(0, len(samples), BATCH):
        images = []
        for s in samples[start : start + BATCH]:
            try:
                images.append(eval_image(open_rgb(s.path), image_size))
            except (OSError, ValueError) as err:
                raise AssessmentError(f"{s.source}: cannot decode image {s.path}: {err}") from err
        yield to_nchw_float(np.stack(images), norm["mean"], norm["std"])


DataFormat = Literal["auto", "jsonl", "imagefolder"]
SplitReader = Callable[[Path, str], SplitIndex]
"""Indexes split folder ``name`` under a dataset root against the model's class map (raises
DataError); see :func:`split_reader`."""


def split_reader(
    class_to_idx: Mapping[str, int], format: DataFormat, known: Iterable[SplitIndex] = ()
) -> SplitReader:
    """A :data:`SplitReader` that reads each folder once (verification and assessment both use
    the validation split). ``known`` splits, e.g. the training run's own index (checked before
    epoch 1, same class map), are used as they are instead of being read again."""
    memo = {s.root.resolve(): s for s in known}

    def read(root: Path, name: str) -> SplitIndex:
        key = (root / name).resolve()
        if key not in memo:
            memo[key] = index_split(root, name, class_to_idx, format)
        return memo[key]

    return read


def _split(root: Path, name: str, read: SplitReader) -> list[Sample] | None:
    if not name or not (root / name).is_dir():
        return None
    try:
        return read(root, name).samples
    except DataError as err:
        log.warning("%s: not used to assess the bundle: %s", root / name, err)
        return None


def _accuracy_by_class(
    pred: npt.NDArray[np.int64], y: npt.NDArray[np.int64], idx_to_class: Mapping[int, str]
) -> dict[str, float]:
    return {idx_to_class[c]: float((pred[y == c] == c).mean()) for c in sorted(set(y.tolist()))}


def assess(
    bundle: Path,
    recipe: Recipe,
    cfg: ExportConfig,
    root: Path,
    mapping: Mapping[str, Any],
    metadata: Mapping[str, str],
    read: SplitReader | None = None,
) -> Assessment:
    """Write the variants into ``bundle`` (which holds ``model.onnx``) and measure everything.

    ``read`` indexes the splits under ``root`` (default: :func:`split_reader` of the mapping's
    class map and the recipe's data format)."""
    precisions = V.parse_precisions(cfg.precision)
    class_to_idx = {str(k): int(v) for k, v in mapping["class_to_idx"].items()}
    idx_to_class = {v: k for k, v in class_to_idx.items()}
    read = read or split_reader(class_to_idx, recipe.data.format)
    norm, size = mapping["normalization"], recipe.data.image_size
    found = {
        name: samples
        for name, split_dir in (("valid", recipe.data.val_split), ("test", recipe.data.test_split))
        if (samples := _split(root, split_dir, read))
    }
    if not found:
        raise AssessmentError(
            f"{root}: neither {recipe.data.val_split!r} nor {recipe.data.test_split!r} has "
            "labelled images; the bundle cannot be assessed (point --data at the dataset)"
        )
    result = Assessment(machine=V.machine())
    paths = {"fp32": bundle / V.VARIANT_FILES["fp32"]}
    if "fp16" in precisions:
        paths["fp16"] = bundle / V.VARIANT_FILES["fp16"]
        V.convert_fp16(paths["fp32"], paths["fp16"])
    if "int8" in precisions:
        train = _split(root, recipe.data.train_split, read) or []
        picks = V.stratified([s.target for s in train], cfg.int8_calibration_images)
        paths["int8"] = bundle / V.VARIANT_FILES["int8"]
        n = V.quantize_int8(
            paths["fp32"], paths["int8"], _batches([train[i] for i in picks], size, norm)
        )
        result.machine["int8_calibration_images"] = n

    samples = [s for split in found.values() for s in split]
    logits = V.run_models(paths, _batches(samples, size, norm))
    y = np.array([s.target for s in samples], dtype=np.int64)
    slices, start = {}, 0
    for name, split in found.items():
        slices[name] = slice(start, start + len(split))
        start += len(split)
    ref = logits["fp32"]
    pred = ref.argmax(axis=1)
    for name, s in slices.items():
        result.splits[name] = {
            "images": s.stop - s.start,
            "accuracy": float((pred[s] == y[s]).mean()),
            "accuracy_by_class": _accuracy_by_class(pred[s], y[s], idx_to_class),
        }
    if "valid" in slices:
        val, test = slices["valid"], slices.get("test")
        result.calibration = calibrate(
            ref[val],
            y[val],
            ref[test] if test else None,
            y[test] if test else None,
            target_precision=cfg.target_precision,
        )
    for name, path in paths.items():
        report = V.variant_report(logits[name], ref, y, slices, cfg.max_accuracy_drop)
        if not report["passed"]:
            path.unlink()
            result.rejected[name] = V.rejection_reason(name, report)
            continue
        report["file"] = path.name
        report["latency_ms"] = V.latency_ms(path, size)
        meta = dict(metadata, precision=name)
        if result.calibration is not None:
            meta["calibration"] = json.dumps(result.calibration.summary())
        V.set_metadata(path, meta)
        report["size_bytes"] = path.stat().st_size
        report["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        result.variants[name] = report
    return result


RELIABILITY_FILE = "reliability.png"


def calibrated_mapping(
    mapping: Mapping[str, Any], result: Assessment, folder: Path
) -> dict[str, Any]:
    """``mapping`` plus the ``calibration`` key (an addition the contract allows); draws
    ``reliability.png`` into ``folder``. Unchanged without a calibration."""
    out = dict(mapping)
    if result.calibration is None:
        return out
    out["calibration"] = result.calibration.summary()
    fig = plot_reliability(result.calibration, "Reliability of the exported fp32 model")
    save_figure(fig, folder / RELIABILITY_FILE, dpi=120)
    return out


def assessment_info(result: Assessment) -> dict[str, Any]:
    """The export.json keys: ``evaluation``, ``variants``, ``rejected_variants``,
    ``calibration`` and ``latency_machine``."""
    cal = result.calibration
    return {
        "evaluation": result.splits,
        "variants": result.variants,
        "rejected_variants": result.rejected,
        "calibration": (
            {**cal.summary(), "reliability_diagram": RELIABILITY_FILE} if cal is not None else None
        ),
        "latency_machine": result.machine,
    }


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a (nothing accepted)"


def summary_lines(info: Mapping[str, Any]) -> list[str]:
    """Console lines for export.json's variants, calibration and rejected variants."""
    lines = []
    for ev_split, ev in info.get("evaluation", {}).items():
        lines.append(f"  {ev_split:<12} top-1 {ev['accuracy']:.4f} on {ev['images']} images (fp32)")
    for name, v in info.get("variants", {}).items():
        lat = v["latency_ms"]
        lines.append(
            f"  {name:<12} {v['file']}: {v['size_bytes'] / 1e6:.2f} MB, top-1 {v['accuracy']:.4f} "
            f"on {v['n_images']} valid+test images, agrees with fp32 {v['agreement']:.2%}, max "
            f"|logit diff| {v['max_abs_logit_diff']:.2e}, {lat['1']:.2f} ms at batch 1, "
            f"{lat['32']:.1f} ms at batch 32"
        )
    cal = info.get("calibration")
    if cal:
        lines.append(
            f"  calibration  T {cal['temperature']:.3f}, ECE {cal['ece_before']:.4f} -> "
            f"{cal['ece_after']:.4f} on {cal['eval_split']}; abstain below {cal['threshold']:.4f} "
            f"(precision {cal['target_precision']} on {cal['fit_split']}) keeps "
            f"{cal['coverage']:.1%} of {cal['eval_split']} at precision {_fmt(cal['precision'])}"
        )
    for reason in info.get("rejected_variants", {}).values():
        lines.append(f"  REJECTED     {reason}")
    return lines
