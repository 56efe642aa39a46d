"""Recipes: defaults < YAML < CLI, strict validation with file/line/key, round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from classifier_training.recipe import (
    RECIPE_DIR,
    Recipe,
    RecipeError,
    load_recipe,
    parse_recipe,
    save_recipe,
    validate_yaml,
)


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_recipe() -> None:
    recipe = parse_recipe([])
    assert recipe == Recipe()
    assert recipe.run_dir == Path("runs/run")


def test_precedence_defaults_yaml_cli(tmp_path: Path) -> None:
    path = write(
        tmp_path, "name: x\noptim:\n  lr: 3e-4\n  weight_decay: 0.5\ndata:\n  batch_size: 8\n"
    )
    recipe = load_recipe(path, ["--optim.lr", "1e-2", "--data.num_workers", "0"])
    assert recipe.optim.lr == pytest.approx(1e-2)  # CLI beats YAML
    assert recipe.optim.weight_decay == pytest.approx(0.5)  # YAML beats default
    assert isinstance(recipe.optim.lr, float)
    assert recipe.data.batch_size == 8
    assert recipe.data.num_workers == 0
    assert recipe.optim.betas == (0.9, 0.999)  # default kept
    assert recipe.run_dir == Path("runs/x")


def test_stable_cli_surface(tmp_path: Path) -> None:
    recipe = parse_recipe(
        [
            "--data.root",
            "/d",
            "--data.format",
            "imagefolder",
            "--data.image_size",
            "96",
            "--data.batch_size",
            "16",
            "--data.num_workers",
            "2",
            "--model.arch",
            "resnet50",
            "--model.pretrained",
            "false",
            "--model.pretrained_file",
            "w.safetensors",
            "--train.epochs",
            "3",
            "--train.seed",
            "7",
            "--train.output_dir",
            str(tmp_path),
            "--train.resume",
            "auto",
            "--optim.lr",
            "0.1",
            "--logging.wandb",
            "true",
        ]
    )
    assert recipe.data.root == "/d" and recipe.data.format == "imagefolder"
    assert recipe.data.image_size == 96 and recipe.data.batch_size == 16
    assert recipe.model.arch == "resnet50" and recipe.model.pretrained is False
    assert recipe.model.pretrained_file == "w.safetensors"
    assert recipe.train.epochs == 3 and recipe.train.seed == 7 and recipe.train.resume == "auto"
    assert recipe.run_dir == tmp_path and recipe.logging.wandb is True


def test_unknown_key_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\noptim:\n  lr: 0.1\n  lrr: 0.2\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:4: optim\.lrr: unknown key"):
        load_recipe(path)


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "optimiser:\n  lr: 0.1\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:1: optimiser: unknown key; valid keys"):
        validate_yaml(path)


def test_wrong_type_names_key(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  batch_size: lots\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:2: data\.batch_size: expected an integer"):
        load_recipe(path)
    path = write(tmp_path, "optim:\n  lr: fast\n")
    with pytest.raises(RecipeError, match=r"optim\.lr: expected a number"):
        load_recipe(path)
    path = write(tmp_path, "model:\n  pretrained: 3\n")
    with pytest.raises(RecipeError, match=r"model\.pretrained: expected true or false"):
        load_recipe(path)


def test_invalid_choice_lists_valid_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  format: csv\n")
    with pytest.raises(
        RecipeError,
        match=r"data\.format: 'csv' is not a valid choice; choose one "
        r"of 'auto', 'jsonl', 'imagefolder'",
    ):
        load_recipe(path)


def test_invalid_choice_on_cli_is_an_argparse_error() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from classifier_training.recipe import parse_recipe; "
            "parse_recipe(['--data.format', 'csv'])",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "invalid choice: 'csv'" in proc.stderr and "jsonl" in proc.stderr


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_semantic_checks() -> None:
    with pytest.raises(RecipeError, match=r"data\.batch_size must be >= 1"):
        parse_recipe(["--data.batch_size", "0"])
    with pytest.raises(RecipeError, match="sampler_weights"):
        parse_recipe(["--data.sampler", "manual"])


def test_round_trip_every_shipped_recipe(tmp_path: Path) -> None:
    shipped = sorted(RECIPE_DIR.glob("*.yaml"))
    assert {p.name for p in shipped} >= {
        "basketball_r18.yaml",
        "basketball_r50.yaml",
        "quickstart.yaml",
    }
    for path in shipped:
        recipe = load_recipe(path)
        out = tmp_path / f"resolved-{path.name}"
        save_recipe(recipe, out)
        assert load_recipe(out) == recipe, path.name


def test_reference_defaults_in_jersey_recipes() -> None:
    r18 = load_recipe(RECIPE_DIR / "basketball_r18.yaml")
    r50 = load_recipe(RECIPE_DIR / "basketball_r50.yaml")
    assert r18.model.arch == "resnet18.tv_in1k" and r50.model.arch == "resnet50.tv2_in1k"
    assert r18.optim.lr == pytest.approx(5e-4) and r50.optim.lr == pytest.approx(5e-5)
    for r in (r18, r50):
        assert r.optim.weight_decay == pytest.approx(1e-4)
        assert r.optim.clip_grad_norm == pytest.approx(1.0)
        assert r.schedule.warmup_epochs == 5 and r.schedule.min_lr_factor == pytest.approx(0.05)
        assert r.loss.label_smoothing == pytest.approx(0.1) and r.loss.class_weights == "inverse"
        assert r.train.early_stop_patience == 20
        assert r.train.early_stop_min_delta == pytest.approx(0.001)
        assert r.train.seed == 42 and r.data.batch_size == 64 and r.data.image_size == 224
        assert r.augment.preset == "jersey" and r.ema.select == "ema"


def test_help_lists_fields_with_docs() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from classifier_training.recipe import parse_recipe; parse_recipe(['--help'])",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0
    for flag in ("--optim.lr", "--data.root", "--train.resume", "--model.pretrained_file"):
        assert flag in proc.stdout
    assert "Peak learning rate" in proc.stdout


def test_sampler_weights_from_cli_and_yaml(tmp_path: Path) -> None:
    for text in ("8=0.5,00=3", '{"8": 0.5, "00": 3}'):
        recipe = parse_recipe(["--data.sampler", "manual", "--data.sampler_weights", text])
        assert recipe.data.sampler_weights == {"8": 0.5, "00": 3.0}
    path = write(tmp_path, "data:\n  sampler: manual\n  sampler_weights:\n    '8': 0.5\n")
    recipe = load_recipe(path)
    assert recipe.data.sampler_weights == {"8": 0.5}
    save_recipe(recipe, tmp_path / "resolved.yaml")
    assert load_recipe(tmp_path / "resolved.yaml") == recipe
    proc = subprocess.run(
        [sys.executable, "-c", "from classifier_training.recipe import parse_recipe; "
         "parse_recipe(['--data.sampler_weights', 'eight'])"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "expected LABEL=WEIGHT" in proc.stderr
