"""Every benchmark the README quotes runs to its summary line, at sizes a CPU finishes quickly.

The benchmarks are run by hand for their numbers; these runs only keep them working (an API they
call must not drift away from them unnoticed). Timings are printed, never asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "bench_augment.py": (["--size", "32", "--batch", "8", "--reps", "1"], "x"),
    "bench_image_check.py": (["--images", "40", "--side", "32", "--workers", "1"], "img/s"),
    "bench_loader.py": (
        ["--size", "32", "--images", "42", "--batch", "8", "--rounds", "1"],
        "cache/decode ratio",
    ),
    "bench_train_loop.py": (
        ["--arch", "test_resnet", "--size", "32", "--batch", "8", "--batches", "2"],
        "img/s",
    ),
    "bench_figures.py": (
        [
            "--history-epochs",
            "2",
            "--updates",
            "3",
            "--classes",
            "3",
            "--mistakes",
            "2",
            "--reps",
            "1",
        ],
        "sample grid",
    ),
    "bench_epoch_overhead.py": (
        ["--epochs", "2", "--batches", "1", "--size", "32", "--", "--model.arch", "test_resnet"],
        "blocking per epoch now",
    ),
}


def run_bench(script: str, args: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_bench_runs_to_its_summary(script: str, tmp_path: Path) -> None:
    args, summary = CASES[script]
    assert summary in run_bench(script, args, tmp_path)


@pytest.mark.slow
def test_bench_vs_timm_runs_both_sides(tmp_path: Path) -> None:
    args = ["--seeds", "1", "--epochs", "1", "--out", str(tmp_path)]
    out = run_bench("bench_vs_timm.py", args, tmp_path)
    assert "wall-time ratio generic / timm" in out and "targets:" in out
