"""Run a recipe over several seeds, or two recipes over the same seeds, and say what is noise.

    python -m classifier_training.repeat run --recipe recipes/generic.yaml --seeds 3 \\
        --out runs/repeat/generic -- --data.root /data/my-crops
    python -m classifier_training.repeat run --recipe recipes/generic.yaml \\
        --compare recipes/generic.yaml my_change.yaml --seeds 5 --out runs/repeat/change \\
        -- --data.root /data/my-crops
    python -m classifier_training.repeat summarize runs/repeat/generic/generic [--compare DIR]

``run`` trains seed after seed (``first_seed .. first_seed + seeds - 1``; an arm is one or more
recipe files, later ones overriding earlier ones as in ``train.py``), each an ordinary
``accelerate launch src/train.py`` run in ``OUT/<arm>/seed-<s>`` (flags after ``--`` go to every
run), then writes ``OUT/summary.json`` and ``OUT/summary.md``: per metric the mean, standard
deviation and 95% t-interval over seeds (test split with the selected best weights, and the
validation metrics of the best epoch), and with ``--compare`` the paired differences, a paired
t-test and whether each difference is distinguishable from seed noise (see
:mod:`classifier_training.seedstats` for the math). Re-running the same command skips finished
seeds and resumes an interrupted one. ``summarize`` builds the same report from run folders made
any other way, e.g. separate launches on several machines (pairs are matched by ``train.seed``).
With ``--logging.wandb true`` every run of an arm joins one W&B group.

Why a command beside ``train.py`` rather than ``--train.seeds N``: one ``train.py`` process is
one run (one run folder, one Accelerate state, one W&B run, exact resume); seeds as separate
launches keep that intact, fail and resume one at a time, can be spread over machines and
summarised later, and comparing two recipes is naturally outside either recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from classifier_training.io import atomic_write_json, atomic_write_text
from classifier_training.seedstats import (
    CONFIDENCE,
    Summary,
    compare_runs,
    summarize_runs,
)

RUN_INFO = "repeat_run.json"
"""Written into a run folder when its launch ended: seed, exit code, wall time, command."""
KEY_METRICS = ("test/acc_top1", "val/acc_top1")
"""Metrics whose verdicts are printed to the console (all are in summary.md and .json)."""
_RESERVED_FLAGS = ("--train.seed", "--train.output_dir", "--logging.group", "--recipe")


class RepeatError(RuntimeError):
    """A run failed or the run folders cannot be summarised; the message says what to do."""


def default_train_script() -> Path:
    """``src/train.py`` beside the package (source checkout or editable install)."""
    return Path(__file__).resolve().parents[1] / "train.py"


def train_command(
    recipe: Sequence[Path],
    seed: int,
    run_dir: Path,
    *,
    group: str,
    extra: Sequence[str] = (),
    launch_args: Sequence[str] = (),
    train_script: Path | None = None,
    resume: bool = False,
) -> list[str]:
    """The ``accelerate launch src/train.py`` command line of one seed."""
    script = train_script or default_train_script()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, str(script)]
    cmd += ["--recipe", *(str(r) for r in recipe), "--train.seed", str(seed)]
    cmd += ["--train.output_dir", str(run_dir), "--logging.group", group]
    cmd += ["--logging.run_name", f"{group}-seed{seed}", *extra]
    if resume:
        cmd += ["--train.resume", "auto"]
    return cmd


def run_arm(
    recipe: Sequence[Path],
    arm_dir: Path,
    seeds: Sequence[int],
    *,
    group: str,
    extra: Sequence[str] = (),
    launch_args: Sequence[str] = (),
    train_script: Path | None = None,
) -> None:
    """Train ``recipe`` once per seed into ``arm_dir/seed-<s>``, one after another.

    A seed whose folder holds a successful ``repeat_run.json`` is skipped; one with checkpoints
    but no such record (interrupted) is resumed. Raises RepeatError at the first failing seed,
    leaving every finished run in place.
    """
    for seed in seeds:
        run_dir = arm_dir / f"seed-{seed}"
        info = _read_json(run_dir / RUN_INFO)
        if info is not None and info.get("returncode") == 0:
            print(f"repeat: {run_dir} already finished, skipped", flush=True)
            continue
        resume = (run_dir / "checkpoints" / "ledger.json").is_file()
        cmd = train_command(
            recipe,
            seed,
            run_dir,
            group=group,
            extra=extra,
            launch_args=launch_args,
            train_script=train_script,
            resume=resume,
        )
        print(f"repeat: seed {seed} -> {run_dir}\n  {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        returncode = subprocess.run(cmd, check=False).returncode
        wall = time.perf_counter() - start
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"seed": seed, "returncode": returncode, "wall_s": wall, "command": cmd}
        atomic_write_json(run_dir / RUN_INFO, record)
        if returncode != 0:
            raise RepeatError(
                f"seed {seed} ({run_dir}) failed with exit code {returncode} (its output is "
                "above); fix the cause and run the same command again: finished seeds are "
                "kept and this one resumes from its last checkpoint"
            )


def read_run(run_dir: Path) -> tuple[int, dict[str, float]]:
    """``(seed, metrics)`` of one finished run folder.

    Metrics: every ``test/*`` value of ``test_metrics.json`` and every ``val/*`` value of the
    best epoch in ``metrics.jsonl`` (by the run's ``train.monitor``), per-class accuracies left
    out, plus ``wall_s`` when the run was launched by ``run``.
    """
    recipe = _read_yaml(run_dir / "recipe.yaml")
    train = recipe.get("train", {})
    seed, monitor = train.get("seed"), train.get("monitor", "val/acc_top1")
    if not isinstance(seed, int):
        raise RepeatError(f"{run_dir / 'recipe.yaml'}: no integer train.seed")
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    scored = [r for r in rows if isinstance(r.get(monitor), int | float)]
    if not scored:
        raise RepeatError(
            f"{run_dir / 'metrics.jsonl'}: no epoch with {monitor}; is the run finished?"
        )
    sign = -1.0 if train.get("monitor_mode", "max") == "min" else 1.0
    best = max(scored, key=lambda r: sign * float(r[monitor]))  # first best, as the ledger
    metrics = {k: float(v) for k, v in best.items() if k.startswith("val/")}
    metrics["best_epoch"] = float(best.get("epoch", math.nan))
    test = _read_json(run_dir / "test_metrics.json")
    if test is not None:
        metrics.update({k: float(v) for k, v in test.items() if k.startswith("test/")})
    info = _read_json(run_dir / RUN_INFO)
    if info is not None and isinstance(info.get("wall_s"), int | float):
        metrics["wall_s"] = float(info["wall_s"])
    return seed, {k: v for k, v in metrics.items() if "/acc_class/" not in k}


def read_arm(arm_dir: Path) -> dict[int, dict[str, float]]:
    """``{seed: metrics}`` of the run folders directly under ``arm_dir`` (or ``arm_dir`` itself)."""
    if not arm_dir.is_dir():
        raise RepeatError(f"{arm_dir}: no such folder of runs")
    runs = [arm_dir] if (arm_dir / "recipe.yaml").is_file() else sorted(
        p for p in arm_dir.iterdir() if (p / "recipe.yaml").is_file()
    )  # fmt: skip
    if not runs:
        raise RepeatError(f"{arm_dir}: no run folders (folders with a recipe.yaml) inside")
    out: dict[int, dict[str, float]] = {}
    where: dict[int, Path] = {}
    for run in runs:
        seed, metrics = read_run(run)
        if seed in out:
            raise RepeatError(f"{run} and {where[seed]} both ran seed {seed}; keep one of them")
        out[seed], where[seed] = metrics, run
    return out


def build_report(
    arms: Mapping[str, Mapping[int, Mapping[str, float]]],
) -> dict[str, Any]:
    """The summary.json content: per-arm summaries and, for two arms, paired comparisons."""
    names = list(arms)
    report: dict[str, Any] = {"confidence": CONFIDENCE, "arms": {}}
    summaries: dict[str, dict[str, Summary]] = {}
    for name in names:
        summaries[name] = summarize_runs(arms[name])
        report["arms"][name] = {
            "seeds": sorted(arms[name]),
            "metrics": {k: s.as_dict() for k, s in summaries[name].items()},
        }
    if len(names) == 2:
        a, b = names
        comparisons = compare_runs(arms[a], arms[b])
        report["comparison"] = {
            "a": a,
            "b": b,
            "seeds": sorted(set(arms[a]) & set(arms[b])),
            "metrics": {k: c.as_dict() for k, c in comparisons.items()},
            "verdicts": {k: c.verdict(k, a, b) for k, c in comparisons.items()},
        }
    return report


def format_markdown(report: Mapping[str, Any]) -> str:
    """summary.md: one table per arm, and the paired comparison when there is one."""
    level = f"{100 * report['confidence']:.0f}%"
    lines = ["# Repeated seeds", ""]
    for name, arm in report["arms"].items():
        lines += [f"## {name} (seeds {', '.join(str(s) for s in arm['seeds'])})", ""]
        lines += [f"| metric | mean | std | {level} CI | min | max | n |", "|---" * 7 + "|"]
        for key, s in arm["metrics"].items():
            ci = f"[{_num(s['ci_low'])}, {_num(s['ci_high'])}]"
            lines.append(
                f"| {key} | {_num(s['mean'])} | {_num(s['std'])} | {ci} | {_num(s['min'])} "
                f"| {_num(s['max'])} | {s['n']} |"
            )
        lines.append("")
    comparison = report.get("comparison")
    if comparison:
        a, b = comparison["a"], comparison["b"]
        lines += [f"## {b} - {a}, paired by seed", ""]
        lines += [f"| metric | mean diff | {level} CI | t | p | verdict |", "|---" * 6 + "|"]
        for key, c in comparison["metrics"].items():
            ci = f"[{_num(c['ci_low'])}, {_num(c['ci_high'])}]"
            verdict = "distinguishable" if c["distinguishable"] else "within seed noise"
            lines.append(
                f"| {key} | {_num(c['mean_diff'])} | {ci} | {_num(c['t'])} "
                f"| {_num(c['p_value'])} | {verdict} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_report(out: Path, arms: Mapping[str, Mapping[int, Mapping[str, float]]]) -> str:
    """Write ``out/summary.json`` and ``out/summary.md``; return the console text."""
    report = build_report(arms)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "summary.json", report, sort_keys=True)
    atomic_write_text(out / "summary.md", format_markdown(report))
    text = []
    for name, arm in report["arms"].items():
        for key in KEY_METRICS:
            s = arm["metrics"].get(key)
            if s is not None:
                text.append(
                    f"{name} {key}: mean {_num(s['mean'])} std {_num(s['std'])} "
                    f"95% CI [{_num(s['ci_low'])}, {_num(s['ci_high'])}] (n = {s['n']})"
                )
    verdicts = report.get("comparison", {}).get("verdicts", {})
    text += [verdicts[k] for k in KEY_METRICS if k in verdicts]
    text.append(f"wrote {out / 'summary.md'} and {out / 'summary.json'}")
    return "\n".join(text)


def _num(v: object) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    return f"{float(v):.4f}" if isinstance(v, int | float) else str(v)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RepeatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise RepeatError(f"{path}: expected a JSON object")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise RepeatError(f"{path}: missing; is this a finished run folder?")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RepeatError(f"{path}:{number}: not valid JSON ({err})") from err
    return rows


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RepeatError(f"{path}: missing; is this a run folder?")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise RepeatError(f"{path}: not a recipe mapping")
    return data


def _arm_names(recipe: Sequence[Path], other: Sequence[Path] | None) -> tuple[str, str | None]:
    def name(paths: Sequence[Path]) -> str:
        names = [str(_read_yaml(p).get("name") or p.stem) for p in paths]
        return "+".join(dict.fromkeys(names))  # generic + my_change -> generic+my_change

    a = name(recipe)
    if not other:
        return a, None
    b = name(other)
    return (a, b) if a != b else (f"a-{a}", f"b-{b}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m classifier_training.repeat", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train N seeds (of one or two recipes), then summarise")
    run.add_argument(
        "--recipe", type=Path, nargs="+", required=True, help="recipe YAML file(s) of arm A"
    )
    run.add_argument(
        "--compare", type=Path, nargs="+", help="recipe YAML file(s) of arm B (same seeds)"
    )
    run.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    run.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    run.add_argument("--out", type=Path, required=True, help="folder for the runs and summary")
    run.add_argument("--launch-args", default="", help="extra `accelerate launch` arguments")
    run.add_argument("--train-script", type=Path, help="train.py (default: src/train.py)")
    summ = sub.add_parser("summarize", help="report on existing run folders")
    summ.add_argument("runs", type=Path, help="folder of run folders (arm A)")
    summ.add_argument("--compare", type=Path, help="folder of run folders (arm B)")
    summ.add_argument("--out", type=Path, help="where summary.* go (default: RUNS)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI; flags after ``--`` are passed to every training run."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args_list:
        cut = args_list.index("--")
        args_list, extra = args_list[:cut], args_list[cut + 1 :]
    parser = _parser()
    args = parser.parse_args(args_list)
    try:
        if args.command == "summarize":
            arms = {args.runs.name or "a": read_arm(args.runs)}
            if args.compare is not None:
                name_b = args.compare.name if args.compare.name != args.runs.name else "b"
                arms[name_b] = read_arm(args.compare)
            print(write_report(args.out or args.runs, arms))
            return 0
        if args.seeds < 1:
            parser.error("--seeds must be >= 1")
        bad = [f for f in extra if f.split("=", 1)[0] in _RESERVED_FLAGS]
        if bad:
            parser.error(f"{', '.join(bad)}: set by the repeat command itself; drop it")
        for path in [*args.recipe, *(args.compare or [])]:
            if not path.is_file():
                parser.error(f"{path}: recipe file not found")
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        name_a, name_b = _arm_names(args.recipe, args.compare)
        plan = [(name_a, args.recipe)] + ([(name_b, args.compare)] if name_b else [])
        # seed by seed, both arms in turn: a slower or busier machine later on then affects
        # both arms alike, and the first pairs are there early
        for seed in seeds:
            for name, recipe in plan:
                run_arm(
                    recipe,
                    args.out / name,
                    [seed],
                    group=f"{args.out.name}-{name}",
                    extra=extra,
                    launch_args=shlex.split(args.launch_args),
                    train_script=args.train_script,
                )
        print(write_report(args.out, {name: read_arm(args.out / name) for name, _ in plan}))
    except RepeatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
