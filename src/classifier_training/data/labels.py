"""``labels_mapping.json``: the class map and preprocessing shipped next to ``model.onnx``.

Torch-free. The first four keys are a contract with the downstream ONNX consumer and are never
renamed or removed::

    {"num_classes": N,
     "class_to_idx": {"0": 0, "00": 1, "1": 2, "10": 3, ...},      # labels sorted as strings
     "idx_to_class": {"0": "0", "1": "00", "2": "1", ...},         # keys are str(int)
     "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
     "preprocessing": {"resize_shorter": 256, "center_crop": 224, "interpolation": "bilinear",
                       "color": "RGB", "layout": "NCHW", "dtype": "float32", "scale": "1/255",
                       "output": "logits"}}

``preprocessing`` describes :func:`classifier_training.data.preprocess.eval_image` followed by
:func:`~classifier_training.data.preprocess.to_nchw_float`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from classifier_training.data.preprocess import (
    FIXED_PREPROCESSING,
    IMAGENET_MEAN,
    IMAGENET_STD,
    preprocessing_contract,
)
from classifier_training.io import atomic_write_json

CONTRACT_KEYS = ("num_classes", "class_to_idx", "idx_to_class", "normalization")
PREPROCESSING_KEYS = ("resize_shorter", "center_crop", *FIXED_PREPROCESSING)


def labels_mapping(
    class_to_idx: Mapping[str, int],
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict[str, Any]:
    """Build the mapping (key order fixed, so the JSON is byte-stable)."""
    ordered = sorted(class_to_idx.items(), key=lambda kv: kv[1])
    mapping: dict[str, Any] = {
        "num_classes": len(ordered),
        "class_to_idx": {label: int(i) for label, i in ordered},
        "idx_to_class": {str(int(i)): label for label, i in ordered},
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "preprocessing": preprocessing_contract(image_size),
    }
    _validate(mapping, "labels_mapping()")
    return mapping


def write_labels_mapping(path: str | Path, mapping: Mapping[str, Any]) -> None:
    """Write ``json.dumps(indent=2)`` plus a newline atomically and durably
    (:func:`~classifier_training.io.atomic_write_json`, key order kept: the same mapping always
    gives the same bytes)."""
    _validate(mapping, str(path))
    atomic_write_json(path, mapping)


def read_labels_mapping(path: str | Path) -> dict[str, Any]:
    """Load and validate a mapping; raises ValueError naming the file and the bad field.

    ``preprocessing`` is optional (files written by the reference system lack it) but validated
    when present.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ValueError(f"{path}: labels mapping not found") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    _validate(data, str(path))
    return data


def _validate(m: Mapping[str, Any], where: str) -> None:
    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{where}: {field}: {why}")

    for key in CONTRACT_KEYS:
        if key not in m:
            raise bad(key, "missing key")
    n = m["num_classes"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad("num_classes", f"must be a positive integer, got {n!r}")
    c2i = m["class_to_idx"]
    if not isinstance(c2i, Mapping) or len(c2i) != n:
        raise bad("class_to_idx", f"must map {n} labels to indices")
    indices = sorted(c2i.values()) if all(type(v) is int for v in c2i.values()) else None
    if indices != list(range(n)):
        raise bad("class_to_idx", f"indices must be the integers 0..{n - 1}, each once")
    i2c = m["idx_to_class"]
    expected = {str(i): label for label, i in c2i.items()}
    if not isinstance(i2c, Mapping) or dict(i2c) != expected:
        raise bad("idx_to_class", 'must be the inverse of class_to_idx with string keys ("0")')
    norm = m["normalization"]
    if not isinstance(norm, Mapping):
        raise bad("normalization", "must be an object with mean and std")
    for key in ("mean", "std"):
        values = norm.get(key)
        if (
            not isinstance(values, list)
            or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            or not all(math.isfinite(v) for v in values)
        ):
            raise bad(f"normalization.{key}", f"must be a list of 3 numbers, got {values!r}")
    if any(v <= 0 for v in norm["std"]):
        raise bad("normalization.std", "values must be > 0")
    if "preprocessing" not in m:
        return
    pre = m["preprocessing"]
    if not isinstance(pre, Mapping):
        raise bad("preprocessing", "must be an object")
    for key in PREPROCESSING_KEYS:
        if key not in pre:
            raise bad(f"preprocessing.{key}", "missing key")
    for key in ("resize_shorter", "center_crop"):
        v = pre[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(f"preprocessing.{key}", f"must be a positive integer, got {v!r}")
    if pre["resize_shorter"] < pre["center_crop"]:
        raise bad("preprocessing.resize_shorter", "must be >= center_crop")
    for key, value in FIXED_PREPROCESSING.items():
        if pre[key] != value:
            raise bad(f"preprocessing.{key}", f"only {value!r} is supported, got {pre[key]!r}")
