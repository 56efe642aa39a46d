"""ONNX export of a trained run and its verification against PyTorch on real images.

The bundle written by :func:`export_run` (``runs/<name>/export/`` by default)::

    model.onnx            input "input" float32 [batch, 3, S, S] (normalized RGB NCHW),
                          output "logits" float32 [batch, C]; only the batch axis is dynamic;
                          metadata_props carry the class map, normalization and preprocessing
    labels_mapping.json   the run's class map + normalization + preprocessing (same schema)
    model.safetensors     the exported weights (metadata: arch, num_classes, weights)
    export.json           provenance: checkpoint, epoch, monitored value, weights, opset,
                          library versions, verification report, created_at
    README.md             model card with a verbatim-runnable onnxruntime snippet

Verification is part of the export, not an option: the exported graph is run by onnxruntime
(CPUExecutionProvider) and the PyTorch model on the same real validation images, preprocessed by
:mod:`classifier_training.data.preprocess` (the consumer's path), at batch 1 and at batch N; every
image must get the same top-1 class and ``max |logit_ort - logit_torch| <= atol``. The bundle is
built in a temporary sibling folder and renamed into place only when everything succeeded, so a
failed export never leaves a half bundle.

Why the TorchScript exporter (``dynamo=False``): the dynamo exporter of torch 2.14 cannot emit
opset 17 (it falls back to 18) and writes external-data side files; the contract is one
``model.onnx`` at opset 17.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import timm
import torch
from safetensors.torch import save_model

import classifier_training
from classifier_training.bundle_dir import check_out_dir, install_bundle, staging_dir
from classifier_training.checkpoint import (
    STATE_FILE,
    CheckpointError,
    TrainerState,
    load_weights,
    resolve_checkpoint,
)
from classifier_training.compat import code_version
from classifier_training.data.index import DataError, Sample, SplitIndex
from classifier_training.data.labels import read_labels_mapping, write_labels_mapping
from classifier_training.data.preprocess import eval_image, open_rgb, to_nchw_float
from classifier_training.deploy import variants as V
from classifier_training.deploy.assess import (
    Assessment,
    AssessmentError,
    SplitReader,
    assess,
    assessment_info,
    calibrated_mapping,
    split_reader,
)
from classifier_training.deploy.model_card import model_card
from classifier_training.io import atomic_write_json, atomic_write_text
from classifier_training.model import create_model
from classifier_training.recipe import ExportConfig, Recipe, load_recipe
from classifier_training.recipe_checks import export_problems

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ONNX_FILE = "model.onnx"
LABELS_FILE = "labels_mapping.json"
WEIGHTS_FILE = "model.safetensors"
EXPORT_INFO_FILE = "export.json"
CARD_FILE = "README.md"

Weights = Literal["selected", "ema", "raw"]


class ExportError(RuntimeError):
    """The run cannot be exported (missing files, no images to verify with, ...)."""


class ExportVerificationError(ExportError):
    """onnxruntime and PyTorch disagree on the exported model; the message has the numbers."""


# ---------------------------------------------------------------------------------------------
# Graph export and verification


def _cpu_eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float32, CPU, eval-mode deep copy (the caller's model is left untouched)."""
    return copy.deepcopy(model).float().cpu().eval()


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    image_size: int,
    opset: int = 17,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Export ``model`` to ``path`` as input ``input`` [batch, 3, S, S] -> output ``logits``.

    The graph is traced from an eval-mode fp32 CPU copy with a dynamic batch axis only, then
    ``metadata`` is stored as ONNX ``metadata_props``. Written to a temp file and renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = _cpu_eval_copy(model)
    dummy = torch.zeros(1, 3, image_size, image_size, dtype=torch.float32)
    tmp = _tmp_path(path)
    try:
        with warnings.catch_warnings():
            # The legacy exporter announces its deprecation on every call; it is chosen on
            # purpose (see the module docstring), so the warning is noise here.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                net,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        if metadata:
            onnx.helper.set_model_props(proto, {str(k): str(v) for k, v in metadata.items()})
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _top1(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    return np.asarray(logits.argmax(axis=1), dtype=np.int64)


def verify_onnx(
    onnx_path: str | Path,
    model: torch.nn.Module,
    images_float_nchw: npt.NDArray[np.float32] | torch.Tensor,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Check ``onnx_path`` against ``model`` on real, already-normalized images.

    Runs ``onnx.checker``; then onnxruntime (CPU) at batch 1 (image by image) and at batch N (all
    images at once; a single image is repeated to make a batch of 2), and PyTorch (fp32, eval) on
    the same tensor. Passes when every image has the same top-1 class in every run and
    ``max |logit difference| <= atol``; otherwise raises :class:`ExportVerificationError`.
    Returns the report: ``max_abs_diff``, ``max_abs_diff_by_batch``, ``top1_agree``
    (agreeing images / n), ``n_images``, ``batch_sizes``, ``atol``, ``provider``, ``passed``.
    """
    onnx_path = Path(onnx_path)
    x = images_float_nchw
    x_np = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x_np = np.ascontiguousarray(x_np, dtype=np.float32)
    if x_np.ndim != 4 or x_np.shape[1] != 3 or x_np.shape[0] < 1:
        raise ExportVerificationError(
            f"verification needs a float32 batch [N>=1, 3, H, W], got {list(x_np.shape)}"
        )
    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportVerificationError(
            f"{onnx_path}: onnx.checker rejected the model: {err}"
        ) from err

    net = _cpu_eval_copy(model)
    with torch.no_grad():
        expected = net(torch.from_numpy(x_np)).float().numpy()

    provider = "CPUExecutionProvider"
    session = ort.InferenceSession(str(onnx_path), providers=[provider])
    n = x_np.shape[0]
    big = x_np if n > 1 else np.concatenate([x_np, x_np])
    ort_single = np.concatenate(
        [session.run([OUTPUT_NAME], {INPUT_NAME: x_np[i : i + 1]})[0] for i in range(n)]
    )
    ort_batch = session.run([OUTPUT_NAME], {INPUT_NAME: big})[0][:n]
    if ort_single.shape != expected.shape or ort_batch.shape != expected.shape:
        raise ExportVerificationError(
            f"{onnx_path}: output shape {list(ort_batch.shape)} differs from PyTorch's "
            f"{list(expected.shape)}"
        )

    top1 = _top1(expected)
    runs = {1: ort_single, big.shape[0]: ort_batch}
    diffs = {bs: float(np.abs(out - expected).max()) for bs, out in runs.items()}
    agree = np.ones(n, dtype=bool)
    for out in runs.values():
        agree &= _top1(out) == top1
    max_diff = max(diffs.values())
    report: dict[str, Any] = {
        "n_images": int(n),
        "batch_sizes": [int(b) for b in runs],
        "max_abs_diff": max_diff,
        "max_abs_diff_by_batch": {str(b): d for b, d in diffs.items()},
        "top1_agree": f"{int(agree.sum())}/{n}",
        "atol": float(atol),
        "provider": provider,
        "passed": bool(agree.all() and max_diff <= atol),
    }
    if not report["passed"]:
        bad = np.flatnonzero(~agree).tolist()
        raise ExportVerificationError(
            f"{onnx_path}: onnxruntime and PyTorch disagree: max |logit diff| {max_diff:.3g} "
            f"(allowed {atol:.3g}), top-1 agrees on {report['top1_agree']} images"
            + (f" (differs at images {bad[:10]})" if bad else "")
            + "; the ONNX model is not a faithful copy, do not ship it"
        )
    return report


# ---------------------------------------------------------------------------------------------
# Whole-run export


def _verification_samples(
    recipe: Recipe, read: SplitReader, data_root: str | Path | None, n: int
) -> tuple[list[Sample], str, Path]:
    """The first ``n`` samples of the validation split (else the test split) of the run's data."""
    root = Path(data_root or recipe.data.root)
    tried: list[str] = []
    for split in (recipe.data.val_split, recipe.data.test_split):
        if not split:
            continue
        if not (root / split).is_dir():
            tried.append(f"{root / split} (missing)")
            continue
        try:
            found = read(root, split)
        except DataError as err:
            tried.append(f"{root / split} ({err})")
            continue
        return found.samples[:n], split, root
    raise ExportError(
        "export verification needs real images, but none were found: tried "
        + "; ".join(tried or [f"{root} (no val/test split configured)"])
        + ". Restore the dataset, or point --data at a copy that has the validation split"
    )


def _load_images(samples: Sequence[Sample], image_size: int) -> npt.NDArray[np.uint8]:
    out = []
    for s in samples:
        try:
            out.append(eval_image(open_rgb(s.path), image_size))
        except (OSError, ValueError) as err:
            raise ExportError(
                f"{s.source}: cannot decode verification image {s.path}: {err}"
            ) from err
    return np.stack(out)


def _selected_weights(recipe: Recipe, weights: Weights) -> Literal["ema", "raw"]:
    if weights == "selected":
        return recipe.ema.select if recipe.ema.enabled else "raw"
    if weights not in ("ema", "raw"):
        raise ExportError(f"--weights {weights!r}: choose selected, ema or raw")
    return weights


def _versions() -> dict[str, str]:
    return {
        "classifier_training": classifier_training.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def _split_counts(run_dir: Path) -> dict[str, dict[str, int]]:
    """Per-split class counts from ``dataset_stats.json`` when the run wrote one."""
    path = run_dir / "dataset_stats.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        counts = data.get("class_counts", {})
        return {str(s): {str(k): int(v) for k, v in c.items()} for s, c in counts.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}  # the card is still useful without counts


@dataclass(frozen=True)
class _RunParts:
    """What a bundle is made of, read from the run folder and checked before anything is written."""

    run_dir: Path
    recipe: Recipe
    mapping: dict[str, Any]
    """The run's ``labels_mapping.json``."""
    checkpoint: Path
    weights: Literal["ema", "raw"]
    """The exported weights."""
    selected: Literal["ema", "raw"]
    """The weights that drove model selection (``ema.select``; raw when EMA is off)."""
    model: torch.nn.Module
    """The exported weights in a float32, CPU, eval-mode model."""
    state: TrainerState | None

    @property
    def num_classes(self) -> int:
        return int(self.mapping["num_classes"])


@dataclass(frozen=True)
class _VerifySet:
    """The real images the ONNX graph is checked on, normalised as the consumer does."""

    images: npt.NDArray[np.float32]
    split: str
    root: Path


def export_run(
    run_dir: str | Path,
    cfg: ExportConfig | None = None,
    *,
    out: str | Path | None = None,
    data_root: str | Path | None = None,
    known_splits: Sequence[SplitIndex] = (),
) -> Path:
    """Export a run's checkpoint to a verified ONNX bundle; returns the bundle folder.

    ``cfg`` (default ``ExportConfig()``): ``checkpoint`` best, last, or a checkpoint folder;
    ``weights`` selected (the recipe's ``ema.select``, raw when EMA is off), ema or raw; ``opset``;
    ``verify_images`` (>= 1) validation images compared (test images if the validation split is
    absent) with tolerance ``atol``. ``out`` defaults to ``run_dir/export``; ``data_root``
    overrides the recipe's ``data.root`` for finding the images. ``cfg`` also holds the
    variant and calibration settings (``precision``, ``max_accuracy_drop``,
    ``int8_calibration_images``, ``target_precision``); see :mod:`classifier_training.deploy.
    assess` for what is measured on the validation and test images. ``known_splits``: split
    folders already indexed against the same class map (the training run's own, at fit end),
    used instead of reading them again.
    Raises :class:`ExportError` / :class:`ExportVerificationError` / CheckpointError.
    """
    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else ExportConfig()
    out_dir = check_out_dir(out if out is not None else run_dir / "export", run_dir)
    _check_settings(cfg)
    recipe, mapping = _read_run(run_dir)
    parts = _load_model(run_dir, recipe, mapping, cfg)
    class_to_idx = {str(k): int(v) for k, v in mapping["class_to_idx"].items()}
    read = split_reader(class_to_idx, recipe.data.format, known_splits)
    verify = _verification_set(parts, read, data_root, cfg.verify_images)
    tmp = staging_dir(out_dir)
    try:
        _write_bundle(tmp, parts, cfg, verify, read)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_settings(cfg: ExportConfig) -> None:
    """Refuse export settings that cannot give a verified bundle."""
    problems = export_problems(cfg)
    if problems:
        raise ExportError("; ".join(problems))
    if cfg.verify_images < 1:
        raise ExportError(
            f"verify_images={cfg.verify_images}: verification is part of the export and needs at "
            f"least one image (default {ExportConfig.verify_images})"
        )
    if cfg.atol <= 0:
        raise ExportError(
            f"atol={cfg.atol}: the logit tolerance must be > 0 (default {ExportConfig.atol:g})"
        )


def _read_run(run_dir: Path) -> tuple[Recipe, dict[str, Any]]:
    """The run's recipe and class map, checked to agree on the image size."""
    recipe_path = run_dir / "recipe.yaml"
    labels_path = run_dir / LABELS_FILE
    for needed in (recipe_path, labels_path):
        if not needed.is_file():
            raise ExportError(
                f"{needed}: missing; {run_dir} does not look like a run directory "
                "(it needs recipe.yaml, labels_mapping.json and checkpoints/)"
            )
    recipe = load_recipe(recipe_path)
    try:
        mapping = read_labels_mapping(labels_path)
    except ValueError as err:
        raise ExportError(str(err)) from err
    image_size = recipe.data.image_size
    pre = mapping.get("preprocessing")
    if pre is not None and int(pre["center_crop"]) != image_size:
        raise ExportError(
            f"{labels_path}: preprocessing.center_crop={pre['center_crop']} but the recipe's "
            f"data.image_size={image_size}; the run directory is inconsistent"
        )
    return recipe, mapping


def _load_model(
    run_dir: Path, recipe: Recipe, mapping: dict[str, Any], cfg: ExportConfig
) -> _RunParts:
    """The chosen checkpoint's chosen weights in the recipe's model, and its trainer state."""
    num_classes = int(mapping["num_classes"])
    ckpt = resolve_checkpoint(run_dir, cfg.checkpoint)
    selected = _selected_weights(recipe, "selected")
    chosen = _selected_weights(recipe, cfg.weights)
    state_dict = load_weights(ckpt, chosen)
    model = create_model(recipe.model, num_classes, pretrained=False)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{ckpt}: {chosen} weights do not fit {recipe.model.arch} with {num_classes} "
            f"classes: {err}"
        ) from err
    state = TrainerState.from_file(ckpt / STATE_FILE) if (ckpt / STATE_FILE).is_file() else None
    return _RunParts(run_dir, recipe, mapping, ckpt, chosen, selected, _cpu_eval_copy(model), state)


def _verification_set(
    parts: _RunParts, read: SplitReader, data_root: str | Path | None, n: int
) -> _VerifySet:
    """The first ``n`` validation (else test) images, preprocessed as the consumer does."""
    samples, split, root = _verification_samples(parts.recipe, read, data_root, n)
    norm = parts.mapping["normalization"]
    images = _load_images(samples, parts.recipe.data.image_size)
    return _VerifySet(to_nchw_float(images, norm["mean"], norm["std"]), split, root)


def _write_bundle(
    tmp: Path, parts: _RunParts, cfg: ExportConfig, verify: _VerifySet, read: SplitReader
) -> None:
    """Write every file of the bundle into the staging folder ``tmp``, verifying the graph."""
    metadata = _onnx_metadata(parts)
    export_onnx(parts.model, tmp / ONNX_FILE, parts.recipe.data.image_size, cfg.opset, metadata)
    report = verify_onnx(tmp / ONNX_FILE, parts.model, verify.images, cfg.atol)
    try:
        assessment = assess(tmp, parts.recipe, cfg, verify.root, parts.mapping, metadata, read)
    except (AssessmentError, V.VariantError) as err:
        raise ExportError(str(err)) from err
    mapping = calibrated_mapping(parts.mapping, assessment, tmp)
    write_labels_mapping(tmp / LABELS_FILE, mapping)
    save_model(
        parts.model,
        str(tmp / WEIGHTS_FILE),
        metadata={
            "arch": parts.recipe.model.arch,
            "num_classes": str(parts.num_classes),
            "weights": parts.weights,
        },
    )
    info = _export_info(parts, cfg, verify, report, assessment, tmp / ONNX_FILE)
    atomic_write_json(tmp / EXPORT_INFO_FILE, info)
    card = model_card(info, mapping, _split_counts(parts.run_dir))
    atomic_write_text(tmp / CARD_FILE, card)


def _onnx_metadata(parts: _RunParts) -> dict[str, str]:
    """The ``metadata_props`` of ``model.onnx``: class map, normalization, preprocessing, I/O."""
    size, num_classes = parts.recipe.data.image_size, parts.num_classes
    return {
        "idx_to_class": json.dumps(parts.mapping["idx_to_class"]),
        "num_classes": str(num_classes),
        "normalization": json.dumps(parts.mapping["normalization"]),
        "preprocessing": json.dumps(parts.mapping.get("preprocessing") or {}),
        "arch": parts.recipe.model.arch,
        "weights": parts.weights,
        "checkpoint": str(parts.checkpoint),
        "input": f"{INPUT_NAME}: float32 [batch, 3, {size}, {size}] normalized RGB",
        "output": f"{OUTPUT_NAME}: float32 [batch, {num_classes}] raw logits",
        "producer": f"classifier-training {classifier_training.__version__}",
    }


def _export_info(
    parts: _RunParts,
    cfg: ExportConfig,
    verify: _VerifySet,
    report: dict[str, Any],
    assessment: Assessment,
    onnx_path: Path,
) -> dict[str, Any]:
    """``export.json``: provenance, the verification report and the assessment."""
    recipe, state = parts.recipe, parts.state
    metrics = dict(state.metrics) if state else {}
    return {
        "run_name": recipe.name,
        "arch": recipe.model.arch,
        "num_classes": parts.num_classes,
        "image_size": recipe.data.image_size,
        "weights": parts.weights,
        "opset": cfg.opset,
        "model_onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "checkpoint": {
            "path": str(parts.checkpoint),
            "epoch": state.epoch if state else None,
            "updates": state.updates if state else None,
            "monitor": recipe.train.monitor,
            "monitor_value": metrics.get(recipe.train.monitor),
            "monitor_weights": parts.selected,
        },
        "data": {"root": str(verify.root), "verify_split": verify.split},
        "verification": report,
        **assessment_info(assessment),
        "versions": _versions(),
        "code_version": code_version(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` (see :mod:`classifier_training.bundle_dir`)."""
    install_bundle(tmp, final)
