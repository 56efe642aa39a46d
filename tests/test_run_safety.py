"""Run-folder lock, self-verifying checkpoints, resume choice, and resume compatibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator, debug_launcher

from classifier_training.checkpoint import (
    LEDGER,
    MODEL_FILE,
    CheckpointError,
    CheckpointManager,
    Ledger,
    TrainerState,
    check_files,
    load_weights,
    remove_orphans,
)
from classifier_training.compat import (
    COMPAT_FILE,
    IncompatibleResumeError,
    check_resume,
    compare,
    dataset_fingerprint,
    flatten_recipe,
    run_record,
)
from classifier_training.data.index import index_dataset
from classifier_training.recipe import parse_recipe
from classifier_training.resume import choose_resume, clear_checkpoints, plan_start
from classifier_training.run_lock import LOCK_FILE, RunLock, RunLockedError
from conftest import write_jsonl_dataset

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------------------------------------
# Run lock


def test_second_lock_names_the_holder_and_a_released_lock_is_free(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunLock(run) as first:
        assert first.held and (run / LOCK_FILE).is_file()
        with pytest.raises(RunLockedError) as err:
            RunLock(run).acquire()
        msg = str(err.value)
        assert msg.startswith(f"{run} is in use by another run (pid {os.getpid()} on ")
        assert "started 20" in msg and "pick another --train.output_dir" in msg
    with RunLock(run):  # released: free again
        pass


def test_a_run_that_wrote_nothing_leaves_no_lock_behind(tmp_path: Path) -> None:
    fresh = RunLock(tmp_path / "runs" / "new")
    fresh.acquire()
    fresh.release(discard=True)
    assert list(tmp_path.iterdir()) == []  # the folders it created are gone too
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text("{}\n")
    lock = RunLock(existing)
    lock.acquire()
    lock.release(discard=True)
    assert [p.name for p in existing.iterdir()] == ["metrics.jsonl"]
    with RunLock(existing):  # a kept lock file (a run that wrote) stays
        pass
    with RunLock(existing):  # the previous holder released it
        assert (existing / LOCK_FILE).is_file()
    assert (existing / LOCK_FILE).is_file()


def test_a_dead_holder_never_blocks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = textwrap.dedent(
        f"""
        import os
        from classifier_training.run_lock import RunLock
        RunLock({str(run)!r}).acquire()
        print("locked", flush=True)
        os._exit(9)  # dies holding the lock, like a SIGKILLed trainer
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout == "locked\n", done.stderr
    assert json.loads((run / LOCK_FILE).read_text())["pid"] != os.getpid()
    with RunLock(run) as lock:
        assert lock.held
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_unwritable_run_folder_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)  # what a read-only bucket mount answers
    with pytest.raises(CheckpointError, match=rf"cannot write to {tmp_path} as uid \d+"):
        RunLock(tmp_path).acquire()


# ---------------------------------------------------------------------------------------------
# Checkpoints that prove themselves


@pytest.fixture
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def save(
    acc: Accelerator, mgr: CheckpointManager, name: str, epoch: int, value: float | None
) -> Path:
    state = TrainerState(epoch=epoch, updates=epoch * 10, batches_done=0 if value else 3)
    return mgr.save(acc, name, state, torch.nn.Linear(3, 2), value)


def make_run(tmp_path: Path, acc: Accelerator) -> CheckpointManager:
    acc.prepare(torch.nn.Linear(3, 2))
    mgr = CheckpointManager(tmp_path, "val/acc_top1", "max", keep_top_k=2)
    mgr.extra_files = {"compat.json": '{"format": 1}\n'}
    save(acc, mgr, "epoch-001", 1, 0.5)
    save(acc, mgr, "epoch-002", 2, 0.4)
    save(acc, mgr, "step-0000025", 2, None)
    mgr.settle(acc)  # the last write finishes in the background
    return mgr


def test_ledger_records_size_and_sha256_of_every_file(
    tmp_path: Path, accelerator: Accelerator
) -> None:
    make_run(tmp_path, accelerator)
    ledger = Ledger.read(tmp_path / "checkpoints")
    assert ledger is not None and ledger.last == "step-0000025"
    assert set(ledger.files) == {"epoch-001", "epoch-002", "step-0000025"}
    files = ledger.files["step-0000025"]
    on_disk = {p.name for p in (tmp_path / "checkpoints" / "step-0000025").iterdir()}
    assert set(files) == on_disk
    assert {"model.safetensors", "ema.safetensors", "trainer_state.json", "compat.json"} <= on_disk
    for name, rec in files.items():
        path = tmp_path / "checkpoints" / "step-0000025" / name
        assert rec["size"] == path.stat().st_size and len(rec["sha256"]) == 64
    assert check_files(tmp_path / "checkpoints" / "step-0000025") == []


def test_truncated_file_is_named_and_resume_refuses_unless_asked(
    tmp_path: Path, accelerator: Accelerator
) -> None:
    make_run(tmp_path, accelerator)
    newest = tmp_path / "checkpoints" / "step-0000025"
    weights = newest / MODEL_FILE
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    problems = check_files(newest)
    assert problems == [f"{weights}: {size // 2:,} bytes, the ledger recorded {size:,} (truncated)"]
    with pytest.raises(CheckpointError) as err:
        choose_resume("auto", tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"the newest checkpoint step-0000025 is damaged: {weights}: ")
    intact = tmp_path / "checkpoints" / "epoch-002"
    assert f"The newest intact one is {intact}" in msg and "--train.resume_fallback true" in msg
    choice = choose_resume("auto", tmp_path, fallback=True)
    assert choice is not None and choice.path == intact and choice.skipped == ["step-0000025"]
    assert choice.describe().startswith(f"resumed from {intact} (start of epoch 3, 20 updates;")
    # export reads the weights through the same check
    with pytest.raises(CheckpointError, match=r"step-0000025 is damaged: .*truncated"):
        load_weights(newest, "raw")
    # same size, different bytes
    ema = intact / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-1] ^= 0xFF
    ema.write_bytes(bytes(data))
    assert check_files(intact) == [f"{ema}: content differs from the sha256 the ledger recorded"]
    choice = choose_resume("auto", tmp_path, fallback=True)
    assert choice is not None and choice.path.name == "epoch-001"
    (intact.parent / "epoch-001" / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"every checkpoint of .* is damaged"):
        choose_resume("auto", tmp_path, fallback=True)


def test_auto_or_new_and_plan_start(tmp_path: Path, accelerator: Accelerator) -> None:
    assert choose_resume("auto_or_new", tmp_path / "fresh") is None
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        choose_resume("auto", tmp_path / "fresh")
    assert plan_start(tmp_path / "fresh", "", overwrite=False, fallback=False) is None
    make_run(tmp_path, accelerator)
    choice = choose_resume("auto_or_new", tmp_path)
    assert choice is not None and choice.path.name == "step-0000025"
    assert choice.describe() == (
        f"resumed from {choice.path} (epoch 3, batch 3, 20 updates; 5 files verified)"
    )
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        plan_start(tmp_path, "", overwrite=False, fallback=False)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert plan_start(tmp_path, "", overwrite=True, fallback=False) is None
    assert (tmp_path / "checkpoints").exists()  # deciding deletes nothing
    assert clear_checkpoints(tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert not clear_checkpoints(tmp_path)


def test_orphan_temp_folders_are_removed(tmp_path: Path, accelerator: Accelerator) -> None:
    make_run(tmp_path, accelerator)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-0000030").mkdir()
    (root / ".tmp-step-0000030" / "model.safetensors").write_bytes(b"partial")
    (root / f".{LEDGER}.tmp").write_text("{")
    assert remove_orphans(tmp_path) == [f".{LEDGER}.tmp", ".tmp-step-0000030"]
    assert sorted(p.name for p in root.iterdir()) == [
        "epoch-001",
        "epoch-002",
        LEDGER,
        "step-0000025",
    ]


def _two_process_save(out: str, delay_rank1: bool) -> None:
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(3, 2))
    rank = accelerator.process_index
    if delay_rank1 and rank == 1:
        save_state = accelerator.save_state

        def slow_save_state(path: str) -> None:
            time.sleep(1.5)  # rank 0 would rename the folder meanwhile without a barrier
            save_state(path)

        accelerator.save_state = slow_save_state  # type: ignore[method-assign]
    mgr = CheckpointManager(Path(out), "val/acc_top1", "max", keep_top_k=1)
    mgr.save(accelerator, "epoch-001", TrainerState(epoch=1, updates=5), None, 0.5, durable=True)
    report = {
        "best": str(mgr.best_path),
        "last": str(mgr.last_path),
        "ledger": mgr.ledger.to_json(),
    }
    Path(out, f"rank-{rank}.json").write_text(json.dumps(report))


def test_two_processes_hold_the_same_ledger_and_every_rng_file_is_in_place(
    tmp_path: Path,
) -> None:
    """issue 9: the ledger was updated on the main process only, and no barrier separated
    the other processes' save_state from the main process's rename."""
    debug_launcher(_two_process_save, args=(str(tmp_path), True), num_processes=2)
    r0 = json.loads((tmp_path / "rank-0.json").read_text())
    r1 = json.loads((tmp_path / "rank-1.json").read_text())
    assert r1 == r0
    assert r1["best"] == str(tmp_path / "checkpoints" / "epoch-001")
    ckpt = tmp_path / "checkpoints" / "epoch-001"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    assert check_files(ckpt) == []


# ---------------------------------------------------------------------------------------------
# Resume compatibility


def recipe_for(data: Path, *extra: str) -> object:
    return parse_recipe(
        ["--data.root", str(data), "--model.arch", "test_resnet", "--data.image_size", "32", *extra]
    )


def record_for(data: Path, *extra: str, processes: int = 1) -> dict[str, object]:
    recipe = recipe_for(data, *extra)
    index = index_dataset(data)
    return run_record(recipe, index, num_processes=processes, mixed_precision="no")  # type: ignore[arg-type]


def test_flattened_recipe_has_one_key_per_leaf(tmp_path: Path) -> None:
    flat = flatten_recipe(recipe_for(tmp_path, "--optim.lr", "0.01"))  # type: ignore[arg-type]
    assert flat["optim.lr"] == 0.01 and flat["data.image_size"] == 32
    assert flat["optim.betas"] == [0.9, 0.999]
    assert isinstance(flat["data.sampler_weights"], dict)  # dict fields are leaves


def test_dataset_fingerprint_sees_a_changed_image_and_ignores_a_move(tmp_path: Path) -> None:
    data = write_jsonl_dataset(tmp_path / "a")
    fp = dataset_fingerprint(index_dataset(data))
    assert set(fp) == {"train", "val", "test"} and fp["train"]["images"] == 20
    moved = tmp_path / "moved"
    data.rename(moved)
    assert dataset_fingerprint(index_dataset(moved)) == fp
    img = moved / "train" / "c00_000.jpg"
    img.write_bytes(img.read_bytes() + b"\0")
    changed = dataset_fingerprint(index_dataset(moved))
    assert changed["train"] != fp["train"] and changed["val"] == fp["val"]


def test_safe_changes_pass_and_unsafe_ones_are_listed(tmp_path: Path) -> None:
    data = write_jsonl_dataset(tmp_path / "d")
    base = record_for(data)
    safe = record_for(
        data,
        "--train.epochs",
        "7",
        "--train.early_stop_patience",
        "3",
        "--hooks.enabled",
        "--logging.log_every",
        "5",
        "--data.num_workers",
        "0",
        "--train.resume",
        "auto",
    )
    assert compare(base, safe) == ([], [])
    unsafe = record_for(data, "--data.image_size", "48", "--data.batch_size", "8", processes=2)
    changes, _ = compare(base, unsafe)
    assert changes == [
        "data.batch_size: 64 -> 8",
        "data.image_size: 32 -> 48",
        "processes: 1 -> 2",
    ]
    other = write_jsonl_dataset(tmp_path / "e", classes=("0", "00", "1", "10", "7"))
    changes, _ = compare(base, record_for(other))
    assert changes[0] == "class map: 5 classes -> 5 classes; added '7'; removed '2'"
    assert changes[1].startswith("dataset train split: 20 images (sha256 ")
    newer = dict(base, code_version={"package": "9.9.9"})
    assert compare(base, newer)[1][0].startswith("code version: ")


def test_check_resume_refuses_reads_only_and_force_records(tmp_path: Path) -> None:
    data = write_jsonl_dataset(tmp_path / "d")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    saved = record_for(data, processes=2)
    (ckpt / COMPAT_FILE).write_text(json.dumps(saved))
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    current = record_for(data, "--data.image_size", "48")
    state = TrainerState(epoch=2, batches_done=3)
    with pytest.raises(IncompatibleResumeError) as err:
        check_resume(ckpt, current, state, force=False)
    lines = str(err.value).splitlines()
    assert lines[0] == f"cannot resume {ckpt}: 2 setting(s) differ from the run that wrote it:"
    assert lines[1:3] == ["  data.image_size: 32 -> 48", "  processes: 2 -> 1"]
    assert "Nothing in the run folder was changed" in lines[3]
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before
    result = check_resume(ckpt, current, state, force=True)
    assert result.record["forced"][0]["changes"] == [x.strip() for x in lines[1:3]]
    assert result.next_epoch_boundary
    assert "skipping the rest of epoch 3" in result.warnings[-1]
    at_boundary = check_resume(ckpt, current, TrainerState(epoch=2), force=True)
    assert not at_boundary.next_epoch_boundary
    (ckpt / COMPAT_FILE).unlink()
    old = check_resume(ckpt, current, state, force=False)
    assert "written by an older version" in old.warnings[0]


def _overwrite_job(data: str, out: str) -> None:
    from accelerate import PartialState

    import classifier_training.run_folder as run_folder
    from classifier_training.engine.setup import setup

    calls: list[int] = []
    real = run_folder.clear_checkpoints

    def recorded(*args: object, **kwargs: object) -> object:
        calls.append(PartialState().process_index)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    run_folder.clear_checkpoints = recorded  # type: ignore[assignment]
    recipe = parse_recipe(
        [
            *("--data.root", data, "--data.image_size", "32", "--data.num_workers", "0"),
            *("--model.arch", "test_resnet", "--model.pretrained", "false"),
            *("--train.output_dir", out, "--train.overwrite", "true", "--hooks.enabled"),
        ]
    )
    run, _ = setup(recipe)
    try:
        Path(out, f"calls-{run.accelerator.process_index}.json").write_text(json.dumps(calls))
    finally:
        run.ctx.background.close()  # its worker process would keep this rank from exiting
        run.guard.close()


def test_overwrite_deletes_once_on_the_main_process_after_the_group_exists(
    tmp_path: Path,
) -> None:
    """issue 9: --train.overwrite deleted the old checkpoints on every rank before the
    Accelerator existed."""
    data = write_jsonl_dataset(tmp_path / "d", ("0", "1"), {"train": 2, "valid": 1, "test": 1})
    out = tmp_path / "run"
    (out / "checkpoints" / "epoch-001").mkdir(parents=True)
    (out / "checkpoints" / LEDGER).write_text('{"monitor": "m", "mode": "max"}')
    debug_launcher(_overwrite_job, args=(str(data), str(out)), num_processes=2)
    assert json.loads((out / "calls-0.json").read_text()) == [0]
    assert json.loads((out / "calls-1.json").read_text()) == []
    assert not (out / "checkpoints").exists()
