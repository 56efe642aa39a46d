"""The bundle's ``README.md``: what the files are, how good the model is, how to run it.

Accuracy is reported the honest way: the **test** split, measured with onnxruntime on the
exported weights through the deployment preprocessing; the validation split is labelled as the
split that selected the checkpoint (its number is optimistic). Then the calibration, every
written precision variant (size, accuracy, agreement with fp32, latency) and any rejected one
with its reason. Class tables list labels in natural order ("2" before "10") with their contract
index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from classifier_training.display import natural_order

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

CALIBRATED_SNIPPET = """\
cal = m["calibration"]  # fitted at export: temperature and abstain threshold
p = np.exp((logits[0] - logits.max()) / cal["temperature"]); p /= p.sum()
print("unknown" if p.max() < cal["threshold"] else m["idx_to_class"][str(int(p.argmax()))])
"""

PRECISION_NOTES = {
    "fp32": "float32, the reference",
    "fp16": "float16 weights and activations, float32 input/output",
    "int8": "static INT8 (QDQ), float32 input/output",
}


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "n/a"


def _files(info: Mapping[str, Any], mapping: Mapping[str, Any]) -> list[str]:
    n, size = mapping["num_classes"], info["image_size"]
    lines = ["## Files", ""]
    for name, v in info.get("variants", {}).items():
        lines.append(
            f"- `{v['file']}` ({PRECISION_NOTES[name]}, {v['size_bytes'] / 1e6:.1f} MB): input "
            f"`input` float32 `[batch, 3, {size}, {size}]` (normalized RGB, NCHW), output "
            f"`logits` float32 `[batch, {n}]` (raw logits)."
        )
    lines += [
        "- `labels_mapping.json`: `idx_to_class`, `class_to_idx`, normalization, preprocessing,"
        " `calibration`.",
        "- `model.safetensors`: the same weights for PyTorch/timm "
        f'(`timm.create_model("{info["arch"]}", num_classes={n})`).',
        "- `export.json`: provenance, verification, per-variant numbers, calibration.",
    ]
    if info.get("calibration"):
        lines.append("- `reliability.png`: reliability diagram before/after temperature scaling.")
    return [*lines, ""]


def _accuracy(info: Mapping[str, Any]) -> list[str]:
    ev = info.get("evaluation", {})
    lines = ["## Accuracy (onnxruntime, exported weights, deployment preprocessing)", ""]
    if "test" in ev:
        t = ev["test"]
        lines.append(f"- **test: top-1 {_pct(t['accuracy'])}** on {t['images']} images.")
    else:
        lines.append("- test: no test split was available; there is no unbiased number.")
    if "valid" in ev:
        v = ev["valid"]
        lines.append(
            f"- validation (the **selection split**: it chose this checkpoint, so it is "
            f"optimistic): top-1 {_pct(v['accuracy'])} on {v['images']} images."
        )
    return [*lines, ""]


def _variants(info: Mapping[str, Any]) -> list[str]:
    variants = info.get("variants", {})
    machine = info.get("latency_machine", {})
    lines = [
        "## Precision variants",
        "",
        "Each file was run by onnxruntime on every validation and test image; agreement is the "
        "share of images whose top-1 matches fp32. Latency: median onnxruntime CPU time per "
        f"call on the exporting machine ({machine.get('cpu', 'unknown CPU')}, "
        f"{machine.get('logical_cpus', '?')} logical CPUs).",
        "",
        "| file | size | test top-1 | agreement with fp32 | max abs logit diff | "
        "latency batch 1 | batch 32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in variants.values():
        lat = v.get("latency_ms", {})
        acc = v["accuracy_by_split"].get("test", v["accuracy"])
        lines.append(
            f"| `{v['file']}` | {v['size_bytes'] / 1e6:.2f} MB | {_pct(acc)} | "
            f"{_pct(v['agreement'])} | {v['max_abs_logit_diff']:.2e} | "
            f"{lat.get('1', float('nan')):.2f} ms | {lat.get('32', float('nan')):.1f} ms |"
        )
    for reason in info.get("rejected_variants", {}).values():
        lines.append(f"\nRejected: {reason}.")
    return [*lines, ""]


def _calibration(info: Mapping[str, Any]) -> list[str]:
    cal = info.get("calibration")
    if not cal:
        return ["## Calibration", "", "No validation split: confidences are not calibrated.", ""]
    reached = "" if cal["threshold_reached"] else " (the target was NOT reached on validation)"
    return [
        "## Calibrated confidence and abstention",
        "",
        f"Temperature scaling fitted on {cal['n_fit']} validation images: "
        f"`p = softmax(logits / {cal['temperature']:.4f})`. Expected calibration error on "
        f"{cal['n_eval']} {cal['eval_split']} images ({cal['n_bins']} bins): "
        f"{cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after.",
        "",
        f"Abstain threshold for precision {cal['target_precision']} on validation: predict "
        f"`unknown` when `max(p) < {cal['threshold']:.4f}`{reached}. On the "
        f"{cal['eval_split']} split it keeps {_pct(cal['coverage'])} of the images at precision "
        f"{_pct(cal['precision'])}. Both numbers are in `labels_mapping.json` "
        "(`calibration`) and the ONNX metadata; the graph itself still outputs raw logits.",
        "",
    ]


def _classes(info: Mapping[str, Any], mapping: Mapping[str, Any], counts: Any) -> list[str]:
    ev = info.get("evaluation", {})
    splits = [s for s in ("test", "valid") if s in ev]
    names = {"test": "test top-1", "valid": "val top-1 (selection)"}
    count_splits = list(counts)
    head = "| idx | label |" + "".join(f" {names[s]} |" for s in splits)
    head += "".join(f" {s} images |" for s in count_splits)
    lines = ["## Classes", "", head]
    lines.append("| ---: | --- |" + " ---: |" * (len(splits) + len(count_splits)))
    labels = [mapping["idx_to_class"][str(i)] for i in range(mapping["num_classes"])]
    for i in natural_order(labels):
        label = labels[i]
        accs = "".join(f" {_pct(ev[s]['accuracy_by_class'].get(label))} |" for s in splits)
        n = "".join(f" {counts[s].get(label, 0)} |" for s in count_splits)
        lines.append(f"| {i} | `{label}` |{accs}{n}")
    return [*lines, ""]


def model_card(
    info: Mapping[str, Any],
    mapping: Mapping[str, Any],
    split_counts: Mapping[str, Mapping[str, int]],
) -> str:
    """The README.md text from export.json's ``info`` and the labels mapping."""
    pre = mapping.get("preprocessing", {})
    norm = mapping["normalization"]
    ver = info["verification"]
    ck = info["checkpoint"]
    value = ck.get("monitor_value")
    value_text = f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
    lines = [
        f"# {info['run_name']}: {info['arch']} image classifier ({mapping['num_classes']} classes)",
        "",
        f"Exported {info['created_at']} from `{ck['path']}` (epoch {ck['epoch']}, "
        f"{ck['monitor']} = {value_text} on the selection split), **{info['weights']}** weights, "
        f"ONNX opset {info['opset']}.",
        "",
        *_accuracy(info),
        *_files(info, mapping),
        *_variants(info),
        *_calibration(info),
        f"## Data\n\nDataset `{info['data']['root']}`.\n",
        *_classes(info, mapping, split_counts),
        "## Preprocessing (do exactly this)",
        "",
        f"1. Decode, convert to RGB; resize the shorter side to {pre.get('resize_shorter')} px "
        f"({pre.get('interpolation', 'bilinear')}, aspect kept, the longer side truncated to int).",
        f"2. Centre-crop {pre.get('center_crop')} x {pre.get('center_crop')} "
        "(offsets `round((side - crop) / 2)`).",
        f"3. Scale to [0, 1] (`/ 255`), subtract mean {norm['mean']}, divide by std {norm['std']}.",
        "4. HWC -> CHW, add the batch axis, float32. `softmax(logits / temperature)` gives "
        "calibrated confidences.",
        "",
        "## Usage (onnxruntime, no code from this repository)",
        "",
        "Run from this folder with an `image.jpg` (any variant: change the file name):",
        "",
        "```python",
        USAGE_SNIPPET.rstrip("\n"),
        "```",
        "",
        *(
            [
                "Calibrated confidence, answering `unknown` below the abstain threshold "
                "(continue the snippet above):",
                "",
                "```python",
                CALIBRATED_SNIPPET.rstrip("\n"),
                "```",
                "",
            ]
            if info.get("calibration")
            else []
        ),
        "## Verification",
        "",
        f"onnxruntime ({ver['provider']}) vs PyTorch on {ver['n_images']} real "
        f"`{info['data']['verify_split']}` images at batch sizes {ver['batch_sizes']}: "
        f"top-1 agrees on {ver['top1_agree']}, max |logit difference| {ver['max_abs_diff']:.2e} "
        f"(allowed {ver['atol']:.0e}).",
        "",
    ]
    return "\n".join(lines)
