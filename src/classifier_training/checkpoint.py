"""Checkpoints: atomic ``save_state`` folders, a top-k ledger, and weight loading for export.

Layout of ``runs/<name>/checkpoints/``::

    epoch-003/      accelerator.save_state(): model.safetensors, optimizer.bin,
                    random_states_*.pkl (+ scaler.pt); plus ours: ema.safetensors,
                    trainer_state.json
    step-0000450/   an every-N-updates checkpoint (only the newest is kept)
    ledger.json     {"monitor", "mode", "last", "best": [{"name", "epoch", "updates", "value"}]}

A folder is written under ``.tmp-<name>`` and renamed when complete, and the ledger is replaced
atomically after that, so a kill at any moment leaves the previous checkpoint loadable. Only
``last`` and the ``keep_top_k`` best folders survive pruning. The trainer state is JSON and the
weights are safetensors: loading never unpickles our own objects (Accelerate's RNG file aside).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from classifier_training.io import atomic_write_text

LEDGER = "ledger.json"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint or run directory is missing or unusable; the message says which and why."""


@dataclass
class TrainerState:
    """Loop position and bookkeeping saved with every checkpoint (JSON).

    ``epoch`` is the epoch being trained (0-based) and ``batches_done`` how many of its
    per-process loader batches were consumed; an epoch-end checkpoint has ``epoch = e + 1`` and
    ``batches_done = 0``.
    """

    epoch: int = 0
    batches_done: int = 0
    updates: int = 0
    best_value: float | None = None
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    wandb_run_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> TrainerState:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: cannot read trainer state ({err})") from err
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LedgerEntry:
    name: str
    epoch: int
    updates: int
    value: float


@dataclass
class Ledger:
    """Which checkpoint folders exist and why: ``last`` plus the top-k by the monitored value."""

    monitor: str
    mode: Literal["max", "min"]
    last: str = ""
    best: list[LedgerEntry] = field(default_factory=list)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, ckpt_root: Path) -> Ledger | None:
        path = ckpt_root / LEDGER
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            best = [LedgerEntry(**e) for e in data.get("best", [])]
            return cls(data["monitor"], data["mode"], data.get("last", ""), best)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: corrupt checkpoint ledger ({err})") from err


class CheckpointManager:
    """Saves, ranks and prunes checkpoints of one run; all processes call ``save``."""

    def __init__(
        self, run_dir: Path, monitor: str, mode: Literal["max", "min"], keep_top_k: int
    ) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_top_k = keep_top_k
        existing = Ledger.read(self.root)
        self.ledger = existing or Ledger(monitor=monitor, mode=mode)
        # The monitor may change between runs; ranking always uses the current one.
        self.ledger.monitor, self.ledger.mode = monitor, mode

    @property
    def best_path(self) -> Path | None:
        return self.root / self.ledger.best[0].name if self.ledger.best else None

    @property
    def last_path(self) -> Path | None:
        return self.root / self.ledger.last if self.ledger.last else None

    def save(
        self,
        accelerator: Any,
        name: str,
        state: TrainerState,
        ema: torch.nn.Module | None,
        value: float | None,
    ) -> Path:
        """Write checkpoint ``name`` atomically, update the ledger and prune.

        ``value`` is the monitored metric for epoch checkpoints (None for step checkpoints,
        which never enter the top-k).
        """
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        # Every process writes its RNG state into tmp: all must be done before it is renamed.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if ema is not None:
                sd = {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
                save_file(sd, str(tmp / EMA_FILE))
            atomic_write_text(tmp / STATE_FILE, state.to_json())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._record(name, state, value)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            # Only the main process updated the ledger; the others read it back so that all agree
            # on the best checkpoint (every process takes part in the test evaluation).
            monitor, mode = self.ledger.monitor, self.ledger.mode
            self.ledger = Ledger.read(self.root) or self.ledger
            self.ledger.monitor, self.ledger.mode = monitor, mode
        return final

    def _record(self, name: str, state: TrainerState, value: float | None) -> None:
        ledger = self.ledger
        ledger.best = [e for e in ledger.best if e.name != name]
        if value is not None:
            ledger.best.append(LedgerEntry(name, state.epoch, state.updates, float(value)))
            sign = -1.0 if ledger.mode == "max" else 1.0
            # Stable sort: on ties the earlier checkpoint stays ahead.
            ledger.best.sort(key=lambda e: sign * e.value)
            ledger.best = ledger.best[: self.keep_top_k]
        ledger.last = name
        atomic_write_text(self.root / LEDGER, ledger.to_json())
        keep = {ledger.last, *(e.name for e in ledger.best)}
        for child in self.root.iterdir():
            if child.is_dir() and child.name not in keep and not child.name.startswith("."):
                shutil.rmtree(child, ignore_errors=True)


def find_resume_checkpoint(target: str, run_dir: Path) -> Path:
    """Resolve ``train.resume``: 'auto' (latest of this run), a run directory, or a checkpoint."""
    path = run_dir if target == "auto" else Path(target)
    if (path / STATE_FILE).is_file():
        return path
    ledger = Ledger.read(path / "checkpoints")
    if ledger is None or not ledger.last:
        if target == "auto":
            raise CheckpointError(
                f"--train.resume auto: no checkpoint in {run_dir / 'checkpoints'}; "
                "start without --train.resume to begin a new run"
            )
        raise CheckpointError(
            f"--train.resume {target}: neither a checkpoint folder (no {STATE_FILE}) nor a run "
            "directory with checkpoints/ledger.json"
        )
    ckpt = path / "checkpoints" / ledger.last
    if not (ckpt / STATE_FILE).is_file():
        raise CheckpointError(f"{ckpt}: checkpoint named in the ledger is missing or incomplete")
    return ckpt


def resolve_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """A checkpoint folder of a run: 'best', 'last', or an explicit path."""
    if which not in ("best", "last"):
        path = Path(which)
        if not (path / MODEL_FILE).is_file():
            raise CheckpointError(f"{path}: not a checkpoint folder (no {MODEL_FILE})")
        return path
    root = Path(run_dir) / "checkpoints"
    ledger = Ledger.read(root)
    if ledger is None:
        raise CheckpointError(f"{root}: no checkpoints/ledger.json; is {run_dir} a run directory?")
    if which == "best" and ledger.best:
        return root / ledger.best[0].name
    if not ledger.last:
        raise CheckpointError(f"{root}: the ledger lists no checkpoint")
    return root / ledger.last


def load_weights(ckpt: Path, weights: Literal["ema", "raw"]) -> dict[str, torch.Tensor]:
    """The model state dict stored in a checkpoint folder (EMA or raw), safetensors only."""
    if weights == "ema":
        path = ckpt / EMA_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{ckpt}: no EMA weights ({EMA_FILE}); the run had ema.enabled=false, "
                "export with --weights raw"
            )
        sd = load_file(str(path))
        # ModelEmaV3.state_dict() keys carry the "module." prefix of its wrapped copy.
        return {k.removeprefix("module."): v for k, v in sd.items()}
    path = ckpt / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no {MODEL_FILE}")
    return load_file(str(path))
