"""The README says true things: its map of the code and its pretrained-weights recipe."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from classifier_training.model import create_model
from classifier_training.recipe import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "classifier_training"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def development_map() -> dict[str, str]:
    """``{path: "torch" | "no torch"}`` from the table in the README's Development section."""
    section = README.split("\n## Development\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| .+ \| (torch|no torch) \|$", section, re.M)
    return dict(rows)


def test_the_map_has_one_row_per_module() -> None:
    modules = {
        p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
    }
    listed = development_map()
    assert modules | {"src/train.py", "src/export.py"} == set(listed), (
        "add a row for each new module to the README's Development table, remove gone ones"
    )


def test_the_no_torch_rows_do_not_import_torch() -> None:
    no_torch = [p for p, kind in development_map().items() if kind == "no torch"]
    assert "deploy/onnx_classifier.py" in no_torch and "io.py" in no_torch
    modules = ["classifier_training." + p.removesuffix(".py").replace("/", ".") for p in no_torch]
    code = f"import sys, {', '.join(modules)}; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False", "a module the README calls 'no torch' imports torch"


def test_pretrained_weights_snippet_writes_the_file_training_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (snippet,) = re.findall(r'^python -c "(import os, timm.*)"$', README, re.M)
    (saved,) = re.findall(r"st\.save_file\(m\.state_dict\(\), '([^']+)'\)", snippet)
    assert f"--model.pretrained_file {saved}" in README  # the training command reads it
    # Run it as written except the download: an untrained resnet18 has the same tensors.
    offline = snippet.replace("'resnet18.tv_in1k', pretrained=True", "'resnet18', pretrained=False")
    assert offline != snippet
    subprocess.run([sys.executable, "-c", offline], cwd=tmp_path, check=True, timeout=300)
    monkeypatch.chdir(tmp_path)
    cfg = ModelConfig(arch="resnet18", pretrained=True, pretrained_file=saved)
    assert create_model(cfg, num_classes=42).fc.out_features == 42  # loads, head replaced


@pytest.mark.slow
def test_synthetic_data_command_runs_as_written(tmp_path: Path) -> None:
    section = README.split("\n## Synthetic data\n", 1)[1]
    (command,) = re.findall(
        r"```bash\n(python -m classifier_training\.data\.synthetic .+)\n```", section
    )
    args = command.split()
    result = subprocess.run(
        [sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "data/synthetic-jerseys/dataset.json").read_text())
    assert info["long_tail"] is True and info["train_per_class"] == 60 and len(info["labels"]) == 42
