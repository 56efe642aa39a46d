"""onnxruntime predictor, predict/evaluate CLIs: contract, parity with PyTorch, no torch import."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from torch.utils.data import DataLoader

from classifier_training.data.dataset import ImageDataset
from classifier_training.data.index import index_dataset
from classifier_training.data.labels import labels_mapping, write_labels_mapping
from classifier_training.deploy import evaluate as evaluate_cli
from classifier_training.deploy import predict as predict_cli
from classifier_training.deploy.evaluate import evaluate_onnx
from classifier_training.deploy.onnx_classifier import OnnxClassifier, softmax
from classifier_training.deploy.onnx_export import export_run
from classifier_training.evaluation import EvalResult
from classifier_training.evaluation import evaluate as torch_evaluate
from conftest import assert_imports_without_torch, write_imagefolder_dataset
from test_onnx_export import CLASSES, SIZE, make_run, real_batch


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An exported run whose valid split also holds rows with unknown labels ("99" and "")."""
    root = tmp_path_factory.mktemp("bundle")
    fake = make_run(root, per_split={"train": 3, "valid": 4, "test": 2})
    annotations = fake["data"] / "valid" / "annotations.jsonl"
    with annotations.open("a") as fh:
        fh.write(json.dumps({"image": "c00_000.jpg", "suffix": "99"}) + "\n")
        fh.write(json.dumps({"image": "c01_000.jpg", "suffix": ""}) + "\n")
    fake["export"] = export_run(fake["run"])
    return fake


def images_of(folder: Path, n: int) -> list[Path]:
    return sorted(folder.glob("*.jpg"))[:n]


# ---------------------------------------------------------------------------------------------
# OnnxClassifier


def test_predict_top_k_labels_and_softmax_match_torch(bundle: dict[str, Any]) -> None:
    clf = OnnxClassifier(bundle["export"])
    assert clf.image_size == SIZE and clf.num_classes == len(CLASSES)
    assert clf.metadata["arch"] == "test_resnet"
    paths = images_of(bundle["data"] / "valid", 3)
    preds = clf.predict([Image.open(p) for p in paths], top_k=3)
    with torch.no_grad():
        logits = bundle["ema"].eval()(torch.from_numpy(real_batch(paths)))
    # confidences are calibrated: softmax(logits / T) with the bundle's temperature
    assert clf.calibration is not None and clf.temperature != 1.0
    probs = torch.softmax(logits / clf.temperature, dim=1).numpy()
    assert len(preds) == 3
    for row, p in zip(preds, probs, strict=True):
        assert len(row) == 3
        assert [d["label"] for d in row] == [CLASSES[d["class_id"]] for d in row]
        conf = [d["confidence"] for d in row]
        assert conf == sorted(conf, reverse=True)
        assert row[0]["class_id"] == int(p.argmax())
        for d in row:
            assert d["confidence"] == pytest.approx(float(p[d["class_id"]]), abs=1e-5)


def test_preprocess_is_the_training_eval_path(bundle: dict[str, Any]) -> None:
    clf = OnnxClassifier(bundle["export"])
    paths = images_of(bundle["data"] / "valid", 2)
    x = clf.preprocess([Image.open(p) for p in paths])
    assert x.dtype == np.float32 and x.shape == (2, 3, SIZE, SIZE)
    np.testing.assert_array_equal(x, real_batch(paths))


def test_top_k_is_capped_and_probabilities_sum_to_one(bundle: dict[str, Any]) -> None:
    clf = OnnxClassifier(bundle["export"])
    (row,) = clf.predict([Image.open(images_of(bundle["data"] / "valid", 1)[0])], top_k=50)
    assert sorted(d["class_id"] for d in row) == list(range(len(CLASSES)))
    assert sum(d["confidence"] for d in row) == pytest.approx(1.0, abs=1e-5)
    assert clf.predict([], top_k=5) == []
    with pytest.raises(ValueError, match="top_k"):
        clf.predict([], top_k=0)


def test_model_and_labels_paths_and_mismatch(bundle: dict[str, Any], tmp_path: Path) -> None:
    labels = tmp_path / "elsewhere.json"
    shutil.copy(bundle["export"] / "labels_mapping.json", labels)
    clf = OnnxClassifier(bundle["export"] / "model.onnx", labels)
    assert clf.idx_to_class == dict(enumerate(CLASSES))
    wrong = tmp_path / "wrong.json"
    write_labels_mapping(wrong, labels_mapping({"a": 0, "b": 1}, SIZE))
    with pytest.raises(ValueError, match="do not belong together"):
        OnnxClassifier(bundle["export"] / "model.onnx", wrong)
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        OnnxClassifier(tmp_path)


def test_softmax_is_numerically_stable() -> None:
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]], dtype=np.float32))
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[0], [1.0, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(p[1], [1 / 3] * 3, atol=1e-7)


def test_predict_cli_prints_json(
    bundle: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [str(p) for p in images_of(bundle["data"] / "valid", 2)]
    assert predict_cli.main(["--model", str(bundle["export"]), *paths, "--top-k", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out] == paths
    assert all(len(r["predictions"]) == 2 for r in out)
    assert set(out[0]["predictions"][0]) == {"class_id", "label", "confidence"}
    missing = str(bundle["data"] / "missing.jpg")
    assert predict_cli.main(["--model", str(bundle["export"]), missing]) == 1
    assert "missing.jpg" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# evaluate: the same numbers as the PyTorch evaluation of the same weights


def torch_eval(bundle: dict[str, Any]) -> EvalResult:
    index = index_dataset(bundle["data"])
    assert index.val is not None
    dataset = ImageDataset(index.val.samples, mode="eval", image_size=SIZE)
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=7))
    result = torch_evaluate(
        bundle["ema"],
        loader,
        accelerator,
        torch.nn.CrossEntropyLoss(),
        list(CLASSES),
        split="val",
        weights="ema",
        prefix="val",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        channels_last=False,
    )
    AcceleratorState._reset_state(True)
    return result


def test_evaluate_matches_the_torch_evaluation(bundle: dict[str, Any], tmp_path: Path) -> None:
    summary = evaluate_onnx(bundle["export"], bundle["data"], "valid", out=tmp_path, batch_size=6)
    result = torch_eval(bundle)
    expected = result.metrics
    assert summary["total"] == 4 * len(CLASSES)
    assert summary["skipped_unknown"] == 2  # the "99" and "" rows, as the index skips them
    # torchmetrics computes in float32, hence the tolerance; the per-image check is exact.
    assert summary["top1_accuracy"] == pytest.approx(expected["val/acc_top1"], abs=1e-6)
    assert summary["top5_accuracy"] == pytest.approx(expected["val/acc_top5"], abs=1e-6)
    for label, c in summary["per_class"].items():
        assert c["total"] == 4
        assert c["accuracy"] == pytest.approx(expected[f"val/acc_class/{label}"], abs=1e-6)
    assert sum(c["correct"] for c in summary["per_class"].values()) == summary["top1_correct"]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == summary
    assert set(written) >= {
        "source",
        "split",
        "total",
        "top1_correct",
        "top1_accuracy",
        "top5_correct",
        "top5_accuracy",
        "per_class",
    }
    assert written["source"] == "onnx-test_resnet"
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == summary["total"]
    ort_top1 = [r["predictions"][0]["class_id"] for r in rows]
    assert ort_top1 == result.preds.tolist()
    assert [r["label"] for r in rows] == [CLASSES[t] for t in result.targets.tolist()]


def test_evaluate_needs_no_train_split_and_reads_imagefolder(
    bundle: dict[str, Any], tmp_path: Path
) -> None:
    only_valid = tmp_path / "only_valid"
    shutil.copytree(bundle["data"] / "valid", only_valid / "valid")
    a = evaluate_onnx(bundle["export"], only_valid, "valid")
    b = evaluate_onnx(bundle["export"], bundle["data"], "valid")
    assert a["top1_correct"] == b["top1_correct"] and a["total"] == b["total"]

    folder = write_imagefolder_dataset(tmp_path / "if", (*CLASSES, "77"), {"test": 2})
    s = evaluate_onnx(bundle["export"], folder, "test", format="auto")
    assert s["total"] == 2 * len(CLASSES) and s["skipped_unknown"] == 2


def test_evaluate_cli(
    bundle: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = evaluate_cli.main(
        [
            "--model",
            str(bundle["export"]),
            "--data",
            str(bundle["data"]),
            "--split",
            "test",
            "--out",
            str(tmp_path / "ev"),
            "--batch-size",
            "4",
        ]
    )
    assert code == 0
    assert "top-1" in capsys.readouterr().out
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["split"] == "test" and summary["total"] == 2 * len(CLASSES)
    assert (
        evaluate_cli.main(["--model", str(bundle["export"]), "--data", str(tmp_path / "none")]) == 1
    )
    assert "not found" in capsys.readouterr().err


def test_torch_free_deploy_modules_do_not_import_torch() -> None:
    assert_imports_without_torch(
        "classifier_training.deploy",
        "classifier_training.deploy.onnx_classifier",
        "classifier_training.deploy.evaluate",
        "classifier_training.deploy.predict",
    )
