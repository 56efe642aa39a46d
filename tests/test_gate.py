"""Consumer-side calibration (min confidence, "unknown"), the evaluator's --errors-dir and
--compare, and ``python -m export`` reporting a rejected variant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from PIL import Image

from classifier_training.data.index import index_split
from classifier_training.data.labels import read_labels_mapping, write_labels_mapping
from classifier_training.deploy import evaluate as evaluate_cli
from classifier_training.deploy import export_cli
from classifier_training.deploy import variants as V
from classifier_training.deploy.evaluate import compare_bundles, split_logits, write_errors_dir
from classifier_training.deploy.onnx_classifier import UNKNOWN, OnnxClassifier
from classifier_training.deploy.onnx_export import export_run
from test_onnx_export import CLASSES, make_run


def relabel_as_predicted(bundle: Path, data: Path) -> None:
    """Rewrite the valid/test labels with the bundle's own predictions (fp32 is then right on
    every image, so any worse variant is measurably worse)."""
    clf = OnnxClassifier(bundle)
    for split in ("valid", "test"):
        path = data / split / "annotations.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        images = [Image.open(data / split / r["image"]) for r in rows]
        for r, top in zip(rows, clf.predict(images, top_k=1), strict=True):
            r["suffix"] = top[0]["label"]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    fake = make_run(tmp_path_factory.mktemp("gate"), per_split={"train": 3, "valid": 4, "test": 4})
    relabel_as_predicted(export_run(fake["run"]), fake["data"])
    fake["export"] = export_run(fake["run"])
    return fake


def negated(src: Path, dst: Path, batches: Any = None) -> int:
    """A model whose logits are those of ``src`` negated (top-1 is never right here)."""
    proto = onnx.load(str(src))
    out = proto.graph.output[0]
    for node in proto.graph.node:
        node.output[:] = [o + "_raw" if o == out.name else o for o in node.output]
    proto.graph.node.append(onnx.helper.make_node("Neg", [out.name + "_raw"], [out.name]))
    onnx.save(proto, str(dst))
    return 1


# ---------------------------------------------------------------------------------------------
# Calibrated predictor


def test_min_confidence_auto_is_the_bundle_threshold(run: dict[str, Any], tmp_path: Path) -> None:
    clf = OnnxClassifier(run["export"])
    assert clf.calibration is not None
    assert clf.min_confidence("auto") == clf.calibration["threshold"]
    assert clf.min_confidence("0.5") == 0.5 and clf.min_confidence(None) is None
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        clf.min_confidence("1.5")
    with pytest.raises(ValueError, match="use auto or a number"):
        clf.min_confidence("high")
    # a bundle written before calibration existed: temperature 1, and auto is refused
    old = tmp_path / "old"
    shutil.copytree(run["export"], old)
    mapping = read_labels_mapping(old / "labels_mapping.json")
    mapping.pop("calibration")
    write_labels_mapping(old / "labels_mapping.json", mapping)
    plain = OnnxClassifier(old)
    assert plain.temperature == 1.0
    with pytest.raises(ValueError, match="has no calibration"):
        plain.min_confidence("auto")


def test_classify_answers_unknown_below_the_threshold(run: dict[str, Any]) -> None:
    clf = OnnxClassifier(run["export"])
    images = [Image.open(p) for p in sorted((run["data"] / "test").glob("*.jpg"))[:6]]
    top = [a["confidence"] for a in clf.classify(images)]
    cut = float(np.median(top))
    for a in clf.classify(images, top_k=2, min_confidence=cut):
        assert a["abstained"] == (a["confidence"] < cut)
        assert (a["label"] == UNKNOWN) == a["abstained"]
        assert a["class_id"] == (-1 if a["abstained"] else a["predictions"][0]["class_id"])
        assert len(a["predictions"]) == 2
    assert not any(a["abstained"] for a in clf.classify(images))


def test_evaluate_reports_the_abstain_operating_point(
    run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model", str(run["export"]), "--data", str(run["data"]), "--split", "test"]
    assert evaluate_cli.main([*args, "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["top1_accuracy"] == 1.0  # labels are the model's own predictions
    ab = summary["abstain"]
    assert ab["total"] == 4 * len(CLASSES) and 0 <= ab["coverage"] <= 1
    assert "calibrated (T = " in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# --errors-dir


def test_errors_dir_layout_and_refusal(tmp_path: Path, run: dict[str, Any]) -> None:
    samples = index_split(run["data"], "test", {c: i for i, c in enumerate(CLASSES)}).samples[:3]
    records = [
        {"correct": True, "predictions": [{"label": "0", "confidence": 0.9}]},
        {"correct": False, "predictions": [{"label": "a/b", "confidence": 0.8}]},
        {"correct": False, "predictions": [{"label": "a/b", "confidence": 0.7}]},
    ]
    shutil.copy(samples[1].path, tmp_path / "twin.jpg")
    samples[2] = type(samples[2])(tmp_path / samples[1].path.name, samples[2].label, 0, "x")
    shutil.copy(tmp_path / "twin.jpg", samples[2].path)
    out = tmp_path / "errors"
    assert write_errors_dir(out, samples, records) == 2
    folder = out / f"true_{samples[1].label}__pred_a_b"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [samples[1].path.name, f"000001_{samples[1].path.name}"]
    )
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, False]
    assert rows[1]["confidence"] == 0.8 and (out / rows[1]["error_file"]).is_file()
    with pytest.raises(ValueError, match="not empty"):
        write_errors_dir(out, samples, records)


# ---------------------------------------------------------------------------------------------
# --compare


def test_compare_refuses_different_class_maps(run: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(run["export"], other)
    mapping = read_labels_mapping(other / "labels_mapping.json")
    a, b = mapping["idx_to_class"]["0"], mapping["idx_to_class"]["1"]
    mapping["idx_to_class"]["0"], mapping["idx_to_class"]["1"] = b, a
    mapping["class_to_idx"][a], mapping["class_to_idx"][b] = 1, 0
    write_labels_mapping(other / "labels_mapping.json", mapping)
    new, old = OnnxClassifier(run["export"]), OnnxClassifier(other)
    index = index_split(run["data"], "test", {c: i for i, c in enumerate(CLASSES)})
    with pytest.raises(ValueError, match="different class maps"):
        compare_bundles(new, old, index, split_logits(new, index.samples))


def test_compare_cli_fails_a_negated_model(
    run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(run["export"], bad)
    negated(run["export"] / "model.onnx", bad / "model.onnx")
    args = ["--data", str(run["data"]), "--split", "test", "--out", str(tmp_path / "ev")]
    code = evaluate_cli.main(["--model", str(bad), "--compare", str(run["export"]), *args])
    out = capsys.readouterr().out
    assert code == evaluate_cli.REGRESSION_EXIT, out
    report = json.loads((tmp_path / "ev" / "compare.json").read_text())
    assert report["significantly_worse"] and report["mcnemar"]["right_to_wrong"] == 20
    # every class present lost all its images
    assert sorted(report["regressed_classes"]) == sorted(report["per_class"])
    assert "REGRESSION" in out and "right -> wrong: 20 image(s)" in out


# ---------------------------------------------------------------------------------------------
# python -m export with a variant that fails its check


def test_export_cli_leaves_out_a_rejected_variant(
    run: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(V, "quantize_int8", negated)
    out = tmp_path / "bundle"
    argv = ["--run", str(run["run"]), "--out", str(out), "--precision", "fp32,fp16,int8"]
    code = export_cli.main(argv)
    captured = capsys.readouterr()
    assert code == export_cli.VARIANT_REJECTED, captured.err
    assert "REJECTED     int8 not written: accuracy 0.0000 is 1.0000 below fp32" in captured.out
    assert "int8 not written" in captured.err
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.fp16.onnx", "model.onnx"]
    info = json.loads((out / "export.json").read_text())
    assert set(info["variants"]) == {"fp32", "fp16"} and set(info["rejected_variants"]) == {"int8"}
    assert "Rejected: int8 not written" in (out / "README.md").read_text()


def test_recipe_checks_the_export_and_near_duplicate_fields() -> None:
    from classifier_training.recipe import parse_recipe
    from classifier_training.recipe_yaml import RecipeError

    with pytest.raises(RecipeError, match=r"export\.precision 'fp32,bf16'"):
        parse_recipe(["--export.precision", "fp32,bf16"])
    with pytest.raises(RecipeError, match=r"export\.target_precision must be in"):
        parse_recipe(["--export.target_precision", "0"])
    with pytest.raises(RecipeError, match=r"hooks\.near_duplicate_distance must be in"):
        parse_recipe(["--hooks.near_duplicate_distance", "65"])
    recipe = parse_recipe(["--export.precision", "fp32,int8"])
    assert V.parse_precisions(recipe.export.precision) == ["fp32", "int8"]
