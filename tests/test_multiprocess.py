"""The real multi-process launch on this CPU machine: the README's commands, run as written.

Each command comes from the README's "Several GPUs or machines" section and runs from the
repository root (``accelerate``/``torchrun`` are this venv's), with small-data flags appended
(later flags win): test_resnet at 32 px on a 4-class dataset, 2 epochs, and the quick start's
defaults otherwise (test split, every hook, the export). The only other change: the two-machine
commands get a free port instead of 29500, which other tests on a shared machine may hold.

Checked for ``accelerate launch`` and ``torchrun``: the group is killed with SIGKILL (every
process of it) right after its first checkpoint, and ``--train.resume auto`` takes the run to its
end; the run folder then holds one set of outputs; the validation and test metrics equal a
single-process evaluation of the same weights (12 samples in batches of 4 over 2 processes, so
Accelerate pads one process and every sample must still count once). The two-machine rendezvous
trains to the end, uninterrupted, and all three runs end with the same weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import psutil
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from classifier_training.checkpoint import LEDGER, Ledger, load_weights
from classifier_training.data.imbalance import class_counts, inverse_frequency_weights
from classifier_training.data.loaders import build_loaders, load_index
from classifier_training.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from classifier_training.evaluation import evaluate
from classifier_training.model import create_model
from classifier_training.optim import build_criterion
from classifier_training.recipe import load_recipe
from classifier_training.runtime import resolve_mixed_precision
from conftest import write_jsonl_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A healthy launch takes ~40 s on the 2-core CI machine; a loaded one may take several times that.
LAUNCH_TIMEOUT_S = 900
CLASSES = ("0", "00", "1", "7")
# What launchers and an earlier `accelerate launch` could leave in the environment.
LAUNCH_VARS = re.compile(
    r"(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|ROLE_RANK|MASTER_ADDR|MASTER_PORT"
    r"|OMP_NUM_THREADS|ACCELERATE_.*|TORCHELASTIC_.*|PMI_.*|OMPI_.*|MV2_.*)"
)


def readme_commands() -> dict[str, list[list[str]]]:
    """The launch commands of the README's "Several GPUs or machines" section, by launcher.

    ``two_machines`` are the ``--num_machines`` commands, in machine-rank order.
    """
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.split(r"\n##+ ", text.split("### Several GPUs or machines\n", 1)[1])[0]
    commands: dict[str, list[list[str]]] = {"accelerate": [], "torchrun": [], "two_machines": []}
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            argv = shlex.split(line)
            kind = "two_machines" if "--num_machines" in argv else argv[0]
            commands[kind].append(argv)
    assert [len(v) for v in commands.values()] == [1, 1, 2], commands
    return commands


def small_data_flags(data: Path, out: Path) -> list[str]:
    return [
        "--data.root", str(data), "--data.image_size", "32", "--data.batch_size", "4",
        "--model.arch", "test_resnet", "--train.epochs", "2", "--train.output_dir", str(out),
        "--export.verify_images", "4", "--logging.progress", "lines",
    ]  # fmt: skip


def runnable(argv: list[str], *extra: str, port: int | None = None) -> list[str]:
    """``argv`` with this venv's launcher, ``extra`` appended and, if given, another port."""
    argv = [str(BIN / argv[0]), *argv[1:], *extra]
    if port is not None:
        at = argv.index("--main_process_port") + 1
        argv[at] = str(port)
    return argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_env(tmp: Path) -> dict[str, str]:
    """A fresh shell's environment: no launcher variables, no user accelerate config."""
    env = {k: v for k, v in os.environ.items() if not LAUNCH_VARS.fullmatch(k)}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")])),
        HF_HOME=str(tmp / "hf-home"),  # accelerate reads its default config from here
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a launcher and every process under it.

    torchrun starts its workers in sessions of their own, so killing the launcher's process group
    would leave them running; collect the whole tree first, then kill it. A launcher already
    waited for is left alone: its pid may belong to another process by now.
    """
    if proc.returncode is not None:
        return
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(tree[1:], timeout=30)


class Launch:
    """A command started from the repository root, its output in a log file; killed with its
    whole process tree when the ``with`` block ends (so a failed test leaves no worker behind)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.log = argv, log
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=fh)

    def __enter__(self) -> Launch:
        return self

    def __exit__(self, *exc: object) -> None:
        kill_tree(self.proc)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{shlex.join(self.argv)} ran past {timeout} s:\n{self.output()[-4000:]}")

    def wait_ok(self) -> str:
        rc = self.wait()
        assert rc == 0, f"{shlex.join(self.argv)} exited {rc}:\n{self.output()[-6000:]}"
        return self.output()


def run(argv: list[str], env: dict[str, str], log: Path) -> str:
    with Launch(argv, env, log) as launch:
        return launch.wait_ok()


def kill_after_first_checkpoint(argv: list[str], env: dict[str, str], run_dir: Path) -> None:
    """Start the run, SIGKILL its whole group as soon as a checkpoint is listed in the ledger."""
    ledger = run_dir / "checkpoints" / LEDGER
    with Launch(argv, env, run_dir.parent / f"{run_dir.name}-killed.log") as launch:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not ledger.exists():
            if launch.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no checkpoint before the run ended:\n{launch.output()[-4000:]}")
            time.sleep(0.05)
        kill_tree(launch.proc)
    # Killed in the middle (usually right after the first update): nothing of the run's end.
    assert json.loads(ledger.read_text())["last"] != "epoch-002"
    assert not (run_dir / "test_metrics.json").exists()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "jerseys"
    write_jsonl_dataset(root, CLASSES, {"train": 10, "valid": 3}, size=(40, 32), metadata=True)
    # test images of another size, so that the test split is not a copy of the val split
    return write_jsonl_dataset(root, CLASSES, {"test": 3}, size=(36, 44), metadata=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return launch_env(tmp_path_factory.mktemp("env"))


def killed_and_resumed(
    launcher: str, data: Path, env: dict[str, str], tmp: Path
) -> tuple[Path, str]:
    (command,) = readme_commands()[launcher]
    run_dir = tmp / "run"
    argv = runnable(command, *small_data_flags(data, run_dir))
    kill_after_first_checkpoint([*argv, "--train.checkpoint_every_updates", "1"], env, run_dir)
    output = run([*argv, "--train.resume", "auto"], env, tmp / "resumed.log")
    return run_dir, output


@pytest.fixture(scope="module")
def accelerate_run(
    tiny_data: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    return killed_and_resumed("accelerate", tiny_data, env, tmp_path_factory.mktemp("acc"))


@pytest.fixture(scope="module")
def torchrun_run(
    tiny_data: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    return killed_and_resumed("torchrun", tiny_data, env, tmp_path_factory.mktemp("torchrun"))


@pytest.fixture(scope="module")
def two_machine_run(
    tiny_data: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("two-machines")
    run_dir, port = tmp / "run", free_port()
    flags = small_data_flags(tiny_data, run_dir)
    machines = [runnable(argv, *flags, port=port) for argv in readme_commands()["two_machines"]]
    with (
        Launch(machines[0], env, tmp / "machine-0.log") as m0,
        Launch(machines[1], env, tmp / "machine-1.log") as m1,
    ):
        return run_dir, m0.wait_ok() + m1.wait_ok()


def check_one_set_of_outputs(run_dir: Path, output: str) -> None:
    """One run's outputs, written once: no second run's files, no leftovers of the kill."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert sorted(p.name for p in (run_dir / "epochs").iterdir()) == ["001", "002"]
    ledger = Ledger.read(run_dir / "checkpoints")
    assert ledger is not None and ledger.last == "epoch-002"
    kept = {LEDGER, ledger.last, *(e.name for e in ledger.best)}
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == kept  # no .tmp-* left
    for name in kept - {LEDGER}:
        ckpt = run_dir / "checkpoints" / name
        assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {
            "random_states_0.pkl",
            "random_states_1.pkl",
        }, f"{ckpt}: every process's RNG state"
    export = json.loads((run_dir / "export" / "export.json").read_text())
    assert export, "the export bundle was written"
    assert (run_dir / "export" / "model.onnx").is_file()
    # the main process alone prints: each epoch's summary and the test line appear once
    assert len(re.findall(r"^epoch 2 \| train loss", output, flags=re.M)) == 1
    assert len(re.findall(r"^test \(", output, flags=re.M)) == 1


def single_process_evaluation(
    run_dir: Path, split: str, ckpt: Path, weights: Literal["raw", "ema"], prepared: bool
) -> dict[str, float]:
    """One process evaluates ``weights`` of ``ckpt`` on ``split`` of the run's recipe.

    ``prepared``: through an Accelerate-prepared model in the run's training precision (as the
    run evaluates ``val_raw``); else a plain fp32 model (as the run evaluates EMA and test).
    One thread, as each of the run's processes: bf16 results may depend on the thread count.
    """
    AcceleratorState._reset_state(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = load_recipe(run_dir / "recipe.yaml")
        index = load_index(recipe.data)
        names = sorted(index.class_to_idx, key=index.class_to_idx.__getitem__)
        loaders = build_loaders(recipe.data, index, jpeg_p=0.0, jpeg_quality=(95, 95), seed=0)
        loader = loaders.val if split == "val" else loaders.test
        assert loader is not None
        counts = class_counts(index.train.targets, len(names))
        criterion = build_criterion(recipe.loss, inverse_frequency_weights(counts))
        precision, _ = resolve_mixed_precision(recipe.train.mixed_precision)
        accelerator = Accelerator(cpu=True, mixed_precision=precision if prepared else "no")
        assert accelerator.num_processes == 1
        net = create_model(recipe.model, len(names), pretrained=False)
        net.load_state_dict(load_weights(ckpt, weights))
        if prepared:
            net = accelerator.prepare(net)
        prefix = {"val": f"val_{weights}", "test": "test"}[split]
        result = evaluate(
            net, accelerator.prepare(loader), accelerator, criterion, names, split=split,
            weights=weights, prefix=prefix, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            channels_last=False,
        )  # fmt: skip
        assert result.indices.tolist() == list(range(len(loader.dataset))), "each sample once"
        return result.metrics
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)


def assert_same_metrics(run: dict[str, float], single: dict[str, float]) -> None:
    """Every metric the run recorded for these weights equals the single-process one."""
    assert {k for k in single if "/acc_class/" not in k} <= set(run)
    for key, value in single.items():
        if key in run:  # metrics.jsonl keeps per-class accuracy of the selected weights only
            assert run[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def check_metrics_equal_single_process(run_dir: Path) -> None:
    """The 2-process val (raw weights) and test metrics equal one process on the same weights."""
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    ckpt = run_dir / "checkpoints" / "epoch-002"
    assert_same_metrics(last, single_process_evaluation(run_dir, "val", ckpt, "raw", True))
    test = json.loads((run_dir / "test_metrics.json").read_text())
    best = Path(test["checkpoint"])
    assert_same_metrics(test, single_process_evaluation(run_dir, "test", best, "ema", False))


def test_accelerate_launch_two_processes_resume_after_sigkill(
    accelerate_run: tuple[Path, str],
) -> None:
    run_dir, output = accelerate_run
    assert "resumed from" in output
    check_one_set_of_outputs(run_dir, output)
    check_metrics_equal_single_process(run_dir)


def test_torchrun_two_processes_resume_after_sigkill(torchrun_run: tuple[Path, str]) -> None:
    run_dir, output = torchrun_run
    assert "resumed from" in output
    check_one_set_of_outputs(run_dir, output)
    check_metrics_equal_single_process(run_dir)


def test_two_machines_on_one_host(two_machine_run: tuple[Path, str]) -> None:
    run_dir, output = two_machine_run
    check_one_set_of_outputs(run_dir, output)
    check_metrics_equal_single_process(run_dir)


def test_ema_validation_equals_a_single_process_fp32_evaluation(
    accelerate_run: tuple[Path, str],
) -> None:
    run_dir, _ = accelerate_run
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    ckpt = run_dir / "checkpoints" / "epoch-002"
    assert_same_metrics(last, single_process_evaluation(run_dir, "val", ckpt, "ema", False))


def test_every_launch_trains_the_same_weights(
    accelerate_run: tuple[Path, str],
    torchrun_run: tuple[Path, str],
    two_machine_run: tuple[Path, str],
) -> None:
    """Two processes are two processes, whichever launcher; a kill and resume changes nothing."""
    runs = [r for r, _ in (accelerate_run, torchrun_run, two_machine_run)]
    ckpts = [r / "checkpoints" / "epoch-002" for r in runs]
    for kind in ("raw", "ema"):
        reference = load_weights(ckpts[2], kind)  # the uninterrupted run
        for ckpt in ckpts[:2]:
            other = load_weights(ckpt, kind)
            assert other.keys() == reference.keys()
            for key, tensor in reference.items():
                assert torch.equal(other[key], tensor), (ckpt, kind, key)


def test_accelerate_launch_without_multi_gpu_is_refused(
    tiny_data: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """Two machines without --multi_gpu: a rank-less process that stops before training, saying
    the fix (``--cpu --num_processes 2`` exports the same environment, see test_distributed)."""
    launch = ["--num_machines", "2", "--machine_rank", "0", "--main_process_ip", "127.0.0.1"]
    argv = [str(BIN / "accelerate"), "launch", *launch, "--main_process_port", str(free_port())]
    argv += ["src/train.py", "--recipe", "recipes/quickstart.yaml"]
    argv += small_data_flags(tiny_data, tmp_path / "run")
    with Launch(argv, env, tmp_path / "refused.log") as refused:
        assert refused.wait() != 0
    output = refused.output()
    assert "error: accelerate launch started this script as a single process" in output
    assert "Add --multi_gpu" in output
    assert "returned non-zero exit status 2" in output  # the script's clean refusal
    assert not (tmp_path / "run" / "checkpoints").exists()


TIMEOUT_PROBE = """
import sys, time
from pathlib import Path
from classifier_training.recipe import parse_recipe
from classifier_training.runtime import build_accelerator

recipe = parse_recipe(["--train.collective_timeout_minutes", "0.05"])  # 3 s
accelerator, _ = build_accelerator(recipe, Path(sys.argv[1]))
if accelerator.is_main_process:
    time.sleep(15)  # long main-only work
try:
    accelerator.wait_for_everyone()
    print(accelerator.process_index, "waited", flush=True)
except RuntimeError as err:
    print(accelerator.process_index, "gave up:", err, flush=True)
"""


def test_the_recipe_timeout_bounds_the_wait_at_a_barrier(
    env: dict[str, str], tmp_path: Path
) -> None:
    """train.collective_timeout_minutes reaches the process group a real launcher forms.

    (``debug_launcher`` forms the group itself, without it; hence a launch here.)
    """
    probe = tmp_path / "probe.py"
    probe.write_text(TIMEOUT_PROBE)
    argv = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(probe),
        str(tmp_path),
    ]
    with Launch(argv, env, tmp_path / "probe.log") as launch:
        launch.wait()
    output = launch.output()
    assert re.search(r"^1 gave up: .*Timed out waiting 3000ms", output, flags=re.M), output
