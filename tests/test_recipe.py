"""Recipes: defaults < YAML < CLI, strict validation with file/line/key, round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from classifier_training.recipe import (
    RECIPE_DIR,
    Recipe,
    load_recipe,
    parse_recipe,
    save_recipe,
)
from classifier_training.recipe_yaml import RecipeError, validate_yaml


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
        validate_yaml(path, Recipe)


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


# ---------------------------------------------------------------------------------------------
# issue 10: values refused when the recipe is parsed; issue 11: YAML as simple-parsing's default


def test_recipe_file_must_be_yaml_and_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = tmp_path / "r.pkl"
    payload.write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    )  # a pickle that runs a shell command when loaded
    for name in ("r.pkl", "r.json", "r.yaml.bak"):
        with pytest.raises(RecipeError, match=rf"{name}: a recipe must be a YAML file"):
            parse_recipe(["--recipe", str(tmp_path / name)])
    assert not marker.exists()
    assert load_recipe(write(tmp_path, "name: short\n", "r.yml")).name == "short"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train.monitor", "val/acc_top"], r"train\.monitor: 'val/acc_top' is not a metric .*"
         r"did you mean val/acc_top5 or val/acc_top1"),
        (["--train.monitor", "val_ema/loss", "--ema.enabled", "false"],
         r"train\.monitor: 'val_ema/loss' .*\(val_ema/\* needs ema\.enabled true\)"),
        (["--model.arch", "resnt18"], r"model\.arch: 'resnt18' is not a timm model; close names: "
         r"resnet18,"),
        (["--model.arch", "resnet18.tv_in"], r"model\.arch: 'resnet18\.tv_in': timm has no "
         r"pretrained tag 'tv_in' for resnet18; close names: resnet18\.tv_in1k"),
        (["--ema.decay", "1"], r"ema\.decay must be in \(0, 1\) \(got 1\.0\)"),
        (["--ema.decay", "0"], r"ema\.decay must be in \(0, 1\)"),
        (["--ema.decay", "-0.5"], r"ema\.decay must be in \(0, 1\)"),
        (["--train.checkpoint_every_updates", "-1"], r"train\.checkpoint_every_updates must be "
         r">= 0"),
    ],
)  # fmt: skip
def test_parse_time_refusals_name_the_field(flags: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=rf"^invalid recipe: {message}"):
        parse_recipe(flags)


def test_valid_monitors_and_archs_pass() -> None:
    for monitor in ("val/f1_macro", "train/loss", "val_raw/acc_top5", "val/acc_class/23"):
        assert parse_recipe(["--train.monitor", monitor]).train.monitor == monitor
    for arch in ("test_resnet", "resnet50.tv2_in1k", "hf-hub:timm/resnet18.a1_in1k"):
        assert parse_recipe(["--model.arch", arch]).model.arch == arch


def test_monitor_keys_are_the_evaluation_metric_names() -> None:
    import torch

    from classifier_training.metrics import classification_metrics
    from classifier_training.recipe_checks import EVAL_METRICS, monitor_keys

    out = classification_metrics(torch.eye(3), torch.arange(3), ["a", "b", "c"], "val")
    produced = {k for k in out if "/acc_class/" not in k} | {"val/loss"}
    assert produced == {f"val/{m}" for m in EVAL_METRICS}
    keys = monitor_keys(Recipe())
    assert produced <= set(keys) and "val_ema/acc_top1" in keys and "train/loss" in keys


def test_yaml_values_reach_their_field_types(tmp_path: Path) -> None:
    """YAML's 3e-4 (a string to PyYAML) and lists become float and tuple through simple-parsing's
    decoding of the default object, with no conversion after parsing."""
    path = write(
        tmp_path,
        "optim:\n  lr: 3e-4\n  betas: [0.8, 0.95]\naugment:\n  hflip_p: 5e-1\n"
        "ema:\n  decay: 0.99\nschedule:\n  warmup_epochs: 2\n",
    )
    recipe = load_recipe(path)
    assert recipe.optim.lr == 3e-4 and type(recipe.optim.lr) is float
    assert recipe.optim.betas == (0.8, 0.95) and recipe.augment.hflip_p == 0.5
    assert type(recipe.schedule.warmup_epochs) is float and recipe.ema.decay == 0.99


def test_later_recipe_files_override_single_fields(tmp_path: Path) -> None:
    base = write(tmp_path, "name: base\noptim:\n  lr: 0.1\n  weight_decay: 0.5\n", "a.yaml")
    over = write(tmp_path, "optim:\n  lr: 0.2\nlogging:\n  tags: [x]\n", "b.yaml")
    recipe = parse_recipe(["--recipe", str(base), str(over), "--logging.tags", "y", "z"])
    assert recipe.name == "base" and recipe.optim.lr == 0.2 and recipe.optim.weight_decay == 0.5
    assert recipe.logging.tags == ["y", "z"]
    again = parse_recipe([f"--recipe={over}", "--recipe", str(base)])
    assert again.optim.lr == 0.1


def test_abbreviated_flags_are_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from classifier_training.recipe import parse_recipe; "
         "parse_recipe(['--rec', 'recipes/quickstart.yaml'])"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "unrecognized arguments: --rec" in proc.stderr
