"""Process-level setup: the Accelerator, mixed precision, CPU threads, seeding, the GPU checks.

Precision (``train.mixed_precision``), decided once by :func:`resolve_mixed_precision`:

* ``auto``: a precision given to the launcher wins (``accelerate launch --mixed_precision`` or
  ``accelerate config``, which reach the script as ``ACCELERATE_MIXED_PRECISION``), except the
  launcher's own default ``no``, which cannot be told apart from "nothing chosen". Otherwise:
  CUDA with compute capability >= 8.0 (Ampere and later: native bf16 tensor cores) -> bf16, no
  loss scaling needed; older CUDA GPUs (the T4 is 7.5) -> fp16 with a GradScaler; a CPU with
  native bf16 (AVX512-BF16 / AMX) -> bf16; else fp32.
* ``fp16``/``bf16``/``no``: the recipe's value wins over the launcher's (the start-up line says
  so). fp16 without CUDA is refused (Accelerate ignores it on a CPU and trains in fp32); bf16 on
  a GPU below compute capability 8.0 is refused (emulated there, slower than fp16).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

from classifier_training.distributed import accelerator_options, check_process_group
from classifier_training.recipe import Recipe

log = logging.getLogger(__name__)

LAUNCHER_ENV = "ACCELERATE_MIXED_PRECISION"
BF16_MIN_CAPABILITY = (8, 0)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), read from /proc/cpuinfo.

    Measured on this project's Zen 4 machines: bf16 autocast trains ResNet18 1.7-2x faster than
    fp32. Without native support bf16 is emulated and slower, so ``auto`` stays fp32 there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_capability() -> tuple[int, int] | None:
    """Compute capability of the current CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return int(major), int(minor)


def resolve_mixed_precision(
    choice: str,
    capability: tuple[int, int] | Literal["detect"] | None = "detect",
    launcher: str | None = None,
) -> tuple[str, str]:
    """Map ``train.mixed_precision`` to Accelerate's value; returns ``(precision, why)``.

    ``capability``: the CUDA compute capability, None for no CUDA, "detect" to ask torch.
    ``launcher``: the launcher's precision (default: ``$ACCELERATE_MIXED_PRECISION``).
    Raises ValueError for a precision this device cannot run (see the module docstring).
    """
    cap = cuda_capability() if isinstance(capability, str) else capability
    launcher = os.environ.get(LAUNCHER_ENV, "") if launcher is None else launcher
    launcher = launcher.strip().lower()
    if choice == "auto" and launcher in ("fp16", "bf16"):
        precision, why = launcher, f"{launcher} from accelerate launch/config"
    elif choice == "auto":
        precision, why = _auto_precision(cap)
    else:
        precision, why = choice, f"train.mixed_precision={choice}"
        if launcher and launcher not in ("no", choice):
            why += f", overriding accelerate launch/config's {launcher}"
    _check_precision(precision, cap, why)
    return precision, why


def _auto_precision(cap: tuple[int, int] | None) -> tuple[str, str]:
    if cap is not None and cap >= BF16_MIN_CAPABILITY:
        return "bf16", f"auto: native bf16 on compute capability {cap[0]}.{cap[1]}"
    if cap is not None:
        return "fp16", f"auto: fp16 + GradScaler, no native bf16 below 8.0 ({cap[0]}.{cap[1]})"
    if cpu_supports_bf16():
        return "bf16", "auto: CPU with native bf16"
    return "no", "auto: fp32, the CPU has no native bf16"


def _check_precision(precision: str, cap: tuple[int, int] | None, why: str) -> None:
    if precision == "fp16" and cap is None:
        raise ValueError(
            f"mixed precision fp16 ({why}) needs CUDA: Accelerate ignores fp16 on a CPU and would "
            "train in fp32; use --train.mixed_precision bf16 or no on this machine"
        )
    if precision == "bf16" and cap is not None and cap < BF16_MIN_CAPABILITY:
        raise ValueError(
            f"mixed precision bf16 ({why}) on a GPU of compute capability {cap[0]}.{cap[1]}: "
            "bf16 is emulated below 8.0 (e.g. the T4) and slower than fp16; use "
            "--train.mixed_precision fp16 or auto"
        )


def skip_final_collection() -> None:
    """Freeze the heap at interpreter exit, after the atexit handlers registered before this.

    The interpreter's last garbage collections walk every object torch, timm and the rest
    created: ~1.2 s of a CLI's exit on this 2-core machine, as long as a short epoch. Frozen
    objects are skipped by those collections; finalizers, buffered files and later atexit work
    still run (atexit runs last-registered first, so register this early).
    """
    atexit.register(gc.freeze)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class GpuUnavailableError(RuntimeError):
    """``train.require_gpu`` is on and torch sees no CUDA device; the message says why."""


def require_cuda() -> None:
    """Raise GpuUnavailableError explaining why CUDA is unavailable (``train.require_gpu``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return
    # torch hides the reason in a warning ("The NVIDIA driver on your system is too old ...").
    reasons = "; ".join(str(w.message).strip() for w in caught) or "no CUDA device is visible"
    raise GpuUnavailableError(
        f"train.require_gpu is on but CUDA is unavailable ({reasons}). torch {torch.__version__} "
        f"is built for CUDA {torch.version.cuda}: the host needs a matching NVIDIA driver "
        "(nvidia-smi shows the CUDA version it supports) and the container a GPU "
        "(docker run --gpus all). Pass --train.require_gpu false to train on the CPU."
    )


@dataclass(frozen=True)
class RuntimeInfo:
    """What the start-up line states."""

    precision: str
    precision_reason: str


def build_accelerator(recipe: Recipe, run_dir: Path) -> tuple[Accelerator, RuntimeInfo]:
    """An Accelerator configured from the recipe, and why it runs in the precision it does.

    The seedable sampler makes the shuffle order a function of (seed, epoch) so that resume
    replays exactly (without it a resumed run re-draws epoch 0's order). Every process a launcher
    started joins one group (gloo on CPU-only machines), or the run stops here with LaunchError.
    ``non_blocking``: the prepared loaders copy pinned batches to the GPU asynchronously
    (Accelerate's default is a blocking copy).
    """
    if recipe.train.require_gpu:
        require_cuda()
    precision, why = resolve_mixed_precision(recipe.train.mixed_precision)
    accelerator = Accelerator(
        **accelerator_options(os.environ, recipe.train.collective_timeout_minutes),
        mixed_precision=precision,
        gradient_accumulation_steps=recipe.train.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=recipe.train.seed, non_blocking=True
        ),
        log_with="wandb" if recipe.logging.wandb else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir)),
        step_scheduler_with_optimizer=False,
    )
    check_process_group(accelerator, os.environ)
    _set_cpu_threads(accelerator)
    set_seed(recipe.train.seed, deterministic=recipe.train.deterministic)
    if recipe.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return accelerator, RuntimeInfo(precision, why)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """No TF32 inside the block: fp32 matmuls and cuDNN convolutions in full precision.

    cuDNN convolutions use TF32 by default on Ampere and later, so an "fp32" evaluation would
    not match the deployment's fp32 (onnxruntime) without this. Restores the previous flags.
    """
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = conv


def describe_runtime(
    accelerator: Accelerator, info: RuntimeInfo, *, workers: int, extra: str = ""
) -> str:
    """The start-up line: device, precision and why, processes, threads, loader workers."""
    device = accelerator.device
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name = f"{device} ({torch.cuda.get_device_name(index)}, compute capability {major}.{minor})"
    else:
        name = f"{device} ({usable_cpus()} usable cores)"
    scaler = ", GradScaler" if info.precision == "fp16" else ""
    parts = [
        f"device {name}",
        f"precision {info.precision}{scaler} ({info.precision_reason})",
        f"{accelerator.num_processes} process(es) ({accelerator.distributed_type.value})",
        f"{torch.get_num_threads()} CPU threads/process",
        f"{workers} loader workers/process",
    ]
    return "runtime: " + " | ".join(parts + ([extra] if extra else []))


def _set_cpu_threads(accelerator: Accelerator) -> None:
    """Give each CPU process its share of the cores.

    ``accelerate launch`` exports OMP_NUM_THREADS=1 even for a single process, which halves
    throughput on a 2-core machine; a process that owns the machine should use every core.
    """
    if accelerator.device.type != "cpu":
        return
    threads = max(1, usable_cpus() // max(1, accelerator.num_processes))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.info("using %d CPU threads per process", threads)
