"""fp16 / INT8 variants of the exported model and the bundle assessment (deploy.variants/assess)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from classifier_training.data.index import index_dataset
from classifier_training.data.labels import labels_mapping
from classifier_training.data.preprocess import eval_image, open_rgb, to_nchw_float
from classifier_training.deploy import variants as V
from classifier_training.deploy.assess import assess
from classifier_training.deploy.onnx_export import export_onnx
from classifier_training.model import create_model
from classifier_training.recipe import DataConfig, ExportConfig, ModelConfig, Recipe
from conftest import write_jsonl_dataset

CLASSES = ("0", "00", "1", "10", "2")
SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_onnx(path: Path, seed: int = 0, metadata: dict[str, str] | None = None) -> Path:
    torch.manual_seed(seed)
    model = create_model(
        ModelConfig(arch="test_resnet", pretrained=False), len(CLASSES), pretrained=False
    )
    export_onnx(model.eval(), path, SIZE, 17, metadata or {"arch": "test_resnet"})
    return path


def images(root: Path, split: str = "valid") -> np.ndarray:
    paths = sorted((root / split).glob("*.jpg"))
    return to_nchw_float(np.stack([eval_image(open_rgb(p), SIZE) for p in paths]), MEAN, STD)


def logits_of(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(s.run(None, {"input": x})[0])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("variants") / "data"
    return write_jsonl_dataset(root, CLASSES, {"train": 6, "valid": 3, "test": 3})


def test_parse_precisions() -> None:
    assert V.parse_precisions("fp32") == ["fp32"]
    assert V.parse_precisions("int8") == ["fp32", "int8"]  # the contract file is always there
    assert V.parse_precisions(" INT8 , fp16,fp32") == ["fp32", "fp16", "int8"]
    with pytest.raises(V.VariantError, match=r"'bf16': unknown.*fp32, fp16, int8"):
        V.parse_precisions("fp32,bf16")


def test_fp16_keeps_float32_io_and_metadata(tmp_path: Path, data: Path) -> None:
    src = tiny_onnx(tmp_path / "model.onnx", metadata={"arch": "test_resnet", "k": "v"})
    dst = tmp_path / "model.fp16.onnx"
    V.convert_fp16(src, dst)
    proto = onnx.load(str(dst))
    onnx.checker.check_model(proto)
    f32 = onnx.TensorProto.FLOAT
    assert proto.graph.input[0].type.tensor_type.elem_type == f32
    assert proto.graph.output[0].type.tensor_type.elem_type == f32
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    x = images(data)
    a, b = logits_of(src, x), logits_of(dst, x)
    assert b.dtype == np.float32 and np.abs(a - b).max() < 0.05
    assert dst.stat().st_size < 0.7 * src.stat().st_size
    V.set_metadata(dst, {"precision": "fp16"})
    props = {p.key: p.value for p in onnx.load(str(dst)).metadata_props}
    assert props == {"precision": "fp16"}


def test_int8_is_calibrated_on_the_given_images(tmp_path: Path, data: Path) -> None:
    src = tiny_onnx(tmp_path / "model.onnx")
    dst = tmp_path / "model.int8.onnx"
    train = images(data, "train")
    n = V.quantize_int8(src, dst, (train[i : i + 8] for i in range(0, len(train), 8)))
    assert n == len(train) == 30
    ops = {node.op_type for node in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = images(data)
    assert logits_of(dst, x).shape == (len(x), len(CLASSES))
    assert not list(tmp_path.glob(".int8-*")), "the work folder is removed"
    with pytest.raises(V.VariantError, match="needs training images"):
        V.quantize_int8(src, tmp_path / "none.onnx", iter([]))


def test_variant_report_and_rejection_reason() -> None:
    ref = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]], np.float32)
    worse = ref.copy()
    worse[1] = [2.5, 0.0]  # image 1 flips from right to wrong
    y = np.array([0, 1, 0, 0])  # fp32 gets 3 of 4
    splits = {"valid": slice(0, 2), "test": slice(2, 4)}
    r = V.variant_report(worse, ref, y, splits, max_accuracy_drop=0.2)
    assert r["agreement"] == 0.75 and r["accuracy"] == 0.5
    assert r["accuracy_drop"] == pytest.approx(0.25) and not r["passed"]
    assert r["accuracy_by_split"] == {"valid": 0.5, "test": 0.5}
    assert r["max_abs_logit_diff"] == pytest.approx(2.5)
    text = V.rejection_reason("int8", r)
    assert "int8 not written" in text and "0.2500 below fp32" in text and "allowed 0.2000" in text
    assert V.variant_report(ref, ref, y, splits, 0.0)["passed"]


def test_latency_and_machine(tmp_path: Path) -> None:
    lat = V.latency_ms(tiny_onnx(tmp_path / "m.onnx"), SIZE, {1: 2, 4: 2})
    assert set(lat) == {"1", "4"} and all(v > 0 for v in lat.values())
    assert V.machine()["provider"] == "CPUExecutionProvider"


def test_stratified_takes_classes_in_turn() -> None:
    assert V.stratified([0, 0, 0, 1, 2, 2], 4) == [0, 3, 4, 1]
    assert V.stratified([1, 1], 5) == [0, 1]


def bundle_with_model(tmp_path: Path, data: Path) -> tuple[Path, Recipe, dict[str, Any]]:
    """A bundle folder with an untrained model.onnx, and a copy of ``data`` whose valid/test
    labels are that model's own predictions (so fp32 is right on every image)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    onnx_path = tiny_onnx(bundle / "model.onnx")
    root = tmp_path / "data"
    shutil.copytree(data, root)
    class_to_idx = index_dataset(root).class_to_idx
    for split in ("valid", "test"):
        rows = [json.loads(line) for line in (root / split / "annotations.jsonl").open()]
        x = to_nchw_float(
            np.stack([eval_image(open_rgb(root / split / r["image"]), SIZE) for r in rows]),
            MEAN,
            STD,
        )
        for r, k in zip(rows, logits_of(onnx_path, x).argmax(1), strict=True):
            r["suffix"] = CLASSES[int(k)]
        (root / split / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Recipe(data=DataConfig(root=str(root), image_size=SIZE))
    return bundle, recipe, labels_mapping(class_to_idx, SIZE)


def negated(src: Path, dst: Path) -> None:
    """``src`` with its logits negated: top-1 becomes the least likely class."""
    proto = onnx.load(str(src))
    out = proto.graph.output[0]
    inner = out.name + "_raw"
    for node in proto.graph.node:
        node.output[:] = [inner if o == out.name else o for o in node.output]
    proto.graph.node.append(onnx.helper.make_node("Neg", [inner], [out.name]))
    onnx.save(proto, str(dst))


def test_assess_writes_verified_variants(tmp_path: Path, data: Path) -> None:
    bundle, recipe, mapping = bundle_with_model(tmp_path, data)
    cfg = ExportConfig(precision="fp32,fp16,int8", max_accuracy_drop=1.0, target_precision=0.5)
    result = assess(bundle, recipe, cfg, Path(recipe.data.root), mapping, {"arch": "test_resnet"})
    assert set(result.variants) == {"fp32", "fp16", "int8"} and not result.rejected
    assert result.splits["test"]["images"] == 15 and result.splits["valid"]["images"] == 15
    assert result.splits["test"]["accuracy"] == 1.0
    assert result.machine["int8_calibration_images"] == 30
    cal = result.calibration
    assert cal is not None and cal.eval_split == "test" and cal.n_fit == 15
    for name, v in result.variants.items():
        path = bundle / v["file"]
        assert path.stat().st_size == v["size_bytes"]
        assert set(v["latency_ms"]) == {"1", "32"}
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert props["precision"] == name and props["arch"] == "test_resnet"
        assert json.loads(props["calibration"])["temperature"] == pytest.approx(cal.temperature)
    assert result.variants["fp32"]["agreement"] == 1.0
    assert result.variants["fp16"]["agreement"] >= 0.9


def test_assess_rejects_a_variant_beyond_the_tolerance(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, recipe, mapping = bundle_with_model(tmp_path, data)

    def broken_quantize(src: Path, dst: Path, batches: Any) -> int:
        negated(src, dst)
        return 1

    monkeypatch.setattr(V, "quantize_int8", broken_quantize)
    cfg = ExportConfig(precision="fp32,int8", max_accuracy_drop=0.05)
    result = assess(bundle, recipe, cfg, Path(recipe.data.root), mapping, {})
    assert result.splits["test"]["accuracy"] == 1.0  # the labels are fp32's predictions
    assert "int8" in result.rejected and "int8" not in result.variants
    assert (
        "int8 not written" in result.rejected["int8"]
        and "allowed 0.0500" in result.rejected["int8"]
    )
    assert not (bundle / "model.int8.onnx").exists()
    assert (bundle / "model.onnx").is_file()


def test_split_reader_reads_each_folder_once_and_reuses_the_runs_own_splits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from classifier_training.deploy import assess as A

    data = write_jsonl_dataset(tmp_path / "data", ("0", "1"), {"train": 2, "valid": 2, "test": 2})
    class_to_idx = {"0": 0, "1": 1}
    real = A.index_split
    read_from_disk: list[str] = []

    def counting(root: Path, split: str, *args: Any) -> Any:
        read_from_disk.append(split)
        return real(root, split, *args)

    monkeypatch.setattr(A, "index_split", counting)
    known = real(data, "test", class_to_idx)  # e.g. the training run's index, at fit end
    read = A.split_reader(class_to_idx, "auto", [known])
    valid = read(data, "valid")
    assert read(data, "valid") is valid and [s.target for s in valid.samples] == [0, 0, 1, 1]
    assert read(data, "test") is known
    assert read_from_disk == ["valid"]
