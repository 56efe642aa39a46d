"""One process group for every process a launcher starts, on GPUs and on CPU-only machines.

Accelerate 1.15 decides the distributed mode in ``PartialState._prepare_backend``: with a launcher's
``LOCAL_RANK`` it forms an NCCL (or other device) group when it finds a device, and a gloo group
only when it is built with ``cpu=True``. So on a machine without an accelerator, ``accelerate
launch --multi_gpu --num_processes 2`` and ``torchrun --nproc_per_node 2`` would start processes
that each see ``DistributedType.NO``: independent runs racing on one run folder.
:func:`accelerator_options` asks for the CPU group exactly then; :func:`check_process_group`
refuses to train in a process that was launched as one of several but is not in their group.

The group's timeout (how long a process waits at a barrier, gather or all-reduce for the others)
is generous because the main process alone does long work while the others wait: hashing and
decoding every image at fit start (minutes on a network filesystem), W&B start-up (up to
``WANDB_INIT_TIMEOUT`` twice), test evaluation and export at fit end. torch's defaults (10 min
for NCCL, 30 for gloo) can be shorter than that. A process that dies ends the run sooner anyway:
``torchrun``/``accelerate launch`` stop the other workers when one exits with an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
from accelerate.utils import InitProcessGroupKwargs

# What launchers export: torchrun/accelerate (WORLD_SIZE), Intel MPI/MPICH, Open MPI, MVAPICH.
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

MULTI_PROCESS_HINT = (
    "`accelerate launch --multi_gpu --num_processes N src/train.py ...` or "
    "`torchrun --nproc_per_node N src/train.py ...` (N: one process per GPU); on several "
    "machines add `--num_machines M --machine_rank R --main_process_ip HOST --main_process_port "
    "PORT` on each, N then counting the processes of all machines"
)


class LaunchError(ValueError):
    """The processes of one launch would not train together; the message says what to change."""


def launched_world_size(env: Mapping[str, str]) -> int:
    """How many processes the launcher says it started (1 when no launcher variable is set)."""
    for name in WORLD_SIZE_VARS:
        value = env.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"{name}={value!r} is not a process count") from None
    return 1


def accelerator_available() -> bool:
    """True when torch sees a device Accelerate can form a group on (CUDA, XPU, ...)."""
    return bool(torch.accelerator.is_available())


def accelerator_options(
    env: Mapping[str, str], timeout_minutes: float, *, device: bool | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator(...)`` that form the group of this launch.

    ``cpu=True`` only when the launcher started several processes and there is no device to put
    them on: that is the one case Accelerate would otherwise run each process alone. ``device``
    overrides the detection (tests).
    """
    if timeout_minutes <= 0:
        raise LaunchError(f"train.collective_timeout_minutes must be > 0, got {timeout_minutes}")
    device = accelerator_available() if device is None else device
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))
    return {
        "cpu": launched_world_size(env) > 1 and not device,
        "kwargs_handlers": [timeout],
    }


def simple_launcher_asked_for_many(env: Mapping[str, str]) -> bool:
    """``accelerate launch`` without ``--multi_gpu`` was asked for several processes or machines.

    Its simple launcher starts the script once, exports ``MASTER_ADDR`` only when
    ``--num_processes`` or ``--num_machines`` is above 1, and never sets ``WORLD_SIZE``/``RANK``:
    the process cannot know its rank, so no group can form (``--cpu --num_processes 2`` and
    ``--num_machines 2`` without ``--multi_gpu`` both end here).
    """
    launched_by_accelerate = "ACCELERATE_USE_CPU" in env and "ACCELERATE_MIXED_PRECISION" in env
    return (
        launched_by_accelerate
        and bool(env.get("MASTER_ADDR"))
        and "LOCAL_RANK" not in env
        and launched_world_size(env) == 1
    )


def check_process_group(accelerator: Any, env: Mapping[str, str]) -> None:
    """Refuse to train when this process is not in the group its launcher meant to form.

    Raises LaunchError before anything is trained: two processes that each think they are alone
    write the same checkpoints and outputs and corrupt each other's run.
    """
    launched = launched_world_size(env)
    if simple_launcher_asked_for_many(env):
        raise LaunchError(
            "accelerate launch started this script as a single process although it was given "
            "several processes or machines (--num_processes/--num_machines without --multi_gpu, "
            f"MASTER_ADDR={env.get('MASTER_ADDR')}). Without --multi_gpu, Accelerate gives the "
            "process no rank, so it would train alone. Add --multi_gpu (it starts the processes "
            "with torchrun and forms the group, on CPUs too): " + MULTI_PROCESS_HINT + ". "
            "If MASTER_ADDR comes from your environment and you meant one process, unset it."
        )
    if launched > 1 and accelerator.num_processes != launched:
        ranks = ", ".join(f"{k}={env.get(k, '-')}" for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR"))
        raise LaunchError(
            f"the launcher started {launched} processes, but this one is not in their process "
            f"group (Accelerate: {accelerator.distributed_type}, {accelerator.num_processes} "
            f"process; {ranks}); each process would train alone on the same run folder. Launch "
            "with a launcher that sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT "
            "for every process: " + MULTI_PROCESS_HINT + "."
        )
