"""Stop signals, the agreed stop/checkpoint poll, and the main-process decision helper."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from accelerate import Accelerator, debug_launcher

from classifier_training.agreement import FlagAgreement, share_from_main
from classifier_training.checkpoint import CheckpointError
from classifier_training.preemption import (
    EXIT_PREEMPTED,
    LAUNCHER_GONE,
    StopPoll,
    StopSignals,
    _parent_is_launcher,
    ignore_stop_signals,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
SRC = Path(__file__).resolve().parents[1] / "src"


def test_exit_status_is_ex_tempfail() -> None:
    assert EXIT_PREEMPTED == 75


def test_first_signal_sets_the_flag_and_rearms_the_default() -> None:
    lines: list[str] = []
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(write=lines.append) as signals:
        assert signals.requested == ""
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested == "SIGTERM"
        # a second SIGTERM would now take the kernel's default action (kill at once)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) == before
    assert lines == [
        "received SIGTERM: finishing the current batch and writing a checkpoint "
        "(send SIGTERM again to abort at once)"
    ]


def test_launcher_exit_is_a_stop_request_but_never_an_abort() -> None:
    lines: list[str] = []
    with StopSignals(write=lines.append) as signals:
        os.kill(os.getpid(), LAUNCHER_GONE)
        assert signals.requested == "launcher exit"
        os.kill(os.getpid(), LAUNCHER_GONE)  # repeated: ignored
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGINT)  # a user's Ctrl-C is still the *first* stop signal
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert len(lines) == 2 and lines[1].startswith("received SIGINT")


def run_script(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_second_signal_aborts_at_once_even_inside_a_blocking_call() -> None:
    result = run_script(
        """
        import os, signal, threading, time
        from classifier_training.preemption import StopSignals
        with StopSignals() as s:
            os.kill(os.getpid(), signal.SIGTERM)
            print("flag", s.requested, flush=True)
            # the second signal arrives while the main thread blocks in C (like a collective)
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
            threading.Event().wait(60)
            print("not reached", flush=True)
        """
    )
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert result.stdout == "flag SIGTERM\n"
    assert result.stderr.startswith("received SIGTERM: finishing the current batch")


def test_dataloader_workers_ignore_stop_signals() -> None:
    result = run_script(
        """
        import os, signal
        from classifier_training.preemption import ignore_stop_signals
        ignore_stop_signals(0)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        print("alive")
        """
    )
    assert result.returncode == 0 and result.stdout == "alive\n", result.stderr
    assert ignore_stop_signals.__name__  # used as worker_init_fn by data.loaders


def test_launcher_detection_reads_the_parent_command_line(tmp_path: Path) -> None:
    """A process whose command line is "accelerate ... launch ..." counts; this one does not."""
    script = "import time; time.sleep(30)"
    proc = subprocess.Popen(
        ["bash", "-c", f"exec -a accelerate {sys.executable} -c '{script}' launch src/train.py"]
    )
    try:
        for _ in range(200):
            if Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"accelerate"):
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert _parent_is_launcher(proc.pid)
        assert not _parent_is_launcher(os.getpid())  # pytest
    finally:
        proc.kill()
        proc.wait()


def test_parent_death_signal_reaches_a_trainer_started_by_a_launcher(tmp_path: Path) -> None:
    """A launcher killed alone (SIGKILL here) no longer leaves its trainer training."""
    child = textwrap.dedent(
        """
        import sys, time
        from classifier_training.preemption import StopSignals, watch_launcher
        with StopSignals() as s:
            print("armed", watch_launcher(), flush=True)
            for _ in range(600):
                if s.requested:
                    print("stop requested:", s.requested, flush=True)
                    sys.exit(75)
                time.sleep(0.05)
        """
    )
    (tmp_path / "child.py").write_text(child)
    out = tmp_path / "child.out"
    # "torchrun" in the launcher's argv makes the child treat it as a launcher.
    launcher = (
        "import subprocess; "
        f"p = subprocess.Popen([{sys.executable!r}, {str(tmp_path / 'child.py')!r}], "
        f"stdout=open({str(out)!r}, 'w')); p.wait()"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        ["bash", "-c", f'exec -a torchrun {sys.executable} -c "{launcher}"'], env=env
    )
    for _ in range(400):
        if out.exists() and "armed" in out.read_text():
            break
        subprocess.run(["sleep", "0.05"], check=True)
    assert out.read_text().startswith("armed True"), out.read_text()
    proc.kill()
    proc.wait()
    for _ in range(400):
        if "stop requested" in out.read_text():
            break
        subprocess.run(["sleep", "0.05"], check=True)
    assert out.read_text().splitlines()[-1] == "stop requested: launcher exit"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_poll_time_cadence_single_process() -> None:
    clock = FakeClock()
    signals = StopSignals()
    poll = StopPoll(Accelerator(cpu=True), signals, every_minutes=2, clock=clock)
    assert poll.poll() == (False, False)
    clock.now = 119.0
    assert poll.poll() == (False, False)
    clock.now = 120.0
    assert poll.poll() == (False, True)
    poll.checkpoint_written()
    assert poll.poll() == (False, False)
    signals.requested = "SIGTERM"
    assert poll.poll() == (True, False)
    off = StopPoll(Accelerator(cpu=True), StopSignals(), every_minutes=0, clock=clock)
    clock.now = 1e9
    assert off.poll() == (False, False)


def _agreement_job(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    clock = FakeClock()
    signals = StopSignals()
    results = []
    for side in (False, True):
        clock.now = 0.0
        poll = StopPoll(
            accelerator,
            signals,
            every_minutes=1,
            clock=clock,
            agreement=FlagAgreement(accelerator, side_group=side),
        )
        signals.requested = ""
        results.append(poll.poll())
        if rank == 1:
            signals.requested = "SIGTERM"  # only rank 1 was signalled
        results.append(poll.poll())
        signals.requested = ""
        if rank == 0:
            clock.now = 61.0  # only rank 0's clock says a checkpoint is due
        results.append(poll.poll())

    def decide() -> str:
        if accelerator.is_main_process:
            raise CheckpointError("run folder refused on the main process")
        return "unreachable"

    try:
        share_from_main(accelerator, decide)
        outcome = "no error"
    except CheckpointError as err:
        outcome = f"{type(err).__name__}: {err}"
    value = share_from_main(accelerator, lambda: {"rank": accelerator.process_index})
    Path(out, f"rank-{rank}.json").write_text(json.dumps([results, outcome, value]))


def test_two_processes_agree_on_stop_and_cadence_and_share_main_errors(tmp_path: Path) -> None:
    debug_launcher(_agreement_job, args=(str(tmp_path),), num_processes=2)
    expected_polls = [[False, False], [True, False], [False, True]] * 2
    outcome = "CheckpointError: run folder refused on the main process"
    for rank in (0, 1):
        results, got, value = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert results == expected_polls, rank
        assert got == outcome
        assert value == {"rank": 0}  # the main process's result, everywhere
