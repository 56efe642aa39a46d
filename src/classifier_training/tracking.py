"""Where numbers go: a progress display, ``metrics.jsonl`` and W&B through Accelerate."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from accelerate import Accelerator

from classifier_training.io import atomic_write_text
from classifier_training.recipe import LoggingConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class Progress:
    """A tqdm bar on a terminal; one line every ``log_every`` updates otherwise.

    Shows loss, lr, images/s and the ETA of the epoch. Only the main process prints.
    """

    def __init__(
        self, mode: str, log_every: int, enabled: bool, stream: TextIO | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode if enabled else "off"
        self.log_every = max(1, log_every)
        self._bar: Any = None
        self._start = 0.0
        self._images = 0
        self._batches = 0

    def start_epoch(self, epoch: int, epochs: int, total_batches: int, done: int) -> None:
        self.epoch, self.epochs, self.total, self.done = epoch, epochs, total_batches, done
        self._start, self._images, self._batches = time.perf_counter(), 0, 0
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_batches,
                initial=done,
                desc=f"epoch {epoch + 1}/{epochs}",
                file=self.stream,
                dynamic_ncols=True,
                leave=False,
            )

    def step(self, images: int, updates: int, loss: torch.Tensor, lr: float) -> None:
        """Called once per loader batch; ``images`` is the global batch size.

        ``loss`` stays a device tensor: reading it forces a GPU sync, so it is read only when
        something is shown (every ``log_every`` updates, at most every 10 batches for the bar).
        """
        self.done += 1
        self._batches += 1
        self._images += images
        if self.mode == "bar" and self._bar is not None:
            self._bar.update(1)
            if self._batches % min(10, self.log_every) == 0 or self.done == self.total:
                ips = self._images / max(time.perf_counter() - self._start, 1e-9)
                self._bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")
        elif self.mode == "lines" and (updates % self.log_every == 0 or self.done == self.total):
            elapsed = max(time.perf_counter() - self._start, 1e-9)
            eta = (self.total - self.done) * elapsed / max(1, self._batches)
            print(
                f"epoch {self.epoch + 1}/{self.epochs} batch {self.done}/{self.total} "
                f"update {updates} loss {float(loss):.4f} lr {lr:.3e} "
                f"{self._images / elapsed:.1f} img/s eta {_fmt_seconds(eta)}",
                file=self.stream,
                flush=True,
            )

    def end_epoch(self) -> float:
        """Close the bar; return images/s of the epoch."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return self._images / max(time.perf_counter() - self._start, 1e-9)


def _fmt_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class MetricsLog:
    """``metrics.jsonl``: one JSON object per epoch with every key.

    On resume, lines of epochs after the checkpoint are dropped so that a replayed epoch does not
    appear twice.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, epochs_done: int) -> None:
        if not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epochs_done
        ]
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def init_wandb(
    accelerator: Accelerator,
    cfg: LoggingConfig,
    run_name: str,
    run_dir: Path,
    config: dict[str, Any],
    run_id: str,
) -> str:
    """Start the W&B tracker; return its run id ("" when tracking is off or failed).

    Never blocks a run: without an API key and without WANDB_MODE the run is logged offline
    (``wandb sync`` uploads it later); when the server cannot be reached within
    ``WANDB_INIT_TIMEOUT`` seconds (wandb's setting, default 90) the run falls back to offline
    logging, and if even that fails training goes on without W&B.
    """
    if not cfg.wandb:
        return ""
    if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
        netrc = Path.home() / ".netrc"
        if not (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            log.warning("W&B: no API key found; logging offline to %s/wandb", run_dir)
            os.environ["WANDB_MODE"] = "offline"
    init_kwargs: dict[str, Any] = {
        "name": cfg.run_name or run_name,
        "dir": str(run_dir),
        "tags": list(cfg.tags),
        "resume": "allow",
    }
    if cfg.group:
        init_kwargs["group"] = cfg.group
    if run_id:
        init_kwargs["id"] = run_id
    for attempt in ("as configured", "offline"):
        try:
            accelerator.init_trackers(
                cfg.project, config=config, init_kwargs={"wandb": init_kwargs}
            )
            tracker = accelerator.get_tracker("wandb", unwrap=True)
            return str(getattr(tracker, "id", "") or "")
        except Exception as err:  # wandb raises many types; a logger must never stop training
            accelerator.trackers = []
            if attempt == "offline" or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
                log.warning("W&B could not start (%s: %s); continuing without it",
                            type(err).__name__, err)  # fmt: skip
                break
            # Unreachable server or bad key: keep the numbers locally for a later `wandb sync`.
            log.warning("W&B could not start online (%s); logging offline to %s/wandb",
                        type(err).__name__, run_dir)  # fmt: skip
            # wandb reads WANDB_MODE once per process: say it in the call. Offline runs cannot
            # look up a resume status, so drop that too.
            init_kwargs["mode"] = "offline"
            init_kwargs.pop("resume", None)
    accelerator.log_with = []
    return ""
