"""The deployment bundle end to end on a tiny trained run, through the real CLIs:

``python -m export --precision fp32,fp16,int8``, an independent consumer of every variant,
``predict --min-confidence auto``, and the ``evaluate --compare`` regression gate against a
deliberately worse bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from accelerate.state import AcceleratorState

import train as train_script
from classifier_training.data.labels import read_labels_mapping
from classifier_training.recipe import parse_recipe
from conftest import write_jsonl_dataset

pytestmark = pytest.mark.slow

CLASSES = ("0", "00", "1", "10", "2")
SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}


def run(*args: str, cwd: Path = SRC) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4 epochs of test_resnet on one-colour-per-class images (easy), all hooks on."""
    root = tmp_path_factory.mktemp("deploy")
    data = write_jsonl_dataset(root / "data", CLASSES, {"train": 16, "valid": 8, "test": 8})
    out = root / "run"
    recipe = parse_recipe(
        [
            *("--data.root", str(data), "--data.image_size", "32", "--data.batch_size", "16"),
            *("--data.num_workers", "0", "--model.arch", "test_resnet"),
            *("--model.pretrained", "false", "--train.epochs", "4", "--optim.lr", "3e-3"),
            *("--train.output_dir", str(out), "--train.mixed_precision", "no"),
            *("--train.keep_top_k", "4", "--schedule.warmup_epochs", "1"),
            *("--logging.progress", "off", "--ema.enabled", "false", "--augment.preset", "none"),
            *("--export.precision", "fp32,fp16,int8", "--export.max_accuracy_drop", "1.0"),
            *("--hooks.confusion_every", "2"),
        ]
    )
    AcceleratorState._reset_state(True)
    train_script.train(recipe)
    AcceleratorState._reset_state(True)
    return {"data": data, "run": out}


def test_training_reports(trained: dict[str, Path]) -> None:
    run = trained["run"]
    assert (run / "results.csv").read_text().startswith("epoch,updates,")
    assert (run / "history" / "lr.png").is_file()
    stats = json.loads((run / "dataset_stats.json").read_text())
    assert stats["near_duplicates"]["hash"] == "dhash-64"
    assert (run / "epochs" / "004" / "sample_predictions.png").is_file()
    drawn = sorted(p.parent.name for p in run.glob("epochs/*/confusion_matrix.png"))
    assert {"002", "004"} <= set(drawn) and len(drawn) <= 3  # every 2, last, the best epoch
    # the export hook wrote every variant (tolerance 1.0 in the recipe)
    assert {p.name for p in (run / "export").glob("*.onnx")} == {
        "model.onnx",
        "model.fp16.onnx",
        "model.int8.onnx",
    }


def test_export_cli_writes_verified_variants(trained: dict[str, Path]) -> None:
    """The README's command as written: python -m export --run runs/<name> --precision ..."""
    out = trained["run"] / "export"
    result = run("-m", "export", "--run", str(trained["run"]), "--precision", "fp32,fp16,int8")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fp16" in result.stdout and "int8" in result.stdout and "calibration" in result.stdout
    info = json.loads((out / "export.json").read_text())
    assert set(info["variants"]) == {"fp32", "fp16", "int8"}
    for name, v in info["variants"].items():
        assert (out / v["file"]).stat().st_size == v["size_bytes"]
        assert 0 <= v["accuracy"] <= 1 and 0 <= v["agreement"] <= 1
        assert set(v["latency_ms"]) == {"1", "32"} and all(x > 0 for x in v["latency_ms"].values())
        assert v["n_images"] == 2 * 8 * len(CLASSES)
        assert name != "fp32" or v["agreement"] == 1.0
    assert info["variants"]["int8"]["size_bytes"] < info["variants"]["fp32"]["size_bytes"]
    test_acc = info["evaluation"]["test"]["accuracy"]
    assert test_acc > 0.5  # the colours are easy: the model learnt something
    mapping = read_labels_mapping(out / "labels_mapping.json")
    cal = mapping["calibration"]
    assert set(cal) >= {"temperature", "threshold", "target_precision", "coverage"}
    assert set(cal) >= {"ece_before", "ece_after"}
    meta = {p.key: p.value for p in onnx.load(str(out / "model.int8.onnx")).metadata_props}
    assert json.loads(meta["calibration"])["threshold"] == cal["threshold"]
    assert meta["precision"] == "int8"
    card = (out / "README.md").read_text()
    assert f"test: top-1 {100 * test_acc:.2f}%" in card and "selection split" in card
    assert "model.int8.onnx" in card and "Temperature scaling" in card
    assert (out / "reliability.png").is_file()


def consumer_top1(bundle: Path, file: str, images: list[Path]) -> list[str]:
    """What a program knowing only labels_mapping.json and onnxruntime gets."""
    m = json.loads((bundle / "labels_mapping.json").read_text())
    sess = ort.InferenceSession(str(bundle / file), providers=["CPUExecutionProvider"])
    from PIL import Image

    r, s = m["preprocessing"]["resize_shorter"], m["preprocessing"]["center_crop"]
    batch = []
    for path in images:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        img = img.resize(size, Image.BILINEAR)
        x0, y0 = round((img.width - s) / 2), round((img.height - s) / 2)
        x = np.asarray(img.crop((x0, y0, x0 + s, y0 + s)), np.float32) / 255
        batch.append(
            ((x - m["normalization"]["mean"]) / m["normalization"]["std"]).transpose(2, 0, 1)
        )
    logits = sess.run(["logits"], {"input": np.stack(batch).astype(np.float32)})[0]
    return [m["idx_to_class"][str(int(i))] for i in logits.argmax(1)]


def test_independent_consumer_runs_every_variant(trained: dict[str, Path]) -> None:
    bundle = trained["run"] / "export"
    images = sorted((trained["data"] / "test").glob("*.jpg"))[:10]
    answers = {
        f: consumer_top1(bundle, f, images)
        for f in ("model.onnx", "model.fp16.onnx", "model.int8.onnx")
    }
    assert all(len(a) == 10 for a in answers.values())
    info = json.loads((bundle / "export.json").read_text())
    if info["variants"]["fp16"]["agreement"] == 1.0:
        assert answers["model.fp16.onnx"] == answers["model.onnx"]
    # the card's snippets run verbatim on any variant
    card = (bundle / "README.md").read_text()
    parts = card.split("```python\n")
    snippet = parts[1].split("```", 1)[0] + parts[2].split("```", 1)[0]
    shutil.copy(images[0], bundle / "image.jpg")
    try:
        for f in ("model.onnx", "model.int8.onnx"):
            code = snippet.replace('"model.onnx"', f'"{f}"')
            out = subprocess.run(
                [sys.executable, "-c", code], cwd=bundle, capture_output=True, text=True, check=True
            )
            lines = out.stdout.strip().splitlines()
            assert lines[0] == answers[f][0] and lines[1] in (answers[f][0], "unknown")
    finally:
        (bundle / "image.jpg").unlink()


def test_predict_min_confidence(trained: dict[str, Path]) -> None:
    bundle = trained["run"] / "export"
    images = [str(p) for p in sorted((trained["data"] / "test").glob("*.jpg"))[:6]]
    result = run(
        "-m",
        "classifier_training.deploy.predict",
        "--model",
        str(bundle),
        "--min-confidence",
        "auto",
        *images,
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    threshold = read_labels_mapping(bundle / "labels_mapping.json")["calibration"]["threshold"]
    for a in answers:
        assert a["abstained"] == (a["confidence"] < threshold)
        assert (a["label"] == "unknown") == a["abstained"]
    everything = run(
        "-m",
        "classifier_training.deploy.predict",
        "--model",
        str(bundle / "model.fp16.onnx"),
        "--min-confidence",
        "1.0",
        *images,
    )
    assert all(
        a["label"] == "unknown" for a in json.loads(everything.stdout) if a["confidence"] < 1.0
    )


def worse_bundle(good: Path, dest: Path, label: str) -> None:
    """A copy of ``good`` whose model.onnx never predicts ``label`` (its logit bias - 1000)."""
    shutil.copytree(good, dest)
    mapping = json.loads((good / "labels_mapping.json").read_text())
    idx = mapping["class_to_idx"][label]
    proto = onnx.load(str(dest / "model.onnx"))
    last = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
    bias = next(t for t in proto.graph.initializer if t.name == last.input[2])
    values = onnx.numpy_helper.to_array(bias).copy()
    values[idx] -= 1000.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(proto, str(dest / "model.onnx"))


def test_compare_gate(trained: dict[str, Path], tmp_path: Path) -> None:
    good = trained["run"] / "export"
    info: dict[str, Any] = json.loads((good / "export.json").read_text())
    per_class = info["evaluation"]["test"]["accuracy_by_class"]
    victim = max(per_class, key=per_class.get)
    assert per_class[victim] > 0.5
    bad = tmp_path / "worse"
    worse_bundle(good, bad, victim)
    args = (
        "-m",
        "classifier_training.deploy.evaluate",
        "--data",
        str(trained["data"]),
        "--split",
        "test",
    )
    gate = run(
        *args,
        "--model",
        str(bad),
        "--compare",
        str(good),
        "--out",
        str(tmp_path / "ev"),
        "--errors-dir",
        str(tmp_path / "errors"),
    )
    assert gate.returncode == 3, gate.stdout + gate.stderr
    assert "REGRESSION" in gate.stdout and f"dropped by more than 10%: {victim}" in gate.stdout
    report = json.loads((tmp_path / "ev" / "compare.json").read_text())
    assert victim in report["regressed_classes"] and report["right_to_wrong"]
    assert all(f["label"] == victim for f in report["right_to_wrong"])
    folders = {p.name for p in (tmp_path / "errors").iterdir() if p.is_dir()}
    assert any(f.startswith(f"true_{victim}__pred_") for f in folders)
    rows = [
        json.loads(x) for x in (tmp_path / "errors" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 8 * len(CLASSES)
    for r in rows:
        assert (
            (tmp_path / "errors" / r["error_file"]).is_file()
            if not r["correct"]
            else "error_file" not in r
        )

    # the README's command as written (output beside the bundle: <run>/eval-test)
    ok = run(
        "-m", "classifier_training.deploy.evaluate", "--model", str(good), "--compare", str(bad),
        "--data", str(trained["data"]), "--split", "test",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout and (trained["run"] / "eval-test" / "compare.json").is_file()
