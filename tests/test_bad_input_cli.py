"""Bad input through the real CLI: refused before anything is written, or skipped with a count.

Every refusal asserts the exit status, the first line of the message (file and line, or the
recipe field) and that the run folder holds nothing from the failed start (or, for an existing
run, that nothing in it changed). They all fire before the model is created. One tiny training
run shows what is skipped and counted instead. Each start imports the training stack (torch,
timm, accelerate: several seconds on a small machine), hence ``slow``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_imagefolder_dataset, write_jsonl_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("0", "00", "1", "10", "2")


def recipe_file(tmp_path: Path, root: Path, name: str = "r.yaml", **extra: str) -> Path:
    """A tiny CPU recipe for ``root`` writing to ``tmp_path/run``."""
    lines = [
        "name: bad-input",
        "data:",
        f"  root: {json.dumps(str(root))}",
        "  image_size: 32",
        "  batch_size: 4",
        "  num_workers: 0",
        "model:",
        "  arch: test_resnet",
        "  pretrained: false",
        "train:",
        "  epochs: 1",
        f"  output_dir: {json.dumps(str(tmp_path / 'run'))}",
        "  mixed_precision: 'no'",
        "  eval_test: false",
        "logging:",
        "  progress: 'off'",
        "hooks:",
        "  enabled: [dataset_stats]",
    ]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n" + "".join(f"{v}\n" for v in extra.values()))
    return path


def run_cli(*args: str, launcher: str = "python") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    prefix = (
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
        if launcher == "accelerate"
        else [sys.executable]
    )
    return subprocess.run(
        [*prefix, str(REPO / "src" / "train.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def error_line(proc: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The first line of the error message (logging warnings may come before it)."""
    assert proc.returncode == status, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines, proc.stderr
    return lines[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-1 and mtime (what 'nothing changed' compares)."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        + f"@{p.stat().st_mtime_ns}"
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl_dataset(tmp_path / "data", CLASSES, {"train": 2, "valid": 1, "test": 1})


def test_truncated_image_stops_the_run_naming_its_annotation_line(
    tmp_path: Path, data: Path
) -> None:
    truncate(data / "train" / "c01_001.jpg")
    truncate(data / "test" / "c02_000.jpg")
    proc = run_cli("--recipe", str(recipe_file(tmp_path, data)), launcher="accelerate")
    first = error_line(proc, status=1)  # accelerate launch exits 1 when the script fails...
    assert "returned non-zero exit status 2" in proc.stderr  # ...which exited 2: bad input
    assert first.startswith(f"error: {data / 'train' / 'annotations.jsonl'}:4: cannot decode image")
    assert first.endswith("c01_001.jpg")
    assert f"{data / 'test' / 'annotations.jsonl'}:3: cannot decode image" in proc.stderr
    assert "2 row(s) (2 image file(s)) above fail" in proc.stderr
    assert "data.skip_bad_images true" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_bad_data_leaves_an_existing_run_untouched(tmp_path: Path, data: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-001").mkdir(parents=True)
    (run / "checkpoints" / "ledger.json").write_text('{"monitor": "val/acc_top1"}\n')
    (run / "checkpoints" / "epoch-001" / "model.safetensors").write_bytes(b"weights")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run / "recipe.yaml").write_text("name: earlier\n")
    before = tree(run)
    (data / "valid" / "c00_000.jpg").write_bytes(b"not an image")
    for flags in (["--train.overwrite", "true"], ["--train.resume", "auto"]):
        proc = run_cli("--recipe", str(recipe_file(tmp_path, data)), *flags)
        assert error_line(proc).startswith(
            f"error: {data / 'valid' / 'annotations.jsonl'}:1: cannot decode image"
        )
        assert tree(run) == before


def test_single_class_train_split(tmp_path: Path) -> None:
    data = write_imagefolder_dataset(tmp_path / "data", ["7"], {"train": 3, "valid": 1})
    proc = run_cli("--recipe", str(recipe_file(tmp_path, data)), "--data.test_split", "")
    assert error_line(proc) == (
        f"error: {data / 'train'}: the train split has a single class ('7'); a classifier "
        "needs at least two (check the labels, or data.root / data.train_split)"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "first_line"),
    [
        (["--train.monitor", "val/acc"],
         "error: invalid recipe: train.monitor: 'val/acc' is not a metric of this run (did you "
         "mean val/acc_top5 or val/acc_top1"),
        (["--model.arch", "resnet-18"],
         "error: invalid recipe: model.arch: 'resnet-18' is not a timm model; close names: "
         "resnet18"),
        (["--ema.decay", "1.5"], "error: invalid recipe: ema.decay must be in (0, 1) (got 1.5)"),
        (["--train.checkpoint_every_updates", "-5"],
         "error: invalid recipe: train.checkpoint_every_updates must be >= 0 (0: only at epoch "
         "ends) (got -5)"),
    ],
)  # fmt: skip
def test_recipe_values_refused_at_parse_time(
    tmp_path: Path, data: Path, flags: list[str], first_line: str
) -> None:
    proc = run_cli("--recipe", str(recipe_file(tmp_path, data)), *flags)
    assert error_line(proc).startswith(first_line)
    assert not (tmp_path / "run").exists()


def test_recipe_values_in_the_yaml_are_refused_too(tmp_path: Path, data: Path) -> None:
    path = recipe_file(tmp_path, data, ema="ema:\n  decay: 0")
    proc = run_cli("--recipe", str(path))
    assert error_line(proc) == "error: invalid recipe: ema.decay must be in (0, 1) (got 0.0)"
    assert not (tmp_path / "run").exists()


def test_per_class_monitor_of_an_unknown_class(tmp_path: Path, data: Path) -> None:
    proc = run_cli(
        "--recipe", str(recipe_file(tmp_path, data)), "--train.monitor", "val/acc_class/99"
    )
    assert error_line(proc).startswith(
        "error: train.monitor: 'val/acc_class/99' names '99', which is not a class with "
        "validation images"
    )
    assert not (tmp_path / "run").exists()


def test_recipe_file_that_is_not_yaml(tmp_path: Path, data: Path) -> None:
    pickled = tmp_path / "r.pkl"
    shutil.copy(recipe_file(tmp_path, data), pickled)
    proc = run_cli("--recipe", str(pickled))
    assert error_line(proc) == (
        f"error: {pickled}: a recipe must be a YAML file ending in .yaml or .yml (see recipes/ "
        "for examples)"
    )
    assert not (tmp_path / "run").exists()


def test_skipped_and_fixed_inputs_are_counted_in_a_real_run(tmp_path: Path) -> None:
    """ImageFolder data with a truncated image (skipped), macOS litter, a label folder with a
    trailing space, and 9 train images at batch 4 (a one-image last batch, dropped): trains."""
    data = write_imagefolder_dataset(
        tmp_path / "data", ["a", "b"], {"train": {"a": 5, "b": 5}, "valid": 2}
    )
    truncate(data / "train" / "b" / "004.jpg")
    for folder in (data / "train" / "a", data / "valid" / "b"):
        (folder / f"._{next(folder.iterdir()).name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (data / "valid" / "a").rename(data / "valid" / "a ")
    proc = run_cli(
        "--recipe", str(recipe_file(tmp_path, data)), "--data.test_split", "",
        "--data.skip_bad_images", "true", "--hooks.enabled", "dataset_stats",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train: skipped 1 row(s) whose image does not decode" in proc.stderr
    assert "train: skipped 1 hidden image file(s)" in proc.stderr
    assert "valid: stripped surrounding whitespace from 2 label(s)" in proc.stderr
    assert "1 sample per epoch left out" in proc.stderr
    run = tmp_path / "run"
    stats = json.loads((run / "dataset_stats.json").read_text())
    assert stats["bad_images_count"] == 1 and stats["bad_images"][0]["path"].endswith("004.jpg")
    assert stats["skipped_hidden_files"] == {"train": 1, "valid": 1}
    assert stats["stripped_label_rows"] == {"train": 0, "valid": 2}
    assert stats["train_samples_left_out_per_epoch"] == 1
    assert stats["totals"] == {"train": 9, "valid": 4}
    mapping = json.loads((run / "labels_mapping.json").read_text())
    assert mapping["class_to_idx"] == {"a": 0, "b": 1}
    # The monitor vocabulary known at parse time is what an epoch logs.
    from classifier_training.recipe import Recipe
    from classifier_training.recipe_checks import monitor_keys

    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    metric_keys = {  # time/* are measurements, never a model-selection metric
        k for k in logged if "/" in k and "/acc_class/" not in k and not k.startswith("time/")
    }
    assert metric_keys == set(monitor_keys(Recipe()))
    with Image.open(data / "train" / "a" / "000.jpg") as im:
        assert im.size == (40, 32)  # the data itself is left as it was
