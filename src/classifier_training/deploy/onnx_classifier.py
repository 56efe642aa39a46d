"""onnxruntime predictor for an exported bundle (``model.onnx`` + ``labels_mapping.json``).

Torch-free on purpose: it imports numpy, PIL, onnxruntime and the torch-free data modules only,
so a deployment image needs no PyTorch. Images go through the same
:func:`~classifier_training.data.preprocess.eval_image` and
:func:`~classifier_training.data.preprocess.to_nchw_float` as training-time evaluation, so the
predictor sees exactly what the verified model saw.

Confidences are calibrated when the bundle carries ``calibration`` (labels_mapping.json, written
by export): ``softmax(logits / temperature)``. With a minimum confidence (a number, or ``"auto"``
for the bundle's abstain threshold), :meth:`OnnxClassifier.classify` answers ``"unknown"`` for
images below it. Any precision variant of the bundle loads the same way
(``OnnxClassifier("runs/x/export/model.int8.onnx")``).

    clf = OnnxClassifier("runs/jersey/export")
    clf.predict([Image.open("a.jpg")], top_k=3)
    # [[{"class_id": 17, "label": "23", "confidence": 0.91}, ...]]
    clf.classify([Image.open("a.jpg")], min_confidence=clf.min_confidence("auto"))
    # [{"label": "unknown", "class_id": -1, "confidence": 0.42, "abstained": true, ...}]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from PIL import Image

from classifier_training.data.labels import read_labels_mapping
from classifier_training.data.preprocess import eval_image, to_nchw_float
from classifier_training.deploy.calibration import read_calibration

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels_mapping.json"
UNKNOWN = "unknown"
"""The label :meth:`OnnxClassifier.classify` gives an image below the minimum confidence."""


def softmax(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """Row-wise softmax, stable: ``exp(x - max(x)) / sum(exp(x - max(x)))``."""
    x = np.asarray(logits, dtype=np.float64)
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    probs: npt.NDArray[np.float32] = (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)
    return probs


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, then CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxClassifier:
    """Classify PIL images with an exported model.

    ``model`` is a bundle folder (holding ``model.onnx`` and ``labels_mapping.json``) or a
    ``.onnx`` file; ``labels_path`` defaults to ``labels_mapping.json`` beside the model. The
    input size comes from the ONNX input shape, else from ``preprocessing.center_crop``.
    """

    def __init__(
        self,
        model: str | Path,
        labels_path: str | Path | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        model = Path(model)
        model_path = model / MODEL_FILE if model.is_dir() else model
        if not model_path.is_file():
            raise FileNotFoundError(
                f"{model_path}: no ONNX model here; pass an export folder (runs/<name>/export) "
                "or a .onnx file"
            )
        labels = Path(labels_path) if labels_path is not None else model_path.with_name(LABELS_FILE)
        self.model_path = model_path
        self.mapping = read_labels_mapping(labels)
        self.num_classes = int(self.mapping["num_classes"])
        self.idx_to_class = {int(k): str(v) for k, v in self.mapping["idx_to_class"].items()}
        self.calibration = read_calibration(self.mapping, str(labels))
        self.temperature = self.calibration["temperature"] if self.calibration else 1.0
        norm = self.mapping["normalization"]
        self.mean = tuple(float(v) for v in norm["mean"])
        self.std = tuple(float(v) for v in norm["std"])
        self.session = ort.InferenceSession(
            str(model_path), providers=list(providers or default_providers())
        )
        inp = self.session.get_inputs()[0]
        self.input_name: str = inp.name
        self.output_name: str = self.session.get_outputs()[0].name
        self.image_size = self._image_size(inp.shape, labels)
        out_shape = self.session.get_outputs()[0].shape
        if isinstance(out_shape[-1], int) and out_shape[-1] != self.num_classes:
            raise ValueError(
                f"{model_path} outputs {out_shape[-1]} classes but {labels} lists "
                f"{self.num_classes}; the model and its labels mapping do not belong together"
            )

    def _image_size(self, shape: Sequence[Any], labels: Path) -> int:
        h, w = (shape[2], shape[3]) if len(shape) == 4 else (None, None)
        if isinstance(h, int) and isinstance(w, int):
            if h != w:
                raise ValueError(f"{self.model_path}: non-square input {h}x{w} is not supported")
            return h
        pre = self.mapping.get("preprocessing")
        if pre is None:
            raise ValueError(
                f"{self.model_path} has a dynamic image size and {labels} has no "
                "preprocessing.center_crop; cannot tell the input size"
            )
        return int(pre["center_crop"])

    @property
    def metadata(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` written at export (arch, weights, checkpoint, ...)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def preprocess(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """PIL images -> float32 NCHW batch, normalized (the model's ``input``)."""
        if not images:
            return np.empty((0, 3, self.image_size, self.image_size), dtype=np.float32)
        batch = np.stack([eval_image(im, self.image_size) for im in images])
        return to_nchw_float(batch, self.mean, self.std)

    def logits(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Raw logits [N, C] for a preprocessed batch (one ``session.run``)."""
        if len(batch) == 0:
            return np.empty((0, self.num_classes), dtype=np.float32)
        x = np.ascontiguousarray(batch, dtype=np.float32)
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)

    def probabilities(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``softmax(logits / temperature)``: calibrated when the bundle has a calibration."""
        return softmax(np.asarray(logits, dtype=np.float64) / self.temperature)

    def min_confidence(self, value: str | float | None) -> float | None:
        """``"auto"`` -> the bundle's abstain threshold; a number in [0, 1] -> itself.

        Raises ValueError for ``auto`` on a bundle without calibration, or a bad number.
        """
        if value is None:
            return None
        if isinstance(value, str) and value.strip().lower() == "auto":
            if self.calibration is None:
                raise ValueError(
                    f"{self.model_path.parent / LABELS_FILE} has no calibration (exported before "
                    "calibration existed, or without a validation split): re-export the run, or "
                    "pass a number for the minimum confidence"
                )
            return self.calibration["threshold"]
        try:
            number = float(value)
        except ValueError as err:
            raise ValueError(
                f"minimum confidence {value!r}: use auto or a number in [0, 1]"
            ) from err
        if not 0.0 <= number <= 1.0:
            raise ValueError(f"minimum confidence {number}: must be in [0, 1] (or auto)")
        return number

    def _top_k(self, probs: npt.NDArray[np.float32], top_k: int) -> list[list[dict[str, Any]]]:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, self.num_classes)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [
            [
                {
                    "class_id": int(i),
                    "label": self.idx_to_class.get(int(i), str(int(i))),
                    "confidence": float(row[i]),
                }
                for i in idx
            ]
            for row, idx in zip(probs, order, strict=True)
        ]

    def predict(self, images: Sequence[Image.Image], top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-k ``{"class_id", "label", "confidence"}`` per image, most confident first
        (``top_k`` is capped at the number of classes; confidences calibrated when possible)."""
        return self._top_k(self.probabilities(self.logits(self.preprocess(images))), top_k)

    def classify(
        self, images: Sequence[Image.Image], top_k: int = 5, min_confidence: float | None = None
    ) -> list[dict[str, Any]]:
        """One answer per image: ``label`` (``"unknown"`` when the top confidence is below
        ``min_confidence``), ``class_id`` (-1 when unknown), ``confidence``, ``abstained`` and
        the top-k ``predictions``."""
        out = []
        for preds in self.predict(images, top_k):
            top = preds[0]
            abstain = min_confidence is not None and top["confidence"] < min_confidence
            out.append(
                {
                    "label": UNKNOWN if abstain else top["label"],
                    "class_id": -1 if abstain else top["class_id"],
                    "confidence": top["confidence"],
                    "abstained": abstain,
                    "predictions": preds,
                }
            )
        return out
