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
from classifier_training.data.index import DataError, Sample, index_split
from classifier_training.data.labels import read_labels_mapping, write_labels_mapping
from classifier_training.data.preprocess import eval_image, open_rgb, to_nchw_float
from classifier_training.io import atomic_write_json, atomic_write_text
from classifier_training.model import create_model
from classifier_training.recipe import ExportConfig, Recipe, load_recipe

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
    recipe: Recipe, class_to_idx: dict[str, int], data_root: str | Path | None, n: int
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
            found = index_split(root, split, class_to_idx, recipe.data.format)
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


def _per_class_accuracy(
    metrics: Mapping[str, float], exported: str, selected: str
) -> dict[str, float]:
    """Per-class validation accuracy of the exported weights from the checkpoint's metrics.

    ``val/acc_class/<label>`` belongs to the run's selected weights; other weights only have
    numbers under ``val_<weights>/acc_class/<label>`` when the engine logged them.
    """
    prefixes = [f"val_{exported}/acc_class/"] + (["val/acc_class/"] if exported == selected else [])
    for prefix in prefixes:
        found = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        if found:
            return found
    return {}


USAGE_SNIPPET = """\
import json, numpy as np, onnxruntime as ort
from PIL import Image
m = json.load(open("labels_mapping.json"))
r, s = m["preprocessing"]["resize_shorter"], m["preprocessing"]["center_crop"]
img = Image.open("image.jpg").convert("RGB"); w, h = img.size
img = img.resize((r, int(r * h / w)) if w <= h else (int(r * w / h), r), Image.BILINEAR)
x0, y0 = round((img.width - s) / 2), round((img.height - s) / 2)
x = np.asarray(img.crop((x0, y0, x0 + s, y0 + s)), np.float32) / 255
x = ((x - m["normalization"]["mean"]) / m["normalization"]["std"]).astype(np.float32)
sess = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
logits = sess.run(["logits"], {"input": x.transpose(2, 0, 1)[None].copy()})[0]
print(m["idx_to_class"][str(int(logits.argmax()))])
"""


def _model_card(
    info: dict[str, Any],
    mapping: Mapping[str, Any],
    per_class: dict[str, float],
    split_counts: Mapping[str, Mapping[str, int]],
) -> str:
    pre = mapping.get("preprocessing", {})
    norm = mapping["normalization"]
    ver = info["verification"]
    ck = info["checkpoint"]
    labels = [mapping["idx_to_class"][str(i)] for i in range(mapping["num_classes"])]
    value = ck.get("monitor_value")
    value_text = f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
    lines = [
        f"# {info['run_name']}: {info['arch']} image classifier ({mapping['num_classes']} classes)",
        "",
        f"Exported {info['created_at']} from `{ck['path']}` (epoch {ck['epoch']}, "
        f"{ck['monitor']} = {value_text}), **{info['weights']}** weights, ONNX opset "
        f"{info['opset']}.",
        "",
        "## Files",
        "",
        "- `model.onnx`: input `input` float32 `[batch, 3, "
        f"{info['image_size']}, {info['image_size']}]` (normalized RGB, NCHW), output `logits` "
        f"float32 `[batch, {mapping['num_classes']}]` (raw logits, apply softmax yourself).",
        "- `labels_mapping.json`: `idx_to_class`, `class_to_idx`, normalization, preprocessing.",
        "- `model.safetensors`: the same weights for PyTorch/timm "
        f'(`timm.create_model("{info["arch"]}", num_classes={mapping["num_classes"]})`).',
        "- `export.json`: provenance and the verification report.",
        "",
        "## Data",
        "",
        f"Dataset `{info['data']['root']}`.",
        "",
    ]
    if split_counts:
        lines += ["| split | images |", "| --- | ---: |"]
        lines += [f"| {s} | {sum(c.values())} |" for s, c in split_counts.items()]
        lines.append("")
    lines += ["## Classes and validation accuracy", ""]
    count_splits = list(split_counts)
    head = "| idx | label | val top-1 |" + "".join(f" {s} images |" for s in count_splits)
    lines += [head, "| ---: | --- | ---: |" + " ---: |" * len(count_splits)]
    for i, label in enumerate(labels):
        acc = per_class.get(label)
        acc_text = f"{acc:.3f}" if acc is not None else "n/a"
        counts = "".join(f" {split_counts[s].get(label, 0)} |" for s in count_splits)
        lines.append(f"| {i} | `{label}` | {acc_text} |{counts}")
    lines += [
        "",
        "## Preprocessing (do exactly this)",
        "",
        f"1. Decode, convert to RGB; resize the shorter side to {pre.get('resize_shorter')} px "
        f"({pre.get('interpolation', 'bilinear')}, aspect kept, the longer side truncated to int).",
        f"2. Centre-crop {pre.get('center_crop')} x {pre.get('center_crop')} "
        "(offsets `round((side - crop) / 2)`).",
        f"3. Scale to [0, 1] (`/ 255`), subtract mean {norm['mean']}, divide by std {norm['std']}.",
        "4. HWC -> CHW, add the batch axis, float32. Softmax over `logits` gives confidences.",
        "",
        "## Usage (onnxruntime, no code from this repository)",
        "",
        "Run from this folder with an `image.jpg`:",
        "",
        "```python",
        USAGE_SNIPPET.rstrip("\n"),
        "```",
        "",
        "## Verification",
        "",
        f"onnxruntime ({ver['provider']}) vs PyTorch on {ver['n_images']} real "
        f"`{info['data']['verify_split']}` images at batch sizes {ver['batch_sizes']}: "
        f"top-1 agrees on {ver['top1_agree']}, max |logit difference| {ver['max_abs_diff']:.2e} "
        f"(allowed {ver['atol']:.0e}).",
        "",
    ]
    return "\n".join(lines)


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


def export_run(
    run_dir: str | Path,
    cfg: ExportConfig | None = None,
    *,
    out: str | Path | None = None,
    data_root: str | Path | None = None,
) -> Path:
    """Export a run's checkpoint to a verified ONNX bundle; returns the bundle folder.

    ``cfg`` (default ``ExportConfig()``): ``checkpoint`` best, last, or a checkpoint folder;
    ``weights`` selected (the recipe's ``ema.select``, raw when EMA is off), ema or raw; ``opset``;
    ``verify_images`` (>= 1) validation images compared (test images if the validation split is
    absent) with tolerance ``atol``. ``out`` defaults to ``run_dir/export``; ``data_root``
    overrides the recipe's ``data.root`` for finding the images.
    Raises :class:`ExportError` / :class:`ExportVerificationError` / CheckpointError.
    """
    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else ExportConfig()
    out_dir = check_out_dir(out if out is not None else run_dir / "export", run_dir)
    if cfg.verify_images < 1:
        raise ExportError(
            f"verify_images={cfg.verify_images}: verification is part of the export and needs at "
            f"least one image (default {ExportConfig.verify_images})"
        )
    if cfg.atol <= 0:
        raise ExportError(
            f"atol={cfg.atol}: the logit tolerance must be > 0 (default {ExportConfig.atol:g})"
        )
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
    num_classes = int(mapping["num_classes"])
    class_to_idx = {str(k): int(v) for k, v in mapping["class_to_idx"].items()}
    image_size = recipe.data.image_size
    pre = mapping.get("preprocessing")
    if pre is not None and int(pre["center_crop"]) != image_size:
        raise ExportError(
            f"{labels_path}: preprocessing.center_crop={pre['center_crop']} but the recipe's "
            f"data.image_size={image_size}; the run directory is inconsistent"
        )

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
    model = _cpu_eval_copy(model)
    state = TrainerState.from_file(ckpt / STATE_FILE) if (ckpt / STATE_FILE).is_file() else None

    samples, verify_split, root = _verification_samples(
        recipe, class_to_idx, data_root, cfg.verify_images
    )
    norm = mapping["normalization"]
    x = to_nchw_float(_load_images(samples, image_size), norm["mean"], norm["std"])

    tmp = staging_dir(out_dir)
    try:
        metadata = {
            "idx_to_class": json.dumps(mapping["idx_to_class"]),
            "num_classes": str(num_classes),
            "normalization": json.dumps(norm),
            "preprocessing": json.dumps(pre or {}),
            "arch": recipe.model.arch,
            "weights": chosen,
            "checkpoint": str(ckpt),
            "input": f"{INPUT_NAME}: float32 [batch, 3, {image_size}, {image_size}] normalized RGB",
            "output": f"{OUTPUT_NAME}: float32 [batch, {num_classes}] raw logits",
            "producer": f"classifier-training {classifier_training.__version__}",
        }
        export_onnx(model, tmp / ONNX_FILE, image_size, cfg.opset, metadata)
        report = verify_onnx(tmp / ONNX_FILE, model, x, cfg.atol)
        write_labels_mapping(tmp / LABELS_FILE, mapping)
        save_model(
            model,
            str(tmp / WEIGHTS_FILE),
            metadata={
                "arch": recipe.model.arch,
                "num_classes": str(num_classes),
                "weights": chosen,
            },
        )
        metrics = dict(state.metrics) if state else {}
        onnx_sha256 = hashlib.sha256((tmp / ONNX_FILE).read_bytes()).hexdigest()
        info: dict[str, Any] = {
            "run_name": recipe.name,
            "arch": recipe.model.arch,
            "num_classes": num_classes,
            "image_size": image_size,
            "weights": chosen,
            "opset": cfg.opset,
            "model_onnx_sha256": onnx_sha256,
            "checkpoint": {
                "path": str(ckpt),
                "epoch": state.epoch if state else None,
                "updates": state.updates if state else None,
                "monitor": recipe.train.monitor,
                "monitor_value": metrics.get(recipe.train.monitor),
                "monitor_weights": selected,
            },
            "data": {"root": str(root), "verify_split": verify_split},
            "verification": report,
            "versions": _versions(),
            "code_version": code_version(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        atomic_write_json(tmp / EXPORT_INFO_FILE, info)
        per_class = _per_class_accuracy(metrics, chosen, selected)
        card = _model_card(info, mapping, per_class, _split_counts(run_dir))
        atomic_write_text(tmp / CARD_FILE, card)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` (see :mod:`classifier_training.bundle_dir`)."""
    install_bundle(tmp, final)
