"""Which checkpoint a run starts from: a verified resume, a new run, or a refusal.

Read-only decisions over a run folder's ``checkpoints/`` (see :mod:`checkpoint` for the layout
and the ledger): ``train.resume`` (``auto``, ``auto_or_new``, a run or checkpoint folder) is
resolved to a checkpoint whose files match the ledger's sizes and sha256; a damaged newest
checkpoint is named with the newest intact one (used instead with ``train.resume_fallback``).
Called on the main process, holding the run lock (:mod:`run_folder`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from classifier_training.checkpoint import (
    LEDGER,
    STATE_FILE,
    CheckpointError,
    Ledger,
    TrainerState,
    check_files,
    verify_files,
)


@dataclass
class ResumeChoice:
    """The checkpoint a resume will load, and why (printed by the trainer)."""

    path: Path
    state: TrainerState
    verified_files: int
    skipped: list[str] = field(default_factory=list)
    """Newer checkpoints passed over because they are damaged (fallback only)."""

    def describe(self) -> str:
        s = self.state
        where = (
            f"epoch {s.epoch + 1}, batch {s.batches_done}"
            if s.batches_done
            else (f"start of epoch {s.epoch + 1}")
        )
        check = f"{self.verified_files} files verified" if self.verified_files else "unverified"
        text = f"resumed from {self.path} ({where}, {s.updates} updates; {check})"
        if self.skipped:
            text += "; skipped damaged: " + ", ".join(self.skipped)
        return text


def _candidates(run_dir: Path, ledger: Ledger) -> list[tuple[Path, TrainerState | None]]:
    """Ledger checkpoints: ``last`` first, then the others by update count, newest first."""
    root = run_dir / "checkpoints"
    out: list[tuple[Path, TrainerState | None]] = []
    for name in ledger.names():
        try:
            state: TrainerState | None = TrainerState.from_file(root / name / STATE_FILE)
        except CheckpointError:
            state = None
        out.append((root / name, state))
    head, rest = out[:1], out[1:]
    rest.sort(key=lambda ps: -(ps[1].updates if ps[1] else -1))
    return head + rest


def choose_resume(target: str, run_dir: Path, *, fallback: bool = False) -> ResumeChoice | None:
    """Resolve ``train.resume`` to a verified checkpoint.

    ``auto``: the ledger's last checkpoint of ``run_dir``; ``auto_or_new``: the same, or None
    (a new run) when the folder has no checkpoint yet; otherwise a run folder or a checkpoint
    folder. A damaged checkpoint is an error naming its files and the newest intact one; with
    ``fallback`` that intact one is used instead.
    """
    auto = target in ("auto", "auto_or_new")
    path = Path(run_dir) if auto else Path(target)
    if not auto and (path / STATE_FILE).is_file():
        return _verified_choice(path)
    ledger = Ledger.read(path / "checkpoints")
    if ledger is None or not ledger.last:
        if target == "auto_or_new":
            return None
        if auto:
            raise CheckpointError(
                f"--train.resume {target}: no checkpoint in {path / 'checkpoints'}; start "
                "without --train.resume (or with --train.resume auto_or_new) to begin a new run"
            )
        raise CheckpointError(
            f"--train.resume {target}: neither a checkpoint folder (no {STATE_FILE}) nor a run "
            "directory with checkpoints/ledger.json"
        )
    skipped: list[str] = []
    damage: list[str] = []
    for ckpt, state in _candidates(path, ledger):
        problems = check_files(ckpt, record=ledger.files.get(ckpt.name))
        if state is None and not problems:
            problems = [f"{ckpt / STATE_FILE}: unreadable"]
        if not problems and state is not None:
            if skipped and not fallback:
                raise CheckpointError(
                    f"the newest checkpoint {skipped[0]} is damaged: {'; '.join(damage)}. The "
                    f"newest intact one is {ckpt}: resume from it with --train.resume {ckpt} "
                    "(or --train.resume_fallback true)"
                )
            verified = len(ledger.files.get(ckpt.name, {}))
            return ResumeChoice(ckpt, state, verified, skipped)
        skipped.append(ckpt.name)
        damage.extend(problems)
    raise CheckpointError(
        f"every checkpoint of {path} is damaged: {'; '.join(damage)}; start over with "
        "--train.overwrite true"
    )


def _verified_choice(ckpt: Path) -> ResumeChoice:
    verified = verify_files(ckpt)
    return ResumeChoice(ckpt, TrainerState.from_file(ckpt / STATE_FILE), verified)


def find_resume_checkpoint(target: str, run_dir: Path, *, fallback: bool = False) -> Path:
    """The checkpoint folder ``train.resume`` names (see :func:`choose_resume`)."""
    target = "auto" if target == "auto_or_new" else target
    choice = choose_resume(target, run_dir, fallback=fallback)
    assert choice is not None
    return choice.path


def plan_start(run_dir: Path, resume: str, overwrite: bool, fallback: bool) -> ResumeChoice | None:
    """Decide how a run starts in ``run_dir``: a verified resume, or a new run (None).

    A new run in a folder that has checkpoints is refused unless ``overwrite`` (the caller then
    deletes them with :func:`clear_checkpoints` once the new run's input is known to be good).
    Reads only. Call on the main process, holding the run lock.
    """
    run_dir = Path(run_dir)
    if resume:
        return choose_resume(resume, run_dir, fallback=fallback)
    if (run_dir / "checkpoints" / LEDGER).exists() and not overwrite:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints of an earlier run. Resume it with "
            "--train.resume auto, start over with --train.overwrite true, or pick another "
            "--train.output_dir."
        )
    return None


def clear_checkpoints(run_dir: Path) -> bool:
    """``--train.overwrite``: delete an earlier run's checkpoints and metrics.jsonl (main
    process, holding the run lock); True if there was anything to delete."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return False
    shutil.rmtree(root)
    (Path(run_dir) / "metrics.jsonl").unlink(missing_ok=True)
    return True
