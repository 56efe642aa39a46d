"""What a checkpoint depends on, and the check a resume makes before it touches the run folder.

Every checkpoint carries ``compat.json``::

    {"format": 1, "recipe": {dotted key: value}, "class_to_idx": {...}, "num_processes": N,
     "mixed_precision": "bf16", "dataset": {split: {"images": n, "sha256": hex}},
     "code_version": {"package": "0.1.0", "commit": "...", "dirty": false},
     "forced": [{"at": iso time, "changes": [...]}]}

``dataset`` hashes the index of each split in sample order: relative path, label and file size
of every image (the order matters: the seeded sampler draws indices into it). Moving the
dataset (``data.root``) is therefore fine; adding, removing, relabelling or replacing an image
is a change.

On resume, :func:`check_resume` compares that record with the new run's. Recipe fields listed in
:data:`SAFE_FIELDS` may change (length, patience, logging, hooks, export, loader workers, paths,
initial weights: none of them changes what the checkpoint means); any other difference, a
different class map, dataset, process count or resolved precision is an error that lists every
changed field as ``old -> new``. ``--train.resume_force true`` accepts them and appends them to
``forced`` in every later checkpoint. A different code version is only a warning.

A recipe key present on one side only (a field added by a newer version) is not compared.

Process count policy: the per-process batch counter of a mid-epoch checkpoint means a different
global position under another process count, so a forced resume with a changed count does not
continue mid-epoch: it resumes at the next epoch boundary (the rest of the interrupted epoch is
skipped, the update count and schedule continue). An epoch-end checkpoint resumes exactly there.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import classifier_training
from classifier_training.checkpoint import CheckpointError, TrainerState
from classifier_training.data.index import DatasetIndex
from classifier_training.recipe import Recipe

COMPAT_FILE = "compat.json"
FORMAT = 1

SAFE_FIELDS: tuple[str, ...] = (
    "name",
    "data.root",
    "data.num_workers",
    "data.pin_memory",
    "data.eval_batch_size",
    "data.skip_bad_images",  # what it drops shows in the dataset fingerprint
    "data.generate_if_missing",
    "data.synthetic",
    "model.pretrained",
    "model.pretrained_file",
    "model.allow_random_init",
    "train.epochs",
    "train.early_stop_patience",
    "train.early_stop_min_delta",
    "train.output_dir",
    "train.resume",
    "train.resume_force",
    "train.resume_fallback",
    "train.overwrite",
    "train.checkpoint_every_updates",
    "train.checkpoint_every_minutes",
    "train.keep_top_k",
    "train.eval_test",
    "train.collective_timeout_minutes",
    "logging",
    "hooks",
    "export",
)
"""Recipe fields (or whole sections) a resume may change without --train.resume_force."""


class IncompatibleResumeError(CheckpointError):
    """The resumed checkpoint was made under different settings; the message lists them."""


def is_safe(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in SAFE_FIELDS)


def flatten_recipe(recipe: Recipe) -> dict[str, Any]:
    """``{"data.image_size": 224, ...}``: one entry per leaf field (dicts and lists are leaves)."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                out[key] = json.loads(json.dumps(value))  # tuples -> lists, as in the file

    walk(recipe, "")
    return out


def code_version() -> dict[str, Any]:
    """Package version, plus the git commit (and whether the tree is dirty) for a checkout."""
    info: dict[str, Any] = {"package": classifier_training.__version__}
    repo = Path(classifier_training.__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return info
    try:
        commit = _git(repo, "rev-parse", "HEAD")
        dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return info
    info.update(commit=commit, dirty=dirty)
    return info


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def dataset_fingerprint(index: DatasetIndex) -> dict[str, dict[str, Any]]:
    """Per split: image count and sha256 of (relative path, label, size) lines in sample order."""
    out = {}
    for split, part in index.splits.items():
        digest = hashlib.sha256()
        for s in part.samples:
            rel = os.path.relpath(s.path, index.root)
            digest.update(f"{rel}\t{s.label}\t{os.stat(s.path).st_size}\n".encode())
        out[split] = {"images": len(part.samples), "sha256": digest.hexdigest()}
    return out


def run_record(
    recipe: Recipe, index: DatasetIndex, *, num_processes: int, mixed_precision: str
) -> dict[str, Any]:
    """The record a checkpoint of this run carries (``compat.json``)."""
    return {
        "format": FORMAT,
        "recipe": flatten_recipe(recipe),
        "class_to_idx": dict(index.class_to_idx),
        "num_processes": num_processes,
        "mixed_precision": mixed_precision,
        "dataset": dataset_fingerprint(index),
        "code_version": code_version(),
        "forced": [],
    }


def _class_map_change(old: dict[str, int], new: dict[str, int]) -> str | None:
    if old == new:
        return None
    parts = [f"{len(old)} classes -> {len(new)} classes"]
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    if added:
        parts.append("added " + ", ".join(repr(c) for c in added))
    if removed:
        parts.append("removed " + ", ".join(repr(c) for c in removed))
    moved = sorted(c for c in set(old) & set(new) if old[c] != new[c])
    if moved:
        parts.append("renumbered " + ", ".join(repr(c) for c in moved))
    return "class map: " + "; ".join(parts)


def _version_text(v: dict[str, Any]) -> str:
    text = str(v.get("package", "?"))
    if v.get("commit"):
        text += f" ({str(v['commit'])[:12]}{', dirty' if v.get('dirty') else ''})"
    return text


def compare(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that need --train.resume_force, warnings) between two records."""
    changes: list[str] = []
    old_recipe, new_recipe = saved.get("recipe", {}), current["recipe"]
    for key in sorted(set(old_recipe) & set(new_recipe)):
        if not is_safe(key) and old_recipe[key] != new_recipe[key]:
            changes.append(f"{key}: {old_recipe[key]!r} -> {new_recipe[key]!r}")
    class_change = _class_map_change(saved.get("class_to_idx", {}), current["class_to_idx"])
    if class_change:
        changes.append(class_change)
    for split, new in current["dataset"].items():
        old = saved.get("dataset", {}).get(split)
        if old is not None and old != new:
            changes.append(
                f"dataset {split} split: {old['images']} images (sha256 {old['sha256'][:12]}) "
                f"-> {new['images']} images (sha256 {new['sha256'][:12]})"
            )
    for key, label in (("num_processes", "processes"), ("mixed_precision", "precision")):
        if key in saved and saved[key] != current[key]:
            changes.append(f"{label}: {saved[key]!r} -> {current[key]!r}")
    warnings = []
    old_v, new_v = saved.get("code_version", {}), current["code_version"]
    if old_v and _version_text(old_v) != _version_text(new_v):
        warnings.append(
            f"code version: {_version_text(old_v)} -> {_version_text(new_v)} (the checkpoint "
            "was written by other code; resuming anyway)"
        )
    return changes, warnings


@dataclass
class ResumeCheck:
    """Outcome of an accepted resume: the record later checkpoints carry, what to print, and
    whether the loop must restart at the next epoch boundary (changed process count)."""

    record: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    next_epoch_boundary: bool = False


def check_resume(
    ckpt: Path, current: dict[str, Any], state: TrainerState, *, force: bool
) -> ResumeCheck:
    """Compare ``ckpt``'s compat.json with ``current``; raise IncompatibleResumeError unless
    every difference is safe or ``force``. Reads only; writes nothing."""
    path = ckpt / COMPAT_FILE
    if not path.is_file():
        msg = f"{ckpt} has no {COMPAT_FILE} (written by an older version): settings not checked"
        return ResumeCheck(dict(current), [msg])
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from err
    changes, warnings = compare(saved, current)
    record = dict(current, forced=list(saved.get("forced", [])))
    if not changes:
        return ResumeCheck(record, warnings)
    if not force:
        raise IncompatibleResumeError(
            f"cannot resume {ckpt}: {len(changes)} setting(s) differ from the run that wrote "
            "it:\n  " + "\n  ".join(changes) + "\nNothing in the run folder was changed. Undo "
            "the change, start a new run (another --train.output_dir), or accept the change(s) "
            "with --train.resume_force true."
        )
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    record["forced"].append({"at": at, "changes": changes})
    warnings.append("--train.resume_force: accepted " + "; ".join(changes))
    boundary = saved.get("num_processes", current["num_processes"]) != current["num_processes"]
    boundary = boundary and state.batches_done > 0
    if boundary:
        warnings.append(
            f"the process count changed mid-epoch: skipping the rest of epoch {state.epoch + 1} "
            f"({state.batches_done} batches were done); resuming at epoch {state.epoch + 2}"
        )
    return ResumeCheck(record, warnings, boundary)
