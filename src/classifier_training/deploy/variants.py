"""Reduced-precision copies of the exported ONNX model, each verified against the fp32 one.

Files in the bundle (the input ``input`` and output ``logits`` stay float32 in every variant, so
the consumer's code does not change; only the file name does)::

    model.onnx        fp32, the contract
    model.fp16.onnx   weights and activations in float16, fp32 inputs/outputs (cast at the edges)
    model.int8.onnx   static INT8 quantization (QDQ, per-channel weights, signed 8-bit)

* fp16: ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)``.
* INT8: ``onnxruntime.quantization.quant_pre_process`` (shape inference, graph cleanup) then
  ``quantize_static`` with MinMax calibration on **training images passed through the
  deployment preprocessing** (:func:`classifier_training.data.preprocess.eval_image` +
  :func:`~classifier_training.data.preprocess.to_nchw_float`), spread evenly over the classes.
  S8S8 QDQ is onnxruntime's default and recommended format on x86-64.

Each variant is then run by onnxruntime (CPU) on the same real validation and test images as the
fp32 model and judged by :func:`variant_report`: top-1 agreement with fp32, its accuracy, the
accuracy drop, the largest logit difference. A variant whose accuracy drops by more than the
tolerance is deleted again (never written into the bundle), with the reason.
:func:`latency_ms` times a session at batch 1 and 32 on the exporting machine.
"""

from __future__ import annotations

import itertools
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

PRECISIONS = ("fp32", "fp16", "int8")
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
PROVIDER = "CPUExecutionProvider"
LATENCY_RUNS = {1: 30, 32: 5}
"""Timed runs per batch size (after 3 warm-up runs); the median is reported."""

Batches = Callable[[], Iterator[npt.NDArray[np.float32]]]
"""Re-iterable source of preprocessed float32 NCHW batches."""


class VariantError(ValueError):
    """A precision list or variant setting is invalid."""


def parse_precisions(text: str) -> list[str]:
    """``"fp32,fp16,int8"`` -> ``["fp32", "fp16", "int8"]``; fp32 (the contract) always first.

    Raises :class:`VariantError` naming the unknown entry and the valid ones.
    """
    wanted = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PRECISIONS]
    if unknown:
        raise VariantError(
            f"precision {', '.join(map(repr, unknown))}: unknown; choose a comma-separated "
            f"list of {', '.join(PRECISIONS)} (e.g. fp32,fp16,int8)"
        )
    return [p for p in PRECISIONS if p == "fp32" or p in wanted]


def _save_atomic(proto: onnx.ModelProto, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save(proto, str(tmp))
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def set_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Replace the ``metadata_props`` of the ONNX file at ``path`` with ``metadata``."""
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {str(k): str(v) for k, v in metadata.items()})
    _save_atomic(proto, path)


def convert_fp16(src: Path, dst: Path) -> None:
    """float16 copy of ``src`` with float32 graph inputs and outputs (casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    # The converter appends the input casts at the end of the node list; onnxruntime does not
    # mind, but onnx.checker (which a consumer may run) requires topological order.
    model = OnnxModel(proto)
    model.topological_sort()
    onnx.checker.check_model(model.model, full_check=True)
    _save_atomic(model.model, dst)


def quantize_int8(src: Path, dst: Path, batches: Iterable[npt.NDArray[np.float32]]) -> int:
    """Static INT8 (QDQ, per-channel, S8S8, MinMax) of ``src`` calibrated on ``batches``.

    Returns the number of calibration images. Raises :class:`VariantError` when there are none.
    """
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, input_name: str, it: Iterator[npt.NDArray[np.float32]]) -> None:
            self.input_name, self.it = input_name, it

        def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
            batch = next(self.it, None)
            return None if batch is None else {self.input_name: batch}

    seen = 0
    source = iter(batches)
    first = next(source, None)
    if first is None:
        raise VariantError(
            "INT8 calibration needs training images, but none were given (is the train split "
            "there?)"
        )

    def counted() -> Iterator[npt.NDArray[np.float32]]:
        nonlocal seen
        for batch in itertools.chain([first], source):
            seen += len(batch)
            yield np.ascontiguousarray(batch, dtype=np.float32)

    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    reader = Reader(input_name, counted())
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=dst.parent) as work:
        pre = Path(work) / "pre.onnx"
        out = Path(work) / "int8.onnx"
        quant_pre_process(str(src), str(pre))
        quantize_static(str(pre), str(out), reader, per_channel=True)
        proto = onnx.load(str(out))
        onnx.checker.check_model(proto, full_check=True)
        _save_atomic(proto, dst)
    return seen


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=[PROVIDER])


def run_models(
    paths: Mapping[str, Path], batches: Iterable[npt.NDArray[np.float32]]
) -> dict[str, npt.NDArray[np.float32]]:
    """Logits [N, C] of every model in ``paths`` on the same batches (each decoded once)."""
    sessions = {name: session(p) for name, p in paths.items()}
    parts: dict[str, list[npt.NDArray[np.float32]]] = {name: [] for name in paths}
    for batch in batches:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        for name, s in sessions.items():
            feed = {s.get_inputs()[0].name: x}
            parts[name].append(np.asarray(s.run(None, feed)[0], dtype=np.float32))
    return {
        name: np.concatenate(p) if p else np.empty((0, 0), np.float32) for name, p in parts.items()
    }


def variant_report(
    logits: npt.NDArray[np.float32],
    reference: npt.NDArray[np.float32],
    targets: npt.NDArray[np.int64],
    splits: Mapping[str, slice],
    max_accuracy_drop: float,
) -> dict[str, Any]:
    """Agreement with the fp32 ``reference``, accuracy (per split and overall), the drop, the
    largest logit difference, and ``passed`` (drop <= ``max_accuracy_drop``)."""
    pred, ref = logits.argmax(axis=1), reference.argmax(axis=1)
    acc = float((pred == targets).mean())
    ref_acc = float((ref == targets).mean())
    drop = ref_acc - acc
    per_split = {name: float((pred[s] == targets[s]).mean()) for name, s in splits.items()}
    return {
        "n_images": len(targets),
        "agreement": float((pred == ref).mean()),
        "disagreeing_images": int((pred != ref).sum()),
        "accuracy": acc,
        "accuracy_by_split": per_split,
        "accuracy_drop": drop,
        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
        "max_accuracy_drop": max_accuracy_drop,
        "passed": bool(drop <= max_accuracy_drop + 1e-12),
    }


def rejection_reason(name: str, report: Mapping[str, Any]) -> str:
    """Why a variant was not written, in one sentence with the numbers."""
    return (
        f"{name} not written: accuracy {report['accuracy']:.4f} is {report['accuracy_drop']:.4f} "
        f"below fp32 on {report['n_images']} validation+test images (allowed "
        f"{report['max_accuracy_drop']:.4f}); top-1 agrees with fp32 on "
        f"{report['agreement']:.2%}"
    )


def latency_ms(
    path: Path, image_size: int, runs: Mapping[int, int] | None = None
) -> dict[str, float]:
    """Median onnxruntime CPU latency in ms per batch size (random input, default options)."""
    s = session(path)
    name = s.get_inputs()[0].name
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    for batch, n in (runs or LATENCY_RUNS).items():
        x = rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
        for _ in range(3):
            s.run(None, {name: x})
        times = []
        for _ in range(n):
            start = time.perf_counter()
            s.run(None, {name: x})
            times.append(time.perf_counter() - start)
        out[str(batch)] = float(np.median(times) * 1000.0)
    return out


def machine() -> dict[str, Any]:
    """Where the latencies were measured."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu or "unknown",
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "provider": PROVIDER,
        "onnxruntime": ort.__version__,
    }


def stratified(targets: Sequence[int], n: int) -> list[int]:
    """Up to ``n`` positions taking the classes in turn (first images of each class first)."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in queues):
        out.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return out[:n]
