"""Where an epoch's time goes: per-phase seconds for ``metrics.jsonl``, the console and W&B.

Keys written per epoch (seconds, main process)::

    time/epoch_s       wall time of the epoch, from its start to the end of its hook round
    time/train_s       the training loop (all batches), wall time
    time/data_s          ... of which waiting for the loader's next batch (host)
    time/augment_s       ... of which the batched augmentation
    time/step_s          ... of which forward, backward, optimizer step, EMA and schedule
    time/eval_s        evaluation (raw and EMA weights)
    time/checkpoint_s  writing the epoch's checkpoint
    time/hooks_s       the hook round: the blocking part of the hooks (drawing runs beside)
    time/blocking_s    epoch - train - eval: everything that keeps the device waiting between
                       epochs (checkpoint, hooks, logging, the epoch-end reductions)

How it is measured, without slowing the loop down:

* Epoch-level phases (``train``, ``eval``, ``checkpoint``, ``hooks``) are host wall time between
  two device synchronisations, one at each phase boundary (a handful per epoch): on CUDA the
  queued kernels of a phase are finished inside that phase.
* Per-batch phases on CUDA (``augment``, ``step``) are timed with CUDA events recorded on the
  stream, never synchronised per batch: the device time between the events, read after the
  epoch-end synchronisation. Each is the time the GPU spent from the end of the previous phase to
  the end of this one (its kernels plus any wait for the host to queue them). On the CPU,
  operations are synchronous and these are plain host wall times.
* ``data`` is host time blocked in the loader's ``next()``. On CUDA the GPU may still be busy
  with earlier batches meanwhile, so ``data`` large *and* ``train`` much longer than
  ``augment + step`` is what a starving GPU looks like.

The parts of ``train`` need not add up to it exactly (progress display, metric accumulation,
and on CUDA the overlap of host and device); ``epoch`` minus the named phases is shown as
``other`` in the summary.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")

PHASES = ("train", "data", "augment", "step", "eval", "checkpoint", "hooks")
"""Phase names; each is written as ``time/<name>_s``."""
_SHORT = {
    "data": "data",
    "augment": "aug",
    "step": "step",
    "eval": "eval",
    "checkpoint": "ckpt",
    "hooks": "hooks",
}


def key(phase: str) -> str:
    """The metrics key of a phase: ``time/<phase>_s``."""
    return f"time/{phase}_s"


class PhaseTimer:
    """Accumulates the seconds of each phase of the current epoch (see the module docstring)."""

    _DRAIN_EVERY = 256  # finished CUDA event pairs are read back in batches, never waited for

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._epoch_start = time.perf_counter()
        self._events: deque[tuple[str, torch.cuda.Event, torch.cuda.Event]] = deque()

    def start_epoch(self) -> None:
        """Reset the counters; the epoch's wall clock starts now."""
        self._sync()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._events.clear()
        self._epoch_start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """An epoch-level phase: host wall time between device synchronisations."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        """A per-batch phase: CUDA events on the current stream (no sync), host time on CPU."""
        if not self.cuda:
            start = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            return
        begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        begin.record()
        try:
            yield
        finally:
            end.record()
            self._events.append((name, begin, end))
            if len(self._events) >= self._DRAIN_EVERY:
                self._drain(wait=False)

    def batches(self, iterable: Iterable[T]) -> Iterator[T]:
        """Iterate ``iterable``, adding the time blocked in each ``next()`` to ``data``."""
        iterator = iter(iterable)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds["data"] += time.perf_counter() - start
            yield item

    def epoch_times(self) -> dict[str, float]:
        """``time/*`` keys of the epoch so far (synchronises once); ``epoch`` is wall time."""
        self._sync()
        self._drain(wait=True)
        out = {key(name): seconds for name, seconds in self.seconds.items()}
        epoch = time.perf_counter() - self._epoch_start
        out[key("epoch")] = epoch
        out[key("blocking")] = max(0.0, epoch - self.seconds["train"] - self.seconds["eval"])
        return out

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _drain(self, wait: bool) -> None:
        while self._events:
            name, begin, end = self._events[0]
            if not wait and not end.query():  # type: ignore[no-untyped-call]
                return
            self._events.popleft()
            self.seconds[name] = self.seconds.get(name, 0.0) + begin.elapsed_time(end) / 1e3


def format_epoch_times(times: dict[str, float]) -> str:
    """One console line: ``time 12.3 s: data 0.1, aug 2.0, step 9.0, eval 0.8, ...``."""
    parts = [f"{short} {times.get(key(name), 0.0):.2f}" for name, short in _SHORT.items()]
    return f"time {times.get(key('epoch'), 0.0):.1f} s: " + ", ".join(parts)


def timing_summary(
    rows: list[dict[str, float]],
    background_seconds: float = 0.0,
    checkpoint_background_seconds: float = 0.0,
    background_by_job: Mapping[str, float] | None = None,
) -> str:
    """The end-of-run table: each phase's total seconds, share of the run and mean per epoch.

    ``rows`` are the epochs' metrics (their ``time/*`` keys); ``background_seconds`` is the hook
    work and ``checkpoint_background_seconds`` the durable checkpoint writing (fsync, hashes,
    rename, ledger) done beside training (neither is part of the wall time);
    ``background_by_job`` splits the hook work by job (its largest parts are named).
    """
    rows = [r for r in rows if key("epoch") in r]
    if not rows:
        return "timing: no epoch finished"
    total = {name: sum(float(r.get(key(name), 0.0)) for r in rows) for name in PHASES}
    wall = sum(float(r[key("epoch")]) for r in rows)
    named = total["train"] + total["eval"] + total["checkpoint"] + total["hooks"]
    lines = [f"timing summary: {len(rows)} epochs, {wall:.1f} s (mean per epoch in brackets)"]

    def line(label: str, seconds: float, indent: str = "  ") -> None:
        share = 100.0 * seconds / wall if wall > 0 else 0.0
        mean = seconds / len(rows)
        lines.append(f"{indent}{label:<24}{seconds:9.1f} s {share:5.1f}%  ({mean:.2f} s)")

    line("training loop", total["train"])
    line("data wait", total["data"], "    ")
    line("augmentation", total["augment"], "    ")
    line("forward/backward/step", total["step"], "    ")
    line("evaluation", total["eval"])
    line("checkpoint", total["checkpoint"])
    line("hooks (blocking)", total["hooks"])
    line("other", max(0.0, wall - named))
    if background_seconds > 0:
        parts = sorted((background_by_job or {}).items(), key=lambda kv: -kv[1])[:4]
        named_parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in parts)
        lines.append(
            f"  hook work in the background: {background_seconds:.1f} s (overlapped)"
            + (f": {named_parts}" if named_parts else "")
        )
    if checkpoint_background_seconds > 0:
        lines.append(
            f"  checkpoint writes in the background: {checkpoint_background_seconds:.1f} s "
            "(overlapped)"
        )
    return "\n".join(lines)
