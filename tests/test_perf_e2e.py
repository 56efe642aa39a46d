"""End-to-end: the cache changes no number, timings are logged, compile, require_gpu, gpu_check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import train as train_script
from classifier_training.checkpoint import EMA_FILE
from classifier_training.timing import PHASES
from test_train_e2e import tiny_recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]
ROOT = Path(__file__).resolve().parents[1]
DRAWING_HOOKS = ("confusion_matrix", "history", "sample_predictions", "sampler_distribution")


def untimed(path: Path) -> list[dict[str, float]]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and "per_s" not in k}
            for r in rows]  # fmt: skip


def test_cache_keeps_every_number_and_timings_are_logged(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Decoding every epoch and gathering from the cache (JPEG draws on, p 0.595, native size
    = input size) train the same weights; each epoch's line has its ``time/*`` keys."""
    runs = {}
    for mode in ("none", "disk"):
        out = tmp_path / mode
        recipe = tiny_recipe(tiny_data, out, *DRAWING_HOOKS, "--data.cache", mode,
                             "--data.cache_dir", str(tmp_path / "cache"), "--data.sampler",
                             "auto")  # fmt: skip
        assert recipe.augment.preset == "jersey"
        train_script.train(recipe)
        runs[mode] = out
        AcceleratorState._reset_state(True)
    assert untimed(runs["none"] / "metrics.jsonl") == untimed(runs["disk"] / "metrics.jsonl")
    assert list((tmp_path / "cache").glob("train-train-32px-*.npy"))
    rows = [json.loads(x) for x in (runs["disk"] / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert {f"time/{p}_s" for p in (*PHASES, "epoch", "blocking")} <= set(row)
        assert row["time/epoch_s"] >= row["time/train_s"] + row["time/eval_s"]
        assert row["train/skipped_steps"] == 0.0
    out = capsys.readouterr().out
    assert "decoded-image cache disk" in out and "decoded-image cache off" in out
    assert "epoch 2 time " in out and "timing summary: 2 epochs" in out
    assert "hook work in the background" in out
    for name in ("confusion_matrix.png", "sample_predictions.png", "sampler_distribution.json"):
        assert (runs["disk"] / "epochs" / "002" / name).is_file(), name
    assert (runs["disk"] / "history" / "loss.png").is_file()


def test_compile_on_cpu(tiny_data: Path, tmp_path: Path) -> None:
    """``train.compile``: the step runs compiled; checkpoints keep the plain module's keys."""
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_data, out, "--train.epochs", "1", "--train.compile", "true",
                         "--train.max_batches_per_epoch", "3")  # fmt: skip
    result = train_script.train(recipe)
    assert result.state.updates == 3
    ckpt = result.best_checkpoint
    assert ckpt is not None
    keys = list(load_file(str(ckpt / EMA_FILE)))
    assert keys and not any("_orig_mod" in k for k in keys)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train/loss"] == pytest.approx(row["train/loss"])  # finite, not NaN


def test_require_gpu_stops_on_a_cpu_machine(tiny_data: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "src/train.py", "--data.root", str(tiny_data), "--model.arch",
           "test_resnet", "--model.pretrained", "false", "--train.output_dir",
           str(tmp_path / "run"), "--train.require_gpu", "true"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: train.require_gpu is on but CUDA is unavailable" in proc.stderr
    assert "--train.require_gpu false" in proc.stderr


def test_gpu_check_runs_on_the_cpu_at_tiny_sizes(tmp_path: Path) -> None:
    """``bench/gpu_check.sh`` as the README quotes it, at sizes a CPU finishes quickly."""
    cmd = ["bash", "bench/gpu_check.sh", "--out", str(tmp_path), "--size", "32",
           "--per-class", "2", "--eval-per-class", "1", "--epochs", "1", "--batch", "8",
           "--workers", "0", "--arch", "test_resnet", "--ceiling-steps", "2", "--",
           "--hooks.background", "process"]  # fmt: skip
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = proc.stdout[proc.stdout.index("=== gpu_check ===") :]
    assert "runtime: device cpu" in report
    assert "bare-step ceiling" in report and "ratio" in report
    assert "last epoch seconds:   data" in report and "hooks" in report
    assert "GradScaler skipped steps: 0; losses finite: True" in report
    assert (tmp_path / "run" / "export" / "model.onnx").is_file()  # every hook ran, export too
