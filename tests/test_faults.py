"""Fault matrix: the real CLIs under kills, stop signals, a second writer, changed settings,
damaged checkpoints and a dangerous ``--out``.

Every row drives ``python src/train.py``, ``accelerate launch src/train.py``, the Docker
entrypoint's command, ``torchrun`` or ``python -m export`` in a subprocess on a tiny dataset
and asserts the exit status, the first line of the message, and that no earlier output was lost
(the files that existed before the fault are intact, the console lines printed before it are
there). A process is frozen with SIGSTOP at the exact point a row needs (mid-epoch, inside a
checkpoint write, while an export is staged) before the fault is applied, so no row depends on
timing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl_dataset

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BATCHES = 12  # per epoch: 3 classes x 8 train images, batch 2
PROGRESS = re.compile(r"^epoch (\d+)/\d+ batch (\d+)/(\d+) ")
TIMEOUT = 900


def env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT / "src"),  # this checkout first, before any installed copy
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        **extra,
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "data"
    return write_jsonl_dataset(
        root, ("0", "1", "7"), {"train": 8, "valid": 2, "test": 2}, size=(32, 32)
    )


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("--data.root", str(data), "--data.image_size", "32", "--data.batch_size", "2"),
        *("--data.num_workers", "0", "--model.arch", "test_resnet", "--model.pretrained", "false"),
        *("--train.epochs", "2", "--train.output_dir", str(out), "--train.mixed_precision", "no"),
        *("--train.eval_test", "false", "--logging.progress", "lines", "--logging.log_every", "1"),
        *("--hooks.enabled", *extra),
    ]


def launch_cmd(launch: str) -> list[str]:
    """The real command line of each supported launch (the Docker one read from the Dockerfile,
    minus tini, whose ``-g`` the tests reproduce by signalling the process group)."""
    if launch == "python":
        return [sys.executable, "src/train.py"]
    if launch == "accelerate":
        return [str(BIN / "accelerate"), "launch", "src/train.py"]
    if launch == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "src/train.py"]
    assert launch == "docker"
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    entrypoint = json.loads(next(x for x in lines if x.startswith("ENTRYPOINT ")).split(" ", 1)[1])
    assert entrypoint[:3] == ["/usr/bin/tini", "-g", "--"]
    return list(entrypoint[3:])


@dataclass
class Job:
    """A CLI process in its own session, its console captured to files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    @classmethod
    def start(cls, cmd: list[str], logs: Path, name: str, **env_extra: str) -> Job:
        out, err = logs / f"{name}.out", logs / f"{name}.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env(**env_extra), stdout=o, stderr=e, start_new_session=True
            )
        return cls(proc, out, err)

    def trainers(self) -> list[int]:
        """Pids of the processes running src/train.py (the job itself, or its children)."""
        try:
            family = [psutil.Process(self.proc.pid)]
            family += family[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return []

        def is_trainer(p: psutil.Process) -> bool:
            # `python [-u] src/train.py`; launchers mention it further on
            try:
                cmd = p.cmdline()
            except psutil.Error:
                return False
            return "src/train.py" in cmd[1:3] and "torchrun" not in " ".join(cmd[:2])

        def helper(p: psutil.Process) -> bool:
            # a trainer's forked helpers (loader workers, background hooks) share its cmdline
            try:
                parent = p.parent()
            except psutil.Error:
                return False
            return parent is not None and is_trainer(parent)

        return [p.pid for p in family if is_trainer(p) and not helper(p)]

    def pause_when(self, ready: Callable[[], bool], count: int = 1) -> list[int]:
        """SIGSTOP the trainer(s) at the first moment ``ready()`` holds; returns their pids."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            pids = self.trainers()
            if len(pids) >= count:
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                wait_stopped(pids)
                if ready():
                    return pids
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            if self.proc.poll() is not None:
                pytest.fail(f"ended (status {self.proc.returncode}) first:\n{self.console()}")
            time.sleep(0.01)
        pytest.fail("timed out waiting for the pause point")

    def wait(self) -> int:
        return self.proc.wait(timeout=TIMEOUT)

    def console(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def printed(self) -> tuple[str, str]:
        """What the job printed so far: (stdout, stderr)."""
        return self.out.read_text(errors="replace"), self.err.read_text(errors="replace")

    def progress(self) -> tuple[int, int]:
        """(epoch, batch) of the last progress line (stderr), (0, 0) before the first."""
        last = (0, 0)
        for line in self.err.read_text(errors="replace").splitlines():
            m = PROGRESS.match(line)
            if m:
                last = (int(m[1]), int(m[2]))
        return last


def wait_stopped(pids: list[int]) -> None:
    """Return once every thread of every pid is stopped.

    ``kill(SIGSTOP)`` returns before the signal takes effect: a thread inside a syscall (the
    checkpoint writer's fsync or rename) finishes it first. Reading the run folder before then
    would snapshot a state the process is still changing.
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = []
        for pid in pids:
            for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
                with contextlib.suppress(OSError):  # a thread that just ended
                    # "pid (comm) S ...": comm may hold spaces and parentheses
                    states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        if all(s in ("T", "t", "Z", "X") for s in states):
            return
        time.sleep(0.001)
    pytest.fail(f"{pids} did not stop within 60 s of SIGSTOP")


def run_cli(cmd: list[str], **env_extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=TIMEOUT
    )


def first(prefix: str, text: str) -> str:
    """The first console line that starts with ``prefix``."""
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    assert lines, f"no line starting with {prefix!r} in:\n{text}"
    return lines[0]


def snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of a run folder but the lock (which records its last holder)."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def in_flight(name: str) -> bool:
    """A write not finished yet: a staged checkpoint folder or an atomic write's temp file."""
    parts = Path(name).parts
    return any(x.startswith(".tmp-") for x in parts) or (
        parts[-1].startswith(".") and parts[-1].endswith(".tmp")
    )


def assert_kept(
    before: dict[str, str], run_dir: Path, grown: tuple[str, ...] = (), resumed: bool = False
) -> None:
    """Every file of ``before`` is still there, unchanged; ``grown`` files may have been
    appended to or replaced (ledger). ``resumed``: the process ran on after ``before`` was
    taken, so the writes in flight then have been finished (renamed into place)."""
    after = snapshot(run_dir)
    for name, digest in before.items():
        if resumed and in_flight(name):
            continue
        assert name in after, f"{name} was lost"
        if name not in grown:
            assert after[name] == digest, f"{name} changed"


def weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    ledger = json.loads((run_dir / "checkpoints" / "ledger.json").read_text())
    ckpt = run_dir / "checkpoints" / ledger["last"]
    return {
        k: load_file(str(ckpt / f))
        for k, f in (("raw", "model.safetensors"), ("ema", "ema.safetensors"))
    }


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    for kind in ("raw", "ema"):
        assert wa[kind].keys() == wb[kind].keys()
        for key, value in wa[kind].items():
            assert torch.equal(value, wb[kind][key]), (kind, key)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def mid_epoch(job: Job, epoch: int = 2, after: int = 1) -> Callable[[], bool]:
    """Paused inside ``epoch``, past batch ``after``, with at least two batches still to come."""
    return lambda: (lambda e, b: e == epoch and after <= b <= BATCHES - 3)(*job.progress())


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed one must match bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run_cli(launch_cmd("python") + train_args(data, out))
    assert done.returncode == 0, done.stdout + done.stderr
    return out


# ---------------------------------------------------------------------------------------------
# SIGTERM: checkpoint, exit 75, exact resume; a concurrent second run is refused meanwhile


def test_sigterm_mid_epoch_checkpoints_exits_75_and_resumes_exactly(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = Job.start(launch_cmd("python") + train_args(data, run_dir), tmp_path, "first")
    (pid,) = job.pause_when(mid_epoch(job))
    printed_before = job.printed()
    before = snapshot(run_dir)

    # row: a second run into the same folder while the first holds it
    second = run_cli(launch_cmd("python") + train_args(data, run_dir))
    assert second.returncode == 2
    assert first("error:", second.stderr).startswith(
        f"error: {run_dir} is in use by another run (pid {pid} on "
    )
    assert snapshot(run_dir) == before

    # row: SIGTERM mid-epoch
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGCONT)
    assert job.wait() == 75, job.console()
    err = job.err.read_text()
    assert first("received", err) == (
        "received SIGTERM: finishing the current batch and writing a checkpoint "
        "(send SIGTERM again to abort at once)"
    )
    ledger = json.loads((run_dir / "checkpoints" / "ledger.json").read_text())
    ckpt = run_dir / "checkpoints" / ledger["last"]
    assert first("preempted:", err) == (
        f"preempted: stopped by SIGTERM: checkpoint {ckpt} written; resume with --train.resume auto"
    )
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and 0 < state["batches_done"] < BATCHES  # mid-epoch 2
    assert all(now.startswith(b) for now, b in zip(job.printed(), printed_before, strict=True))
    assert_kept(before, run_dir, grown=("checkpoints/ledger.json",), resumed=True)

    resumed = run_cli(launch_cmd("python") + train_args(data, run_dir, "--train.resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert first("resumed from", resumed.stdout).startswith(
        f"resumed from {ckpt} (epoch 2, batch {state['batches_done']}, "
    )
    assert_same_weights(reference, run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1.0, 2.0]


@pytest.mark.parametrize("launch", ["accelerate", "docker", "torchrun"])
def test_sigterm_reaches_the_trainer_in_every_launch(
    launch: str, data: Path, tmp_path: Path
) -> None:
    """accelerate launch: SIGTERM to the launcher alone (it forwards nothing and dies; the
    trainer learns it from the kernel). Docker: tini -g signals the whole process group of
    the entrypoint, whose launcher ignores it. torchrun: the agent forwards it to both
    processes of the group, which agree on the stop."""
    run_dir = tmp_path / "run"
    count = 2 if launch == "torchrun" else 1
    extra_env = {"ACCELERATE_USE_CPU": "1"} if launch == "torchrun" else {}
    if launch == "torchrun":  # ACCELERATE_USE_CPU: a gloo group without CUDA; time to save
        extra_env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "600"
    job = Job.start(launch_cmd(launch) + train_args(data, run_dir), tmp_path, launch, **extra_env)
    pids = job.pause_when(lambda: job.progress()[0] == 1 and job.progress()[1] >= 1, count)
    if launch == "docker":
        os.killpg(job.proc.pid, signal.SIGTERM)
    else:
        os.kill(job.proc.pid, signal.SIGTERM)
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    status = job.wait()
    for pid in pids:  # an orphaned trainer must still finish its checkpoint and exit
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=TIMEOUT)
    err = job.err.read_text()
    ledger = json.loads((run_dir / "checkpoints" / "ledger.json").read_text())
    ckpt = run_dir / "checkpoints" / ledger["last"]
    reason = "launcher exit" if launch == "accelerate" else "SIGTERM"
    assert first("preempted:", err) == (
        f"preempted: stopped by {reason}: checkpoint {ckpt} written; resume with "
        "--train.resume auto"
    )
    expected_status = {"accelerate": -signal.SIGTERM, "docker": 1, "torchrun": 1}[launch]
    assert status == expected_status, err
    if launch == "docker":  # the launcher reports the trainer's status
        assert "returned non-zero exit status 75" in err
    assert (ckpt / "trainer_state.json").is_file() and ckpt.name.startswith("step-")


# ---------------------------------------------------------------------------------------------
# SIGKILL: mid-epoch, inside a checkpoint write, during an export


@pytest.mark.parametrize("where", ["mid-epoch", "checkpoint write"])
def test_sigkill_loses_at_most_the_steps_since_the_last_checkpoint(
    where: str, data: Path, reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    # mid-epoch: one step checkpoint, at update 13 (epoch 2, batch 1), and none after it until
    # the epoch ends, so the pause window is most of epoch 2 whatever the machine's load
    every = "13" if where == "mid-epoch" else "1"
    cmd = launch_cmd("accelerate") + train_args(
        data, run_dir, "--train.checkpoint_every_updates", every
    )
    job = Job.start(cmd, tmp_path, "killed")
    root = run_dir / "checkpoints"

    def writing() -> bool:
        return job.progress()[0] == 2 and any(root.glob(".tmp-step-*"))

    def step_durable() -> bool:
        # mid-epoch: past the step checkpoint of update 13 once its background write (fsync,
        # hashes, rename, ledger) has finished
        ledger = root / "ledger.json"
        return (
            mid_epoch(job, after=2)()
            and not any(root.glob(".tmp-*"))
            and json.loads(ledger.read_text())["last"].startswith("step-")
        )

    job.pause_when(step_durable if where == "mid-epoch" else writing)
    before = snapshot(run_dir)
    printed_before = job.printed()
    last = json.loads((root / "ledger.json").read_text())["last"]
    assert last.startswith("step-" if where == "mid-epoch" else ("step-", "epoch-001"))
    os.killpg(job.proc.pid, signal.SIGKILL)  # the VM is gone: launcher and trainer at once
    assert job.wait() == -signal.SIGKILL
    assert job.printed() == printed_before
    assert_kept(before, run_dir)
    leftovers = sorted(p.name for p in root.glob(".tmp-*"))
    assert bool(leftovers) == (where == "checkpoint write")

    resumed = run_cli(
        launch_cmd("accelerate") + train_args(data, run_dir, "--train.resume", "auto")
    )
    assert resumed.returncode == 0, resumed.stderr
    assert first("resumed from", resumed.stdout).startswith(f"resumed from {root / last} (")
    for name in leftovers:
        assert f"removed {root / name} (a killed write)" in resumed.stdout
    assert not any(root.glob(".tmp-*"))
    assert json.loads((root / "ledger.json").read_text())["last"] == "epoch-002"
    assert_same_weights(reference, run_dir)


def test_sigkill_during_export_keeps_the_previous_bundle(reference: Path, tmp_path: Path) -> None:
    run_dir = copy_run(reference, tmp_path / "run")
    export = [sys.executable, "-m", "export", "--run", str(run_dir), "--verify-images", "2"]
    done = run_cli(export)
    assert done.returncode == 0, done.stderr
    bundle = run_dir / "export"
    before = snapshot(run_dir)

    job = Job.start([*export, "--weights", "raw"], tmp_path, "export")
    for _ in range(int(TIMEOUT / 0.05)):  # freeze it while the new bundle is being staged
        staged = list(run_dir.glob(".tmp-export-*"))
        if staged and any(staged[0].iterdir()):
            os.kill(job.proc.pid, signal.SIGSTOP)
            break
        if job.proc.poll() is not None:
            pytest.fail(job.console())
        time.sleep(0.05)
    os.kill(job.proc.pid, signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL
    assert_kept(before, run_dir)
    info = json.loads((bundle / "export.json").read_text())
    assert info["weights"] == "ema"
    assert (
        hashlib.sha256((bundle / "model.onnx").read_bytes()).hexdigest()
        == (info["model_onnx_sha256"])
    )

    again = run_cli([*export, "--weights", "raw"])
    assert again.returncode == 0, again.stderr
    assert first("exported", again.stdout).startswith("exported test_resnet (3 classes, raw")
    assert not list(run_dir.glob(".tmp-export-*")) and not list(run_dir.glob(".old-export-*"))


# ---------------------------------------------------------------------------------------------
# Resume with a changed setting: refused before anything is written, unless forced


CHANGES = {
    "image size": (["--data.image_size", "48"], "  data.image_size: 32 -> 48"),
    "batch size": (["--data.batch_size", "4"], "  data.batch_size: 2 -> 4"),
    "grad accumulation": (["--train.grad_accum_steps", "2"], "  train.grad_accum_steps: 1 -> 2"),
    "arch": (["--model.arch", "test_vit"], "  model.arch: 'test_resnet' -> 'test_vit'"),
    "class set": ([], "  class map: 3 classes -> 4 classes; added '9'"),
    "dataset": ([], "  dataset train split: 24 images (sha256 "),
    "process count": ([], "  processes: 1 -> 2"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_resume_with_a_changed_setting_is_refused_and_writes_nothing(
    change: str, data: Path, reference: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(reference, tmp_path / "run")
    flags, line = CHANGES[change]
    used = data
    if change in ("class set", "dataset"):
        used = Path(shutil.copytree(data, tmp_path / "data"))
        if change == "class set":
            write_jsonl_dataset(tmp_path / "extra", ("9",), {"train": 2}, size=(32, 32))
            shutil.copy(tmp_path / "extra" / "train" / "c00_000.jpg", used / "train" / "x9.jpg")
            with (used / "train" / "annotations.jsonl").open("a") as f:
                f.write(json.dumps({"image": "x9.jpg", "suffix": "9"}) + "\n")
        else:
            img = used / "train" / "c00_000.jpg"
            img.write_bytes(img.read_bytes() + b"\0")
    before = snapshot(run_dir)
    args = train_args(used, run_dir, "--train.resume", "auto", "--train.epochs", "3", *flags)
    if change == "process count":
        done = run_cli(launch_cmd("torchrun") + args, ACCELERATE_USE_CPU="1")
        assert done.returncode == 1  # torchrun reports its workers' status 2 as a failure
    else:
        done = run_cli(launch_cmd("python") + args)
        assert done.returncode == 2
    ckpt = run_dir / "checkpoints" / "epoch-002"
    assert re.fullmatch(
        rf"error: cannot resume {re.escape(str(ckpt))}: \d setting\(s\) differ from the run "
        "that wrote it:",
        first("error:", done.stderr),
    )
    assert any(x.startswith(line) for x in done.stderr.splitlines()), done.stderr
    assert snapshot(run_dir) == before


def test_forced_resume_is_recorded(data: Path, reference: Path, tmp_path: Path) -> None:
    run_dir = copy_run(reference, tmp_path / "run")
    args = ["--train.resume", "auto", "--train.epochs", "3", "--data.batch_size", "4"]
    done = run_cli(
        launch_cmd("python") + train_args(data, run_dir, *args, "--train.resume_force", "true")
    )
    assert done.returncode == 0, done.stderr
    assert first("warning:", done.stdout) == (
        "warning: --train.resume_force: accepted data.batch_size: 2 -> 4"
    )
    compat = json.loads((run_dir / "checkpoints" / "epoch-003" / "compat.json").read_text())
    assert compat["forced"][0]["changes"] == ["data.batch_size: 2 -> 4"]


# ---------------------------------------------------------------------------------------------
# Damage and dangerous output folders


def test_truncated_checkpoint_is_named_and_fallback_only_when_asked(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(reference, tmp_path / "run")
    weights_file = run_dir / "checkpoints" / "epoch-002" / "ema.safetensors"
    size = weights_file.stat().st_size
    with open(weights_file, "r+b") as f:
        f.truncate(size - 100)
    before = snapshot(run_dir)
    args = train_args(data, run_dir, "--train.resume", "auto", "--train.epochs", "3")
    refused = run_cli(launch_cmd("python") + args)
    assert refused.returncode == 2
    intact = run_dir / "checkpoints" / "epoch-001"
    assert first("error:", refused.stderr) == (
        f"error: the newest checkpoint epoch-002 is damaged: {weights_file}: {size - 100:,} "
        f"bytes, the ledger recorded {size:,} (truncated). The newest intact one is {intact}: "
        f"resume from it with --train.resume {intact} (or --train.resume_fallback true)"
    )
    exported = run_cli(
        [sys.executable, "-m", "export", "--run", str(run_dir), "--checkpoint", "last"]
    )
    assert exported.returncode == 1
    assert first("export failed:", exported.stderr).startswith(
        f"export failed: epoch-002 is damaged: {weights_file}: "
    )
    assert snapshot(run_dir) == before

    fallback = run_cli(
        launch_cmd("python") + args + ["--train.epochs", "2", "--train.resume_fallback", "true"]
    )
    assert fallback.returncode == 0, fallback.stderr
    assert first("resumed from", fallback.stdout) == (
        f"resumed from {intact} (start of epoch 2, {BATCHES} updates; 6 files verified); "
        "skipped damaged: epoch-002"
    )


def test_export_refuses_the_run_folder_and_a_folder_that_is_not_a_bundle(
    reference: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(reference, tmp_path / "run")
    before = snapshot(run_dir)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    export = [sys.executable, "-m", "export", "--run", str(run_dir), "--out"]
    onto_run = run_cli([*export, str(run_dir)])
    assert onto_run.returncode == 1
    assert first("export failed:", onto_run.stderr) == (
        f"export failed: --out {run_dir} is the run folder {run_dir}; pick a new folder or an "
        "existing export bundle"
    )
    onto_busy = run_cli([*export, str(busy)])
    assert onto_busy.returncode == 1
    assert first("export failed:", onto_busy.stderr) == (
        f"export failed: --out {busy} is not empty and not an export bundle (no export.json); "
        "pick a new folder or an existing export bundle"
    )
    assert snapshot(run_dir) == before
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_a_diverged_run_stops_before_checkpointing_nan_weights(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(reference, tmp_path / "run")
    before = snapshot(run_dir)
    args = ["--train.resume", "auto", "--train.epochs", "3", "--optim.lr", "1e30"]
    done = run_cli(
        launch_cmd("python") + train_args(data, run_dir, *args, "--train.resume_force", "true")
    )
    assert done.returncode == 2, done.stdout + done.stderr  # one clear line, as bad input
    assert first("error:", done.stderr).startswith(
        "error: training diverged in epoch 3: the raw and EMA weights hold NaN or inf, so that "
        "checkpoint was not written and the earlier ones are kept."
    )
    assert_kept(before, run_dir, grown=("recipe.yaml",))  # the good epochs stay the checkpoints
    assert json.loads((run_dir / "checkpoints" / "ledger.json").read_text())["last"] == "epoch-002"
