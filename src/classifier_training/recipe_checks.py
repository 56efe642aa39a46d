"""Semantic checks of a parsed :class:`~classifier_training.recipe.Recipe` (torch-free).

Everything here only needs the recipe, so it runs when the recipe is parsed, before anything is
written: ranges of numbers, ``train.monitor`` against the metric keys an epoch will log (known
without running one: :func:`monitor_keys`), and ``model.arch`` against timm's registry (timm is
imported only for that check, with close names suggested by ``difflib``). The per-class monitor
``val/acc_class/<label>`` needs the class map and is checked with the dataset
(:mod:`classifier_training.data.validate`).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from classifier_training.recipe import ExportConfig, Recipe

TRAIN_METRICS = ("loss", "acc_top1", "lr", "grad_norm", "img_per_s", "skipped_steps")
"""Names of the per-epoch training metrics (``train/<name>``)."""
EVAL_METRICS = ("loss", "acc_top1", "acc_top5", "f1_macro")
"""Names of the evaluation metrics (``val/<name>``, ``val_raw/<name>``, ``val_ema/<name>``);
``val/acc_class/<label>`` exists for every train class present in the validation split."""
PER_CLASS_MONITOR = "val/acc_class/"


def monitor_keys(recipe: Recipe) -> list[str]:
    """Every metric ``train.monitor`` may name, known before any epoch runs (the per-class keys
    ``val/acc_class/<label>`` need the class map and are checked with the dataset)."""
    prefixes = ["val", "val_raw"] + (["val_ema"] if recipe.ema.enabled else [])
    return [f"train/{m}" for m in TRAIN_METRICS] + [
        f"{p}/{m}" for p in prefixes for m in EVAL_METRICS
    ]


def _monitor_problem(recipe: Recipe) -> str | None:
    monitor = recipe.train.monitor
    if monitor in monitor_keys(recipe):
        return None
    if monitor.startswith(PER_CLASS_MONITOR) and monitor != PER_CLASS_MONITOR:
        return None
    hint = ""
    if monitor.startswith("val_ema/") and not recipe.ema.enabled:
        hint = " (val_ema/* needs ema.enabled true)"
    else:
        close = difflib.get_close_matches(monitor, monitor_keys(recipe), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return (
        f"train.monitor: {monitor!r} is not a metric of this run{hint}; choose one of "
        f"{', '.join(monitor_keys(recipe))}, or {PER_CLASS_MONITOR}<label>"
    )


def _arch_problem(arch: str) -> str | None:
    """None if timm can build ``arch``: a registry name, optionally with a known pretrained tag,
    or a source-prefixed id (``hf-hub:...``, ``local-dir:...``, resolved only at creation)."""
    import timm
    from timm.models import parse_model_name, split_model_name_tag

    try:
        source, _ = parse_model_name(arch)
    except ValueError as err:
        return f"model.arch: {err}"
    if source is not None:
        return None
    name, tag = split_model_name_tag(arch)
    if timm.is_model(name) and (not tag or arch in timm.list_pretrained()):
        return None
    known = timm.list_models() + timm.list_pretrained()
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    if timm.is_model(name):
        return f"model.arch: {arch!r}: timm has no pretrained tag {tag!r} for {name}{hint}"
    return f"model.arch: {arch!r} is not a timm model{hint} (timm.list_models() lists them)"


def export_problems(cfg: ExportConfig) -> list[str]:
    """What is wrong with an export section (also checked by ``python -m export``)."""
    problems = []
    wanted = [p.strip().lower() for p in cfg.precision.split(",") if p.strip()]
    if not wanted or any(p not in ("fp32", "fp16", "int8") for p in wanted):
        problems.append(
            f"export.precision {cfg.precision!r}: use a comma-separated list of fp32, fp16, int8"
        )
    if not 0 <= cfg.max_accuracy_drop <= 1:
        problems.append(f"export.max_accuracy_drop must be in [0, 1] (got {cfg.max_accuracy_drop})")
    if cfg.int8_calibration_images < 1:
        problems.append(
            f"export.int8_calibration_images must be >= 1 (got {cfg.int8_calibration_images})"
        )
    if not 0 < cfg.target_precision <= 1:
        problems.append(f"export.target_precision must be in (0, 1] (got {cfg.target_precision})")
    return problems


def recipe_problems(recipe: Recipe) -> list[str]:
    """What is wrong with values that types alone cannot rule out, one line per problem, each
    starting with the dotted field name; empty when the recipe is fine."""
    problems: list[str] = []

    def need(ok: bool, text: str, value: object) -> None:
        if not ok:
            problems.append(f"{text} (got {value!r})")

    d, t, o = recipe.data, recipe.train, recipe.optim
    need(d.image_size >= 16, "data.image_size must be >= 16", d.image_size)
    need(d.batch_size >= 1, "data.batch_size must be >= 1", d.batch_size)
    need(d.eval_batch_size >= 0, "data.eval_batch_size must be >= 0", d.eval_batch_size)
    need(d.num_workers >= 0, "data.num_workers must be >= 0", d.num_workers)
    need(t.epochs >= 1, "train.epochs must be >= 1", t.epochs)
    need(t.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1", t.grad_accum_steps)
    need(
        t.collective_timeout_minutes > 0,
        "train.collective_timeout_minutes must be > 0",
        t.collective_timeout_minutes,
    )
    need(
        t.checkpoint_every_updates >= 0,
        "train.checkpoint_every_updates must be >= 0 (0: only at epoch ends)",
        t.checkpoint_every_updates,
    )
    need(
        t.checkpoint_every_minutes >= 0,
        "train.checkpoint_every_minutes must be >= 0 (0: no time-based checkpoints)",
        t.checkpoint_every_minutes,
    )
    need(
        t.max_batches_per_epoch >= 0,
        "train.max_batches_per_epoch must be >= 0",
        t.max_batches_per_epoch,
    )
    need(t.keep_top_k >= 0, "train.keep_top_k must be >= 0", t.keep_top_k)
    need(
        t.early_stop_patience >= 0, "train.early_stop_patience must be >= 0", t.early_stop_patience
    )
    need(o.lr > 0, "optim.lr must be > 0", o.lr)
    need(o.weight_decay >= 0, "optim.weight_decay must be >= 0", o.weight_decay)
    need(o.clip_grad_norm >= 0, "optim.clip_grad_norm must be >= 0 (0 disables)", o.clip_grad_norm)
    need(0.0 < recipe.ema.decay < 1.0, "ema.decay must be in (0, 1)", recipe.ema.decay)
    need(
        0.0 <= recipe.loss.label_smoothing < 1.0,
        "loss.label_smoothing must be in [0, 1)",
        recipe.loss.label_smoothing,
    )
    need(recipe.logging.log_every >= 1, "logging.log_every must be >= 1", recipe.logging.log_every)
    need(
        -1 <= recipe.hooks.near_duplicate_distance <= 64,
        "hooks.near_duplicate_distance must be in [-1, 64] (-1: no check)",
        recipe.hooks.near_duplicate_distance,
    )
    problems += export_problems(recipe.export)
    if d.sampler == "manual" and not d.sampler_weights:
        problems.append("data.sampler=manual needs data.sampler_weights {label: weight}")
    for problem in (_monitor_problem(recipe), _arch_problem(recipe.model.arch)):
        if problem:
            problems.append(problem)
    return problems
