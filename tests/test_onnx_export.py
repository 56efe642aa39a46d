"""ONNX export: graph contract, verification against PyTorch, the run bundle and the CLI."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors import safe_open

from classifier_training.checkpoint import CheckpointManager, TrainerState
from classifier_training.data.index import index_dataset
from classifier_training.data.labels import (
    labels_mapping,
    read_labels_mapping,
    write_labels_mapping,
)
from classifier_training.data.preprocess import eval_image, open_rgb, to_nchw_float
from classifier_training.deploy import export_cli, onnx_export
from classifier_training.deploy.onnx_export import (
    ExportError,
    ExportVerificationError,
    export_onnx,
    export_run,
    verify_onnx,
)
from classifier_training.model import create_model
from classifier_training.recipe import DataConfig, ExportConfig, ModelConfig, Recipe, save_recipe
from conftest import write_jsonl_dataset

CLASSES = ("0", "00", "1", "10", "2")
SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BUNDLE = [
    "README.md",
    "export.json",
    "labels_mapping.json",
    "model.onnx",
    "model.safetensors",
    "reliability.png",
]
"""The files of an export bundle with the default export settings (fp32 only), sorted."""


def tiny_model(num_classes: int = len(CLASSES), seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="test_resnet", pretrained=False)
    return create_model(cfg, num_classes, pretrained=False).eval()


def real_batch(paths: Sequence[Path], size: int = SIZE) -> np.ndarray:
    """Images as the consumer prepares them: eval_image + to_nchw_float."""
    return to_nchw_float(np.stack([eval_image(open_rgb(p), size) for p in paths]), MEAN, STD)


def make_run(root: Path, *, ema: bool = True, per_split: Any = None) -> dict[str, Any]:
    """A finished-looking run: recipe.yaml, labels_mapping.json and one epoch checkpoint
    saved by CheckpointManager through a real (CPU) Accelerator.

    The raw and EMA weights differ, so a test can tell which ones were exported.
    """
    data = write_jsonl_dataset(
        root / "data",
        CLASSES,
        per_split or {"train": 3, "valid": 2, "test": 2},
        metadata=True,
    )
    run = root / "run"
    run.mkdir(parents=True)
    recipe = Recipe(
        name="tiny",
        data=DataConfig(root=str(data), image_size=SIZE),
        model=ModelConfig(arch="test_resnet", pretrained=False),
    )
    recipe.ema.enabled = ema
    save_recipe(recipe, run / "recipe.yaml")
    index = index_dataset(data)
    write_labels_mapping(run / "labels_mapping.json", labels_mapping(index.class_to_idx, SIZE))
    raw = tiny_model(seed=0)
    ema_model = copy.deepcopy(raw)
    with torch.no_grad():
        for p in ema_model.parameters():
            p.mul_(0.8).add_(0.01)
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(raw)
    metrics = {"val/acc_top1": 0.6, "val/acc_class/0": 1.0, "val/acc_class/1": 0.5}
    state = TrainerState(epoch=1, updates=4, metrics=metrics)
    CheckpointManager(run, "val/acc_top1", "max", 3).save(
        accelerator, "epoch-001", state, ema_model if ema else None, 0.6, durable=True
    )
    AcceleratorState._reset_state(True)
    return {
        "run": run,
        "data": data,
        "raw": accelerator.unwrap_model(prepared),
        "ema": ema_model,
        "index": index,
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# export_onnx / verify_onnx


def test_export_onnx_graph_contract_and_verification(tmp_path: Path) -> None:
    data = write_jsonl_dataset(tmp_path / "d", CLASSES, {"train": 1, "valid": 1})
    paths = sorted((data / "valid").glob("*.jpg"))[:4]
    model = tiny_model()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, SIZE, opset=17, metadata={"arch": "test_resnet", "x": "1"})

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    (inp,), (out,) = proto.graph.input, proto.graph.output

    def dims(v: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert inp.name == "input" and out.name == "logits"
    assert dims(inp) == ["batch", 3, SIZE, SIZE]  # only the batch axis is dynamic
    assert dims(out) == ["batch", len(CLASSES)]
    assert {p.key: p.value for p in proto.metadata_props} == {"arch": "test_resnet", "x": "1"}
    assert leftovers(tmp_path) == []

    x = real_batch(paths)
    report = verify_onnx(path, model, x, atol=1e-4)
    assert report["passed"] and report["n_images"] == 4
    assert report["batch_sizes"] == [1, 4]
    assert report["max_abs_diff"] < 1e-4
    assert report["top1_agree"] == "4/4"
    # And independently of verify_onnx: ORT at batch 1 and 4 against torch.
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got4 = sess.run(["logits"], {"input": x})[0]
    got1 = np.concatenate([sess.run(["logits"], {"input": x[i : i + 1]})[0] for i in range(4)])
    assert np.abs(got4 - expected).max() < 1e-4
    assert np.abs(got1 - expected).max() < 1e-4
    assert model.training is False and next(model.parameters()).dtype == torch.float32


def test_verify_single_image_still_checks_a_batch(tmp_path: Path) -> None:
    data = write_jsonl_dataset(tmp_path / "d", CLASSES, {"train": 1, "valid": 1})
    model = tiny_model()
    export_onnx(model, tmp_path / "m.onnx", SIZE)
    x = real_batch(sorted((data / "valid").glob("*.jpg"))[:1])
    assert verify_onnx(tmp_path / "m.onnx", model, x)["batch_sizes"] == [1, 2]


def test_verify_rejects_a_different_model(tmp_path: Path) -> None:
    data = write_jsonl_dataset(tmp_path / "d", CLASSES, {"train": 1, "valid": 1})
    export_onnx(tiny_model(seed=0), tmp_path / "m.onnx", SIZE)
    x = real_batch(sorted((data / "valid").glob("*.jpg")))
    with pytest.raises(ExportVerificationError, match=r"max \|logit diff\|"):
        verify_onnx(tmp_path / "m.onnx", tiny_model(seed=1), x, atol=1e-4)


def test_verify_rejects_a_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(ExportVerificationError, match=r"onnx\.checker rejected"):
        verify_onnx(bad, tiny_model(), np.zeros((2, 3, SIZE, SIZE), np.float32))


# ---------------------------------------------------------------------------------------------
# export_run


def onnx_logits(bundle: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["logits"], {"input": x})[0])


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.asarray(model.eval()(torch.from_numpy(x)).numpy())


def test_export_run_writes_a_verified_bundle_of_the_ema_weights(tmp_path: Path) -> None:
    fake = make_run(tmp_path)
    run: Path = fake["run"]
    out = export_run(run)
    assert out == run / "export"
    assert sorted(p.name for p in out.iterdir()) == BUNDLE
    shipped = read_labels_mapping(out / "labels_mapping.json")
    calibration = shipped.pop("calibration")  # the one addition to the run's mapping
    assert shipped == read_labels_mapping(run / "labels_mapping.json")
    assert calibration["temperature"] > 0 and calibration["target_precision"] == 0.99
    info = json.loads((out / "export.json").read_text())
    assert info["weights"] == "ema" and info["opset"] == 17 and info["image_size"] == SIZE
    assert info["checkpoint"]["epoch"] == 1
    assert info["checkpoint"]["monitor_value"] == pytest.approx(0.6)
    assert Path(info["checkpoint"]["path"]).name == "epoch-001"
    assert info["data"]["verify_split"] == "valid"
    ver = info["verification"]
    assert ver["passed"] and ver["n_images"] == 10 and ver["max_abs_diff"] <= 1e-4
    assert set(info["versions"]) >= {"torch", "timm", "onnx", "onnxruntime"}
    assert info["created_at"].endswith("+00:00")

    # The graph computes the EMA weights, not the raw ones.
    val = sorted((fake["data"] / "valid").glob("*.jpg"))
    x = real_batch(val)
    got = onnx_logits(out, x)
    assert np.abs(got - torch_logits(fake["ema"], x)).max() < 1e-4
    assert np.abs(got - torch_logits(fake["raw"], x)).max() > 1e-3

    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["idx_to_class"]) == {str(i): c for i, c in enumerate(CLASSES)}
    assert json.loads(meta["normalization"]) == {"mean": list(MEAN), "std": list(STD)}
    assert json.loads(meta["preprocessing"])["center_crop"] == SIZE
    assert meta["arch"] == "test_resnet" and meta["weights"] == "ema"
    assert meta["checkpoint"].endswith("epoch-001")

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"arch": "test_resnet", "num_classes": "5", "weights": "ema"}

    card = (out / "README.md").read_text()
    test_acc = info["evaluation"]["test"]["accuracy"]
    assert f"**test: top-1 {100 * test_acc:.2f}%** on 10 images" in card
    assert "selection split" in card and "| 2 | `1` |" in card and "onnxruntime" in card
    assert list(info["variants"]) == ["fp32"] and info["rejected_variants"] == {}
    assert leftovers(run) == []


def test_model_card_snippet_runs_verbatim(tmp_path: Path) -> None:
    fake = make_run(tmp_path)
    out = export_run(fake["run"])
    card = (out / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert 9 <= len(snippet.strip().splitlines()) <= 12
    image = sorted((fake["data"] / "valid").glob("*.jpg"))[3]
    shutil.copy(image, out / "image.jpg")
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=out, capture_output=True, text=True, check=True
    )
    expected = int(onnx_logits(out, real_batch([image])).argmax())
    assert result.stdout.strip() == CLASSES[expected]


def test_export_run_raw_weights_and_explicit_out(tmp_path: Path) -> None:
    fake = make_run(tmp_path)
    out = export_run(
        fake["run"], ExportConfig(checkpoint="last", weights="raw"), out=tmp_path / "bundle"
    )
    assert out == tmp_path / "bundle"
    x = real_batch(sorted((fake["data"] / "valid").glob("*.jpg")))
    assert np.abs(onnx_logits(out, x) - torch_logits(fake["raw"], x)).max() < 1e-4
    info = json.loads((out / "export.json").read_text())
    assert info["weights"] == "raw" and info["checkpoint"]["monitor_weights"] == "ema"
    # The checkpoint's per-class numbers belong to the EMA weights: not shown for raw.
    # the card's per-class numbers are measured on the exported (raw) weights themselves
    acc = info["evaluation"]["test"]["accuracy_by_class"]["1"]
    assert f"| 2 | `1` | {100 * acc:.2f}% |" in (out / "README.md").read_text()


def test_selected_is_raw_when_ema_is_off(tmp_path: Path) -> None:
    fake = make_run(tmp_path, ema=False)
    out = export_run(fake["run"])
    assert json.loads((out / "export.json").read_text())["weights"] == "raw"
    with pytest.raises(Exception, match="no EMA weights"):
        export_run(fake["run"], ExportConfig(weights="ema"), out=tmp_path / "other")


def test_verification_falls_back_to_the_test_split(tmp_path: Path) -> None:
    fake = make_run(tmp_path)
    shutil.rmtree(fake["data"] / "valid")
    out = export_run(fake["run"], ExportConfig(verify_images=3))
    info = json.loads((out / "export.json").read_text())
    assert info["data"]["verify_split"] == "test"
    assert info["verification"]["n_images"] == 3


def test_no_images_to_verify_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    fake = make_run(tmp_path)
    shutil.rmtree(fake["data"])
    with pytest.raises(ExportError, match="verification needs real images"):
        export_run(fake["run"])
    assert not (fake["run"] / "export").exists()
    assert leftovers(fake["run"]) == []


def test_data_root_override_finds_a_moved_dataset(tmp_path: Path) -> None:
    fake = make_run(tmp_path)
    moved = tmp_path / "moved"
    shutil.move(fake["data"], moved)
    out = export_run(fake["run"], data_root=str(moved))
    assert json.loads((out / "export.json").read_text())["data"]["root"] == str(moved)


def test_verify_images_must_be_positive(tmp_path: Path) -> None:
    fake = make_run(tmp_path)
    with pytest.raises(ExportError, match="verification is part of the export"):
        export_run(fake["run"], ExportConfig(verify_images=0))


def test_failed_export_keeps_the_previous_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = make_run(tmp_path)
    out = export_run(fake["run"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ExportVerificationError("simulated mismatch")

    monkeypatch.setattr(onnx_export, "verify_onnx", broken)
    with pytest.raises(ExportVerificationError, match="simulated"):
        export_run(fake["run"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(fake["run"]) == []


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not look like a run directory"):
        export_run(tmp_path)


# ---------------------------------------------------------------------------------------------
# python -m export


def test_cli_main_exports_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = make_run(tmp_path)
    code = export_cli.main(["--run", str(fake["run"]), "--verify-images", "4", "--atol", "1e-4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "top-1 agrees 4/4" in printed and "ema weights" in printed
    assert (fake["run"] / "export" / "model.onnx").is_file()


def test_cli_main_fails_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_cli.main(["--run", str(tmp_path / "nope")]) == 1
    assert "export failed:" in capsys.readouterr().err


def test_cli_options_are_the_export_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        export_cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in ("--run", "--out", "--data", "--checkpoint", "--weights", "--opset", "--atol"):
        assert name in out
    assert "--verify_images" in out and "--verify-images" in out
    assert "Validation images compared between onnxruntime and PyTorch." in out  # its docstring
    assert f"(default: {ExportConfig.opset})" in out
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(["--run", "r", "--weights", "best"])
    assert exit_info.value.code == 2
    assert "selected" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_export(tmp_path: Path) -> None:
    fake = make_run(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    src = Path(__file__).resolve().parents[1] / "src"
    result = subprocess.run(
        [sys.executable, "-m", "export", "--run", str(fake["run"]), "--checkpoint", "last"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (fake["run"] / "export" / "export.json").is_file()
