"""The README's main job, shortened: the quickstart recipe end to end on its generated dataset.

Checks the documented dataset counts and class order, a byte-identical labels_mapping.json, every
file a run leaves, the verified ONNX export, ``python -m export`` reproducing it from the
checkpoint, and the onnxruntime evaluator agreeing with the PyTorch evaluation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from accelerate.state import AcceleratorState

import train as train_script
from classifier_training.data.loaders import load_index
from classifier_training.data.synthetic import DEFAULT_LABELS
from classifier_training.deploy.evaluate import evaluate_onnx
from classifier_training.recipe import RECIPE_DIR, Recipe, load_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Recipe, Path]]:
    tmp = tmp_path_factory.mktemp("quick")
    AcceleratorState._reset_state(True)
    recipe = load_recipe(
        RECIPE_DIR / "quickstart.yaml",
        [
            "--data.root", str(tmp / "synthetic-jerseys"), "--train.output_dir", str(tmp / "run"),
            "--train.epochs", "2", "--train.max_batches_per_epoch", "6",
            "--logging.progress", "lines", "--export.verify_images", "8",
            # 12 batches of training: int8 must not be refused for the accuracy of a toy model
            "--export.max_accuracy_drop", "1.0",
        ],
    )  # fmt: skip
    train_script.train(recipe)
    AcceleratorState._reset_state(True)
    yield recipe, tmp / "run"


def test_generated_dataset_has_documented_counts(quick_run: tuple[Recipe, Path]) -> None:
    recipe, _ = quick_run
    index = load_index(recipe.data)
    syn = recipe.data.synthetic
    assert list(index.class_to_idx) == sorted(DEFAULT_LABELS) == sorted(index.class_to_idx)
    assert len(index.class_to_idx) == 42
    assert list(index.class_to_idx)[:4] == ["0", "00", "1", "10"]
    assert len(index.train) == 42 * syn.train_per_class
    assert len(index.val) == 42 * syn.valid_per_class
    assert index.test is not None and len(index.test) == 42 * syn.test_per_class
    assert set(Counter(s.label for s in index.train.samples).values()) == {syn.train_per_class}


def test_run_folder_holds_everything(quick_run: tuple[Recipe, Path]) -> None:
    recipe, run = quick_run
    for name in (
        "recipe.yaml", "labels_mapping.json", "metrics.jsonl", "test_metrics.json",
        "checkpoints/ledger.json", "dataset_stats.json", "model_info.json",
        "augment_preview.png", "history/loss.png", "history/accuracy.png", "history/lr.png",
        "epochs/002/confusion_matrix.png", "epochs/002/confusion_matrix_normalized.png",
        "epochs/002/sample_predictions.png", "export/model.onnx", "export/labels_mapping.json",
        "export/model.safetensors", "export/export.json", "export/README.md",
    ):  # fmt: skip
        assert (run / name).is_file(), name
    assert load_recipe(run / "recipe.yaml") == recipe
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    for key in ("train/loss", "train/acc_top1", "train/lr", "val/loss", "val/acc_top1",
                "val/acc_top5", "val/f1_macro", "val_raw/acc_top1", "val_ema/acc_top1",
                "val/acc_class/00"):  # fmt: skip
        assert key in rows[-1], key
    mapping = (run / "labels_mapping.json").read_bytes()
    shipped = json.loads((run / "export" / "labels_mapping.json").read_bytes())
    assert set(shipped.pop("calibration")) >= {"temperature", "threshold", "coverage"}
    assert shipped == json.loads(mapping)  # the export adds calibration, changes nothing else
    data = json.loads(mapping)
    assert data["num_classes"] == 42 and data["idx_to_class"]["1"] == "00"


def test_labels_mapping_is_byte_identical_across_runs(
    quick_run: tuple[Recipe, Path], tmp_path: Path
) -> None:
    recipe, run = quick_run
    AcceleratorState._reset_state(True)
    other = load_recipe(
        RECIPE_DIR / "quickstart.yaml",
        [
            "--data.root", recipe.data.root, "--train.output_dir", str(tmp_path / "again"),
            "--train.epochs", "1", "--train.max_batches_per_epoch", "1",
            "--hooks.enabled", "--train.eval_test", "false", "--logging.progress", "off",
        ],
    )  # fmt: skip
    train_script.train(other)
    AcceleratorState._reset_state(True)
    again = (tmp_path / "again" / "labels_mapping.json").read_bytes()
    assert again == (run / "labels_mapping.json").read_bytes()


def test_export_is_verified_and_reproducible(
    quick_run: tuple[Recipe, Path], tmp_path: Path
) -> None:
    _, run = quick_run
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["verification"]["passed"] is True
    assert info["verification"]["top1_agree"] == "8/8"
    assert info["verification"]["max_abs_diff"] <= 1e-4
    assert info["weights"] == "ema"
    model = onnx.load(str(run / "export" / "model.onnx"))
    assert model.opset_import[0].version == 17
    inp = model.graph.input[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "input" and dims == ["batch", 3, 64, 64]
    assert model.graph.output[0].name == "logits"

    out = tmp_path / "re-export"
    proc = subprocess.run(
        [sys.executable, "-m", "export", "--run", str(run), "--out", str(out),
         "--verify-images", "8"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    again = onnx.load(str(out / "model.onnx"))
    weights_a = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    weights_b = {t.name: onnx.numpy_helper.to_array(t) for t in again.graph.initializer}
    assert weights_a.keys() == weights_b.keys()
    for name, value in weights_a.items():
        np.testing.assert_array_equal(value, weights_b[name])


def test_onnx_evaluator_matches_pytorch_evaluation(quick_run: tuple[Recipe, Path]) -> None:
    recipe, run = quick_run
    summary = evaluate_onnx(run / "export", recipe.data.root, split="test")
    torch_metrics = json.loads((run / "test_metrics.json").read_text())
    assert summary["total"] == 42 * recipe.data.synthetic.test_per_class
    # the same number of correct images (torchmetrics reports in float32, hence 1e-6)
    total = summary["total"]
    assert summary["top1_correct"] == round(torch_metrics["test/acc_top1"] * total)
    assert summary["top5_correct"] == round(torch_metrics["test/acc_top5"] * total)
    assert summary["top1_accuracy"] == pytest.approx(torch_metrics["test/acc_top1"], abs=1e-6)


def test_readme_bundle_commands(quick_run: tuple[Recipe, Path]) -> None:
    """The quick start's two onnxruntime commands, as the README writes them."""
    recipe, run = quick_run
    data = Path(recipe.data.root)
    images = [str(data / "test" / "images" / f"synth_{n}_00000.jpg") for n in ("8", "00")]
    predict = subprocess.run(
        [sys.executable, "-m", "classifier_training.deploy.predict", "--model", str(run / "export"),
         "--min-confidence", "auto", *images],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert predict.returncode == 0, predict.stderr
    answers = json.loads(predict.stdout)
    assert [a["abstained"] for a in answers] == [a["label"] == "unknown" for a in answers]
    errors = run.parent / "errors"
    evaluate = subprocess.run(
        [sys.executable, "-m", "classifier_training.deploy.evaluate",
         "--model", str(run / "export" / "model.int8.onnx"), "--data", str(data),
         "--split", "test", "--errors-dir", str(errors)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr
    summary = json.loads((run / "eval-test" / "summary.json").read_text())
    wrong = summary["total"] - summary["top1_correct"]
    assert len(list(errors.rglob("*.jpg"))) == wrong
