"""The repeat command: reading run folders, the report, the launch loop, and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from classifier_training import repeat
from classifier_training.repeat import RepeatError, main, read_arm, read_run, train_command

ROOT = Path(__file__).resolve().parents[1]


def fake_run(
    folder: Path,
    seed: int,
    val: list[float],
    test: float,
    *,
    monitor: str = "val/acc_top1",
    wall: float | None = None,
) -> Path:
    """A finished run folder as train.py leaves it (only the files the report reads)."""
    folder.mkdir(parents=True)
    recipe = {"name": "r", "train": {"seed": seed, "monitor": monitor, "monitor_mode": "max"}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    rows = [
        {"epoch": float(e + 1), "val/acc_top1": v, "val/loss": 1.0 - v, "val/acc_class/7": 0.5}
        for e, v in enumerate(val)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    test_metrics = {"checkpoint": "x", "test/acc_top1": test, "test/acc_class/7": 1.0}
    (folder / "test_metrics.json").write_text(json.dumps(test_metrics))
    if wall is not None:
        info = {"seed": seed, "returncode": 0, "wall_s": wall, "command": []}
        (folder / repeat.RUN_INFO).write_text(json.dumps(info))
    return folder


def test_read_run_takes_the_best_epoch_and_the_test_split(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "s", seed=3, val=[0.5, 0.8, 0.8, 0.7], test=0.77, wall=12.5)
    seed, metrics = read_run(run)
    assert seed == 3
    assert metrics == {
        "val/acc_top1": 0.8,
        "val/loss": pytest.approx(0.2),
        "best_epoch": 2.0,  # the first of the tied best epochs, as the checkpoint ledger keeps
        "test/acc_top1": 0.77,
        "wall_s": 12.5,
    }
    (run / "metrics.jsonl").unlink()
    with pytest.raises(RepeatError, match=r"metrics\.jsonl: missing"):
        read_run(run)


def test_read_arm_refuses_two_runs_of_one_seed(tmp_path: Path) -> None:
    fake_run(tmp_path / "arm" / "x", seed=1, val=[0.5], test=0.5)
    fake_run(tmp_path / "arm" / "y", seed=1, val=[0.6], test=0.6)
    with pytest.raises(RepeatError, match="both ran seed 1"):
        read_arm(tmp_path / "arm")
    with pytest.raises(RepeatError, match="no run folders"):
        read_arm(tmp_path)
    with pytest.raises(RepeatError, match="no such folder"):
        read_arm(tmp_path / "missing")


def test_summarize_cli_writes_the_report_and_the_paired_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for seed, (a, b) in enumerate([(0.90, 0.93), (0.92, 0.95), (0.91, 0.935)]):
        fake_run(tmp_path / "base" / f"seed-{seed}", seed, [a], a, wall=10.0 + seed)
        fake_run(tmp_path / "new" / f"seed-{seed}", seed, [b], b)
    out = tmp_path / "report"
    argv = ["summarize", str(tmp_path / "base"), "--compare", str(tmp_path / "new")]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "base test/acc_top1: mean 0.9100 std 0.0100" in printed
    assert "test/acc_top1: new - base = +0.0283" in printed
    assert "distinguishable from seed noise, new is higher" in printed
    report = json.loads((out / "summary.json").read_text())
    assert report["arms"]["base"]["seeds"] == [0, 1, 2]
    assert report["arms"]["base"]["metrics"]["wall_s"]["mean"] == pytest.approx(11.0)
    assert "wall_s" not in report["arms"]["new"]["metrics"]
    cmp = report["comparison"]["metrics"]["test/acc_top1"]
    assert cmp["diffs"] == pytest.approx([0.03, 0.03, 0.025]) and cmp["distinguishable"]
    table = (out / "summary.md").read_text()
    assert "| test/acc_top1 | 0.9100 | 0.0100 |" in table
    assert "## new - base, paired by seed" in table
    assert main(["summarize", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_train_command_sets_seed_folder_group_and_resume(tmp_path: Path) -> None:
    cmd = train_command(
        [Path("a.yaml"), Path("b.yaml")],
        7,
        tmp_path / "seed-7",
        group="cmp-a",
        extra=["--data.root", "d"],
        launch_args=["--num_processes", "1"],
        resume=True,
    )
    assert cmd[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes"]
    assert cmd[5] == str(repeat.default_train_script())
    text = " ".join(cmd[6:])
    assert text.startswith("--recipe a.yaml b.yaml --train.seed 7 --train.output_dir ")
    assert "--logging.group cmp-a --logging.run_name cmp-a-seed7 --data.root d" in text
    assert text.endswith("--train.resume auto")
    assert repeat.default_train_script() == ROOT / "src" / "train.py"


def test_run_arm_skips_finished_seeds_resumes_and_stops_at_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_subprocess_run(cmd: list[str], check: bool) -> Any:
        calls.append(cmd)
        seed = int(cmd[cmd.index("--train.seed") + 1])
        return subprocess.CompletedProcess(cmd, 1 if seed == 3 else 0)

    monkeypatch.setattr(repeat.subprocess, "run", fake_subprocess_run)
    arm = tmp_path / "arm"
    fake_run(arm / "seed-0", 0, [0.5], 0.5, wall=1.0)  # finished: skipped
    (arm / "seed-1" / "checkpoints").mkdir(parents=True)
    (arm / "seed-1" / "checkpoints" / "ledger.json").write_text("{}")  # interrupted: resumed
    with pytest.raises(RepeatError, match=r"seed 3 .* failed with exit code 1"):
        repeat.run_arm([Path("r.yaml")], arm, [0, 1, 2, 3, 4], group="g")
    assert [c[c.index("--train.seed") + 1] for c in calls] == ["1", "2", "3"]
    assert calls[0][-2:] == ["--train.resume", "auto"] and "--train.resume" not in calls[1]
    record = json.loads((arm / "seed-3" / repeat.RUN_INFO).read_text())
    assert record["returncode"] == 1 and record["seed"] == 3
    assert json.loads((arm / "seed-2" / repeat.RUN_INFO).read_text())["returncode"] == 0


def test_run_cli_rejects_flags_it_sets_itself(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(ROOT / "recipes" / "generic.yaml")
    with pytest.raises(SystemExit):
        main(["run", "--recipe", recipe, "--out", "x", "--", "--train.seed", "3"])
    assert "--train.seed: set by the repeat command itself" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--recipe", "missing.yaml", "--out", "x"])
    assert "missing.yaml: recipe file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the real CLI, as the README writes it


def readme_lines(start: str) -> list[str]:
    """The README lines that start with ``start`` (commands of its bash blocks)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line for line in lines if line.startswith(start)]


TINY = [
    "--data.image_size", "32", "--data.batch_size", "4", "--data.num_workers", "0",
    "--model.arch", "test_resnet", "--model.pretrained", "false", "--train.epochs", "1",
    "--hooks.enabled", "--logging.progress", "off",
]  # fmt: skip


def run_readme_line(
    line: str, replace: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run a README ``python -m classifier_training.repeat ...`` line, words replaced, plus TINY."""
    argv = [replace.get(word, word) for word in line.split()]
    assert argv[:3] == ["python", "-m", "classifier_training.repeat"]
    if argv[3] == "run":
        argv += TINY  # after the line's own `-- --data.root ...`
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, *argv[1:]],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_readme_repeat_commands_run_pair_and_summarise(
    tmp_path: Path, make_imagefolder_dataset: Callable[..., Path]
) -> None:
    data = make_imagefolder_dataset(tmp_path / "data", classes=("a", "b", "c"))
    single, compare = readme_lines("python -m classifier_training.repeat run ")
    (summarize_line,) = readme_lines("python -m classifier_training.repeat summarize ")
    assert "--compare" not in single and "--compare" in compare
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # the README's relative paths
    (tmp_path / "no_flips.yaml").write_text(
        "name: no_flips\naugment:\n  orientation_sensitive: true\n"
    )
    replace = {"/data/my-crops": str(data), "3": "2"}  # --seeds 3 -> 2 on tiny data

    proc = run_readme_line(single, replace, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs" / "repeat" / "flips"
    first = json.loads((out / "summary.json").read_text())
    assert list(first["arms"]) == ["generic"] and first["arms"]["generic"]["seeds"] == [0, 1]
    assert "generic test/acc_top1: mean" in proc.stdout

    # the comparison reuses the finished seeds of arm A and trains arm B on the same seeds
    proc = run_readme_line(compare, replace, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("already finished, skipped") == 2
    report = json.loads((out / "summary.json").read_text())
    assert set(report["arms"]) == {"generic", "generic+no_flips"}
    for arm in report["arms"].values():
        assert arm["seeds"] == [0, 1] and arm["metrics"]["test/acc_top1"]["n"] == 2
        assert arm["metrics"]["wall_s"]["n"] == 2
    cmp = report["comparison"]
    assert (cmp["a"], cmp["b"], cmp["seeds"]) == ("generic", "generic+no_flips", [0, 1])
    assert "test/acc_top1: generic+no_flips - generic" in proc.stdout
    # every seed is an ordinary run folder with the seed, group and flips it was given
    run = yaml.safe_load((out / "generic+no_flips" / "seed-1" / "recipe.yaml").read_text())
    assert run["train"]["seed"] == 1 and run["augment"]["orientation_sensitive"] is True
    assert run["logging"]["group"] == "flips-generic+no_flips"

    proc = run_readme_line(summarize_line, {}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((out / "generic" / "summary.json").read_text())
    assert again["comparison"]["metrics"] == report["comparison"]["metrics"]
