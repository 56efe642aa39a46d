"""Model creation: local pretrained files, offline failure in seconds, opt-in random init."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from classifier_training.model import PretrainedWeightsError, create_model
from classifier_training.recipe import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def test_scratch_model_has_the_class_count() -> None:
    model = create_model(ModelConfig(arch="test_resnet", pretrained=False), num_classes=7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_local_pretrained_file_replaces_the_head(tmp_path: Path) -> None:
    source = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    cfg = ModelConfig(arch="test_resnet", pretrained=True, pretrained_file=str(path))
    model = create_model(cfg, num_classes=5)
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    # the backbone comes from the file; the head is new
    key = next(k for k in source.state_dict() if k.endswith("conv1.weight"))
    assert torch.equal(model.state_dict()[key], source.state_dict()[key])


def test_missing_pretrained_file_names_it(tmp_path: Path) -> None:
    cfg = ModelConfig(arch="test_resnet", pretrained_file=str(tmp_path / "nope.safetensors"))
    with pytest.raises(PretrainedWeightsError, match=r"nope\.safetensors does not exist"):
        create_model(cfg, num_classes=3)


def test_offline_hub_fails_fast_with_instructions() -> None:
    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported (it reads it once)
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as info:
        create_model(ModelConfig(arch="resnet18.tv_in1k", pretrained=True), num_classes=3)
    assert time.perf_counter() - start < 30  # not timm's ~47 s of retries
    message = str(info.value)
    assert "--model.pretrained_file" in message and "allow_random_init" in message
    assert "resnet18.tv_in1k" in message


def test_offline_hub_with_allow_random_init() -> None:
    cfg = ModelConfig(arch="test_resnet", pretrained=True, allow_random_init=True)
    assert create_model(cfg, num_classes=3).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_train_cli_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data:\n  fromat: jsonl\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "--recipe", str(recipe)],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "bad.yaml:2: data.fromat: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
