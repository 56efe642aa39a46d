"""Library pieces of the engine, each alone: schedule, loss, metrics, checkpoints, precision."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from classifier_training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointWriteError,
    TrainerState,
    load_weights,
    resolve_checkpoint,
    verify_files,
)
from classifier_training.metrics import classification_metrics
from classifier_training.optim import (
    build_criterion,
    build_optimizer,
    build_scheduler,
    updates_per_epoch,
)
from classifier_training.recipe import LossConfig, OptimConfig, ScheduleConfig, TrainConfig
from classifier_training.resume import find_resume_checkpoint
from classifier_training.runtime import exact_fp32, require_cuda, resolve_mixed_precision


@pytest.fixture
def accelerator() -> Accelerator:
    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(True)


def lrs(cfg: ScheduleConfig, lr: float, epochs: int, upe: int) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(cfg, opt, lr=lr, epochs=epochs, updates_per_epoch=upe)
    out = []
    for n in range(epochs * upe + 1):
        sched.step_update(n)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_schedule_warmup_then_cosine_per_update() -> None:
    lr, epochs, upe = 5e-4, 10, 4
    values = lrs(
        ScheduleConfig(warmup_epochs=5, warmup_lr_factor=1e-3, min_lr_factor=0.05), lr, epochs, upe
    )
    warm = 20
    assert values[0] == pytest.approx(lr * 1e-3)
    # linear warmup: the midpoint is halfway between start and peak
    assert values[10] == pytest.approx(lr * 1e-3 + (lr - lr * 1e-3) * 10 / warm)
    assert values[warm] == pytest.approx(lr)  # peak reached exactly (warmup_prefix)
    total = epochs * upe
    n = 30
    expected = lr * 0.05 + 0.5 * (lr - lr * 0.05) * (
        1 + math.cos(math.pi * (n - warm) / (total - warm))
    )
    assert values[n] == pytest.approx(expected)
    assert values[total] == pytest.approx(lr * 0.05)
    assert all(b <= a + 1e-12 for a, b in zip(values[warm:], values[warm + 1 :], strict=False))


def test_short_run_still_warms_up() -> None:
    values = lrs(ScheduleConfig(warmup_epochs=5), 1e-3, epochs=2, upe=3)
    assert values[0] < values[3] < values[5]  # warmup spans the whole short run
    assert max(values) <= 1e-3 + 1e-12


def test_updates_per_epoch_counts_partial_window() -> None:
    assert updates_per_epoch(10, 1) == 10
    assert updates_per_epoch(10, 4) == 3
    assert updates_per_epoch(0, 4) == 1


def test_criterion_weights_and_smoothing() -> None:
    w = torch.tensor([0.5, 1.5])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    crit = build_criterion(LossConfig(class_weights="inverse", label_smoothing=0.1), w)
    ref = torch.nn.functional.cross_entropy(logits, y, weight=w, label_smoothing=0.1)
    assert float(crit(logits, y)) == pytest.approx(float(ref))
    plain = build_criterion(LossConfig(class_weights="none", label_smoothing=0.0), w)
    assert float(plain(logits, y)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, y))
    )


def test_optimizer_adamw_settings() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = build_optimizer(OptimConfig(lr=1e-3, weight_decay=0.1), model)
    assert isinstance(opt, torch.optim.AdamW)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1]  # biases and norm weights are not decayed


def test_metrics_micro_top5_per_class() -> None:
    names = ["0", "00", "1", "10", "2", "3"]
    logits = torch.eye(6)[[0, 1, 2, 3, 4, 0]]  # last sample (class 5) predicted as 0
    logits[5, 5] = 0.5  # class 5 ranks second -> top-5 hit
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    m = classification_metrics(logits, targets, names, "val")
    assert m["val/acc_top1"] == pytest.approx(5 / 6)  # micro, not macro
    assert m["val/acc_top5"] == pytest.approx(1.0)
    assert m["val/acc_class/3"] == pytest.approx(0.0)
    assert m["val/acc_class/0"] == pytest.approx(1.0)
    # a class absent from the targets has no per-class key
    m2 = classification_metrics(logits[:5], targets[:5], names, "val")
    assert "val/acc_class/3" not in m2 and m2["val/acc_top1"] == pytest.approx(1.0)


def test_mixed_precision_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("classifier_training.runtime.cpu_supports_bf16", lambda: True)
    t4, a100 = (7, 5), (8, 0)
    assert resolve_mixed_precision("auto", t4, "")[0] == "fp16"
    assert resolve_mixed_precision("auto", a100, "") == (
        "bf16",
        "auto: native bf16 on compute capability 8.0",
    )
    assert resolve_mixed_precision("auto", None, "no")[0] == "bf16"  # the launcher's default
    assert resolve_mixed_precision("no", None, "")[0] == "no"
    with pytest.raises(ValueError, match=r"fp16 .* needs CUDA"):
        resolve_mixed_precision("fp16", None, "")
    with pytest.raises(ValueError, match=r"bf16 .* compute capability 7\.5: bf16 is emulated"):
        resolve_mixed_precision("bf16", t4, "")
    # accelerate launch --mixed_precision / accelerate config: honoured by auto ...
    assert resolve_mixed_precision("auto", a100, "fp16") == (
        "fp16",
        "fp16 from accelerate launch/config",
    )
    with pytest.raises(ValueError, match="from accelerate launch/config"):
        resolve_mixed_precision("auto", t4, "bf16")  # ... and checked like an explicit choice
    # ... while an explicit recipe value wins, and says so.
    assert resolve_mixed_precision("bf16", a100, "fp16") == (
        "bf16",
        "train.mixed_precision=bf16, overriding accelerate launch/config's fp16",
    )
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_mixed_precision("auto", a100)[0] == "fp16"
    monkeypatch.setattr("classifier_training.runtime.cpu_supports_bf16", lambda: False)
    assert resolve_mixed_precision("auto", None, "no") == (
        "no",
        "auto: fp32, the CPU has no native bf16",
    )


def test_exact_fp32_turns_tf32_off_and_restores() -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True
    with exact_fp32():
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_require_gpu_explains_a_missing_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    def unavailable() -> bool:
        warnings.warn(
            "CUDA initialization: The NVIDIA driver on your system is too old", stacklevel=1
        )
        return False

    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    expected = r"CUDA is unavailable \(CUDA initialization: The NVIDIA driver .* too old\)"
    with pytest.raises(RuntimeError, match=expected):
        require_cuda()
    # The Docker image turns the switch on through the environment; a flag still wins.
    assert not TrainConfig().require_gpu
    monkeypatch.setenv("CLASSIFIER_TRAINING_REQUIRE_GPU", "1")
    assert TrainConfig().require_gpu


def _save(
    acc: Accelerator,
    mgr: CheckpointManager,
    name: str,
    epoch: int,
    value: float | None,
    model: torch.nn.Module,
) -> Path:
    return mgr.save(acc, name, TrainerState(epoch=epoch, updates=epoch * 10), model, value)


def test_checkpoint_top_k_ledger_and_pruning(tmp_path: Path, accelerator: Accelerator) -> None:
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    ema = torch.nn.Linear(3, 2)
    mgr = CheckpointManager(tmp_path, "val/acc_top1", "max", keep_top_k=2)
    for epoch, value in enumerate([0.5, 0.7, 0.6, 0.65], start=1):
        _save(accelerator, mgr, f"epoch-{epoch:03d}", epoch, value, ema)
    mgr.settle(accelerator)  # the last write finishes in the background
    root = tmp_path / "checkpoints"
    kept = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert kept == ["epoch-002", "epoch-004"]  # top-2 by value (0.7, 0.65); last is 004
    ledger = json.loads((root / "ledger.json").read_text())
    assert [e["name"] for e in ledger["best"]] == ["epoch-002", "epoch-004"]
    assert ledger["last"] == "epoch-004"
    assert resolve_checkpoint(tmp_path, "best").name == "epoch-002"
    assert resolve_checkpoint(tmp_path, "last").name == "epoch-004"
    # a new manager (resume) keeps the ledger
    mgr2 = CheckpointManager(tmp_path, "val/acc_top1", "max", keep_top_k=2)
    assert mgr2.best_path == root / "epoch-002"
    sd = load_weights(root / "epoch-002", "ema")
    assert set(sd) == {"weight", "bias"}
    assert torch.equal(sd["weight"], ema.weight.detach())
    raw = load_weights(root / "epoch-002", "raw")
    assert torch.equal(raw["weight"], model.weight.detach())


def test_checkpoint_min_mode_and_step_checkpoints(tmp_path: Path, accelerator: Accelerator) -> None:
    accelerator.prepare(torch.nn.Linear(2, 2))
    mgr = CheckpointManager(tmp_path, "val/loss", "min", keep_top_k=1)
    _save(accelerator, mgr, "epoch-001", 1, 0.9, torch.nn.Linear(2, 2))
    _save(accelerator, mgr, "step-0000015", 1, None, torch.nn.Linear(2, 2))
    _save(accelerator, mgr, "epoch-002", 2, 1.2, torch.nn.Linear(2, 2))
    mgr.settle(accelerator)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["epoch-001", "epoch-002"]  # step checkpoint pruned once superseded
    assert mgr.best_path is not None and mgr.best_path.name == "epoch-001"


def test_interrupted_save_leaves_previous_checkpoint(
    tmp_path: Path, accelerator: Accelerator
) -> None:
    accelerator.prepare(torch.nn.Linear(2, 2))
    mgr = CheckpointManager(tmp_path, "val/acc_top1", "max", keep_top_k=1)
    _save(accelerator, mgr, "epoch-001", 1, 0.5, torch.nn.Linear(2, 2))
    mgr.settle(accelerator)
    # a kill during the next save leaves only a .tmp- folder behind: the ledger still points to
    # the complete checkpoint, and the next save cleans the leftover up
    (tmp_path / "checkpoints" / ".tmp-epoch-002").mkdir()
    assert find_resume_checkpoint("auto", tmp_path).name == "epoch-001"
    _save(accelerator, mgr, "epoch-002", 2, 0.6, torch.nn.Linear(2, 2))
    mgr.settle(accelerator)
    assert not (tmp_path / "checkpoints" / ".tmp-epoch-002").exists()


def test_checkpoint_write_finishes_in_the_background(
    tmp_path: Path, accelerator: Accelerator
) -> None:
    accelerator.prepare(torch.nn.Linear(3, 2))
    ema = torch.nn.Linear(3, 2)
    saved = ema.weight.detach().clone()
    mgr = CheckpointManager(tmp_path, "val/acc_top1", "max", keep_top_k=2)
    path = _save(accelerator, mgr, "epoch-001", 1, 0.5, ema)
    # The ranking is known at once, on every process; the folder becomes durable later.
    assert mgr.best_path == mgr.last_path == path
    with torch.no_grad():
        ema.weight.add_(1.0)  # training goes on changing the EMA in place
    mgr.settle(accelerator)
    assert verify_files(path) > 0
    assert torch.equal(load_weights(path, "ema")["weight"], saved)  # the weights at save time
    assert set(mgr.ledger.files) == {"epoch-001"}
    assert mgr.background_seconds > 0
    # durable=True (a stop checkpoint) returns only once the folder and ledger are in place
    path = mgr.save(accelerator, "step-0000015", TrainerState(epoch=1), ema, None, durable=True)
    assert path.is_dir() and resolve_checkpoint(tmp_path, "last") == path
    # close() waits without a collective (the error path and the run lock's release)
    path = _save(accelerator, mgr, "epoch-002", 2, 0.6, ema)
    mgr.close()
    assert path.is_dir() and not (tmp_path / "checkpoints" / ".tmp-epoch-002").exists()


def test_a_failed_background_write_is_raised_and_keeps_the_previous_checkpoint(
    tmp_path: Path, accelerator: Accelerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import classifier_training.checkpoint as checkpoint

    accelerator.prepare(torch.nn.Linear(2, 2))
    mgr = CheckpointManager(tmp_path, "val/acc_top1", "max", keep_top_k=1)
    first = _save(accelerator, mgr, "epoch-001", 1, 0.5, torch.nn.Linear(2, 2))
    mgr.settle(accelerator)

    def disk_full(folder: Path) -> dict[str, Any]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "manifest", disk_full)
    _save(accelerator, mgr, "epoch-002", 2, 0.9, torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointWriteError, match=r"epoch-002 could not be written.*No space"):
        mgr.settle(accelerator)
    assert resolve_checkpoint(tmp_path, "last") == first  # the ledger on disk never moved
    assert verify_files(first) > 0


def test_resume_target_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        find_resume_checkpoint("auto", tmp_path)
    with pytest.raises(CheckpointError, match="neither a checkpoint folder"):
        find_resume_checkpoint(str(tmp_path / "elsewhere"), tmp_path)
    with pytest.raises(CheckpointError, match=r"ledger\.json"):
        resolve_checkpoint(tmp_path, "best")


def test_progress_lines_every_n_updates() -> None:
    import io

    from classifier_training.tracking import Progress

    out = io.StringIO()
    progress = Progress("lines", log_every=2, enabled=True, stream=out)
    progress.start_epoch(0, 3, total_batches=5, done=0)
    for update in range(1, 6):
        progress.step(8, update, torch.tensor(0.5 * update), 1e-3)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # updates 2, 4 and the last batch
    assert lines[0].startswith("epoch 1/3 batch 2/5 update 2 loss 1.0000 lr 1.000e-03")
    assert "batch 5/5" in lines[-1] and "eta" in lines[-1]
    assert progress.end_epoch() > 0


def test_non_finite_weights_stop_the_run_before_a_checkpoint(accelerator: Accelerator) -> None:
    from classifier_training.checkpoint import TrainingDivergedError, check_finite_weights

    net, ema = torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    check_finite_weights(accelerator, {"raw": net, "EMA": ema, "none": None}, "in epoch 1")
    net.running_var[1] = float("nan")  # a buffer counts too
    with pytest.raises(TrainingDivergedError, match=r"diverged in epoch 2: the raw weights hold"):
        check_finite_weights(accelerator, {"raw": net, "EMA": ema}, "in epoch 2")


def test_all_finite_is_exact_when_large_finite_values_overflow_the_fast_sum() -> None:
    from classifier_training.checkpoint import all_finite

    big = torch.full((4,), 3e38)  # finite, but their fp32 sum is inf: decided element-wise
    half = torch.full((10,), 60000.0, dtype=torch.float16)  # sums past fp16's 65504
    assert all_finite([torch.ones(3), big, half]) and all_finite([])
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.ones(5)
        x[2] = bad
        assert not all_finite([torch.ones(3), x])
    both = torch.tensor([float("inf"), float("-inf")])  # sum NaN, still caught
    assert not all_finite([both])


def test_skip_final_collection_freezes_the_heap_after_earlier_exit_handlers() -> None:
    # atexit runs last-registered first: a handler registered before it sees the frozen heap
    code = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
        "from classifier_training.runtime import skip_final_collection\n"
        "skip_final_collection()\n"
        "print('before exit', gc.get_freeze_count())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["before exit 0", "frozen True"]
