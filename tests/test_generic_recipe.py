"""recipes/generic.yaml: what it sets, and the README's command for it on a tiny ImageFolder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from classifier_training.augment import BatchAugment, geometry, resolve
from classifier_training.recipe import RECIPE_DIR, load_recipe

ROOT = Path(__file__).resolve().parents[1]
README_COMMAND = "accelerate launch src/train.py --recipe recipes/generic.yaml"


def test_generic_recipe_is_imagenet_style_with_flips_unless_orientation_sensitive() -> None:
    recipe = load_recipe(RECIPE_DIR / "generic.yaml")
    params = resolve(recipe.augment)
    assert recipe.augment.preset == "imagenet" and recipe.augment.orientation_sensitive is False
    assert params.crop_p == 1.0 and params.crop_scale == (0.08, 1.0) and params.hflip_p == 0.5
    assert params.brightness == 0.2 and params.blur_p == 0.0 and params.degrade_p == 0.0
    assert recipe.data.format == "auto" and recipe.data.train_fit == "stretch"
    assert recipe.loss.label_smoothing == 0.1 and recipe.optim.name == "adamw"
    assert recipe.ema.enabled and recipe.train.early_stop_patience == 0
    digits = load_recipe(RECIPE_DIR / "generic.yaml", ["--augment.orientation_sensitive", "true"])
    assert resolve(digits.augment).hflip_p == 0.0
    augment = BatchAugment(resolve(digits.augment), digits.data.image_size)
    assert not any(isinstance(op, geometry.RandomHorizontalFlip) for op in augment.geometry)


def test_the_readme_names_generic_yaml_as_the_start_for_own_data() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Train on your own data", 1)[1].split("\n## ", 1)[0]
    assert "Start from **`recipes/generic.yaml`**" in section
    assert f"{README_COMMAND} --data.root /data/my-crops" in section


@pytest.mark.slow
def test_readme_command_trains_the_generic_recipe_on_an_imagefolder(
    tmp_path: Path, make_imagefolder_dataset: Callable[..., Path]
) -> None:
    data = make_imagefolder_dataset(tmp_path / "crops", classes=("cat", "dog", "fox"))
    out = tmp_path / "run"
    words = f"{README_COMMAND} --data.root /data/my-crops".split()
    words[words.index("/data/my-crops")] = str(data)
    tiny = [
        "--model.pretrained", "false", "--data.image_size", "32", "--data.batch_size", "4",
        "--data.num_workers", "0", "--train.epochs", "2", "--train.output_dir", str(out),
        "--hooks.enabled", "augment_preview", "export", "--export.verify_images", "4",
        "--logging.progress", "off",
    ]  # fmt: skip
    assert words[:2] == ["accelerate", "launch"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *words[2:], *tiny]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["name"] == "generic" and resolved["augment"]["preset"] == "imagenet"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1.0, 2.0]
    mapping = json.loads((out / "labels_mapping.json").read_text())
    assert mapping["class_to_idx"] == {"cat": 0, "dog": 1, "fox": 2}
    assert (out / "augment_preview.png").is_file() and (out / "test_metrics.json").is_file()
    assert json.loads((out / "export" / "export.json").read_text())["verification"]["passed"]
