"""Graceful preemption: on SIGTERM or SIGINT finish the batch, checkpoint, exit 75.

What the trainer does with a stop signal (``docker stop``, a GCE/Vertex preemption, Ctrl-C)::

    1st SIGTERM/SIGINT  -> the handler only sets a flag (and prints one line); the loop polls it
                           after each optimizer update, the processes agree (an OR over all of
                           them), every process writes its part of a step checkpoint, and the
                           trainer exits with EXIT_PREEMPTED = 75 (EX_TEMPFAIL, sysexits.h:
                           "temporary failure, try again": the run is resumable)
    2nd SIGTERM/SIGINT  -> the kernel's default action: the process dies at once, even inside a
                           collective or a long C call (the first signal re-arms SIG_DFL)

How the signal reaches the trainer in each launch (read from accelerate 1.15 / torch 2.14):

- ``python src/train.py``: directly.
- ``torchrun`` and ``accelerate launch --multi_gpu`` (torch's elastic agent): the agent traps
  SIGTERM/SIGINT/SIGHUP/SIGQUIT, sends the same signal to each worker's process group
  (``os.killpg``; workers run in their own sessions), waits ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``
  (default 30 s), then SIGKILLs. Exactly one signal per worker.
- ``accelerate launch`` with one process (``simple_launcher``): the launcher forwards nothing
  and dies on SIGTERM. So a trainer started by a launcher asks the kernel for SIGUSR2 when its
  parent dies (``prctl(PR_SET_PDEATHSIG)``) and treats it as a stop request that is never an
  abort: a launcher killed alone no longer leaves an orphan that keeps training. A terminal's
  Ctrl-C reaches launcher and trainer together (one process group).
- Docker: the image runs ``tini -g`` as PID 1 (signals go to the child's whole process group)
  and execs ``accelerate launch`` with SIGTERM/SIGINT ignored, so the single-process launcher
  survives to wait for its trainer (the trainer installs its own handlers; ignored
  dispositions survive exec, handlers do not).

DataLoader workers ignore both signals (:func:`ignore_stop_signals` is their
``worker_init_fn``): a group-wide signal must not kill the batch being finished. They still exit
when the trainer closes its loaders or dies (PyTorch's worker watchdog).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from classifier_training.agreement import FlagAgreement

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit status of a trainer stopped by SIGTERM/SIGINT after writing its checkpoint."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LAUNCHER_GONE = signal.SIGUSR2
"""Delivered by the kernel when the launcher that started this trainer dies."""

_PR_SET_PDEATHSIG = 1
_LAUNCHERS = ("torchrun", "torch.distributed.run", "torch.distributed.launch")


class PreemptedError(Exception):
    """The loop stopped on a signal after its checkpoint was written."""

    def __init__(self, reason: str, checkpoint: Path | None) -> None:
        self.reason = reason
        self.checkpoint = checkpoint
        where = f"checkpoint {checkpoint} written" if checkpoint else "no checkpoint written"
        super().__init__(f"stopped by {reason}: {where}")


class StopSignals:
    """Turns the first SIGTERM/SIGINT into a flag; a second one kills the process at once.

    Use as a context manager around the training job (main thread only); the previous handlers
    are restored on exit.
    """

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self.requested = ""
        """Name of the first stop signal received ('' while none)."""
        self._write = write or _stderr
        self._previous: dict[int, Any] = {}
        self._armed = False  # a stop signal arrived: the next one aborts

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: SIGTERM/SIGINT will not stop training cleanly")
            return
        for sig in (*STOP_SIGNALS, LAUNCHER_GONE):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == LAUNCHER_GONE:
            if not self.requested:
                self.requested = "launcher exit"
                self._write("the launcher exited: finishing the batch and writing a checkpoint")
            return
        name = signal.Signals(signum).name
        if self._armed:  # only reachable if SIG_DFL could not take over
            self._write(f"second {name}: aborting now")
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.requested, self._armed = name, True
        # The next SIGTERM/SIGINT takes the kernel's default action: no Python code has to run,
        # so it works even while this process waits in a collective or a long C call.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        self._write(
            f"received {name}: finishing the current batch and writing a checkpoint "
            f"(send {name} again to abort at once)"
        )


def _stderr(line: str) -> None:
    # os.write, not print: a handler may interrupt a print in progress on the same stream.
    os.write(2, (line + "\n").encode())


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGTERM/SIGINT to the trainer."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _parent_is_launcher(ppid: int) -> bool:
    try:
        argv = Path(f"/proc/{ppid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [os.path.basename(a.decode(errors="replace")) for a in argv]
    text = " ".join(words)
    return ("accelerate" in words and "launch" in words) or any(x in text for x in _LAUNCHERS)


def watch_launcher() -> bool:
    """Ask for LAUNCHER_GONE when the parent launcher dies (Linux); True if armed.

    Only when the parent is ``accelerate launch``/``torchrun``: a shell parent that exits must
    not stop a ``nohup python src/train.py &``.
    """
    ppid = os.getppid()
    if not _parent_is_launcher(ppid):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(LAUNCHER_GONE), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != ppid:  # the launcher died before prctl took effect
        os.kill(os.getpid(), LAUNCHER_GONE)
    return True


class StopPoll:
    """After each optimizer update: should every process stop, or checkpoint now?

    ``poll()`` returns ``(stop, checkpoint_due)``, identical on every process: a stop signal seen
    by any process stops all of them, and the time-based cadence (``every_minutes`` since the
    last checkpoint of any kind, 0 = off) is agreed the same way, so all processes enter
    ``save_state`` together.
    """

    def __init__(
        self,
        accelerator: Any,
        signals: StopSignals,
        every_minutes: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        agreement: FlagAgreement | None = None,
    ) -> None:
        self.signals = signals
        self.every_s = max(0.0, every_minutes) * 60.0
        self.clock = clock
        self.agreement = agreement or FlagAgreement(accelerator)
        self.last = clock()

    def poll(self) -> tuple[bool, bool]:
        due = self.every_s > 0 and self.clock() - self.last >= self.every_s
        stop, due = self.agreement.any(bool(self.signals.requested), due)
        return stop, due

    def checkpoint_written(self) -> None:
        """Restart the time cadence (call after every checkpoint, epoch-end ones included)."""
        self.last = self.clock()
