"""Process-group formation: which Accelerator a launch gets, and which launches are refused.

The environments below are the ones the launchers export (read from accelerate 1.15's
``utils/launch.py`` and checked with a probe script under each launcher on this CPU machine);
the real launches are in ``test_multiprocess.py``.
"""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest

from classifier_training.distributed import (
    LaunchError,
    accelerator_options,
    check_process_group,
    launched_world_size,
    simple_launcher_asked_for_many,
)
from classifier_training.recipe import parse_recipe
from classifier_training.recipe_yaml import RecipeError

# torchrun --nproc_per_node 2 and accelerate launch --multi_gpu --num_processes 2, rank 1
TORCHRUN = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29511",
    "OMP_NUM_THREADS": "1",
}
# accelerate launch without --multi_gpu: its simple launcher starts the script once
SIMPLE_ONE = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no"}
SIMPLE_TWO_MACHINES = {**SIMPLE_ONE, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
# accelerate launch --mpirun_hostfile ... (Open MPI): no WORLD_SIZE, but the MPI size
MPI = {**SIMPLE_TWO_MACHINES, "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}


def fake_accelerator(num_processes: int) -> SimpleNamespace:
    kind = "DistributedType.MULTI_CPU" if num_processes > 1 else "DistributedType.NO"
    return SimpleNamespace(num_processes=num_processes, distributed_type=kind)


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, 1), (SIMPLE_ONE, 1), (SIMPLE_TWO_MACHINES, 1), (TORCHRUN, 2), (MPI, 4)],
)
def test_launched_world_size(env: dict[str, str], expected: int) -> None:
    assert launched_world_size(env) == expected


def test_a_malformed_world_size_names_the_variable() -> None:
    with pytest.raises(LaunchError, match="WORLD_SIZE='two'"):
        launched_world_size({"WORLD_SIZE": "two"})


@pytest.mark.parametrize(
    ("env", "device", "cpu"),
    [
        (TORCHRUN, False, True),  # no GPU: Accelerate forms the gloo group only with cpu=True
        (TORCHRUN, True, False),  # GPUs: Accelerate's own NCCL group
        (MPI, False, True),
        ({}, False, False),  # one process: nothing to form, the default device
        (SIMPLE_ONE, True, False),
    ],
)
def test_cpu_group_only_for_several_processes_without_a_device(
    env: dict[str, str], device: bool, cpu: bool
) -> None:
    assert accelerator_options(env, 120.0, device=device)["cpu"] is cpu


def test_the_group_timeout_reaches_init_process_group() -> None:
    (handler,) = accelerator_options(TORCHRUN, 90.0, device=False)["kwargs_handlers"]
    # Accelerate passes exactly to_kwargs() to torch.distributed.init_process_group; the default
    # backend field stays out of it, so Accelerate still picks gloo or NCCL itself.
    assert handler.to_kwargs() == {"timeout": timedelta(minutes=90)}


def test_a_non_positive_timeout_is_refused() -> None:
    with pytest.raises(LaunchError, match="collective_timeout_minutes"):
        accelerator_options({}, 0.0, device=False)
    with pytest.raises(RecipeError, match=r"train\.collective_timeout_minutes must be > 0"):
        parse_recipe(["--train.collective_timeout_minutes", "-1"])


@pytest.mark.parametrize(
    ("env", "asked"),
    [
        (SIMPLE_TWO_MACHINES, True),  # --num_machines 2 (or --cpu --num_processes 2)
        (SIMPLE_ONE, False),  # plain `accelerate launch src/train.py`
        ({"MASTER_ADDR": "10.0.0.2"}, False),  # not launched by accelerate: not ours to judge
        (TORCHRUN, False),
        (MPI, False),  # mpirun started the processes; Accelerate forms their group
    ],
)
def test_simple_launcher_asked_for_many(env: dict[str, str], asked: bool) -> None:
    assert simple_launcher_asked_for_many(env) is asked


def test_one_of_several_processes_outside_the_group_is_refused() -> None:
    with pytest.raises(LaunchError) as err:
        check_process_group(fake_accelerator(1), TORCHRUN)
    message = str(err.value)
    assert "started 2 processes" in message
    assert "not in their process group" in message
    assert "RANK=1, LOCAL_RANK=1" in message
    assert "torchrun --nproc_per_node N" in message


def test_accelerate_launch_without_multi_gpu_is_refused_with_the_fix() -> None:
    with pytest.raises(LaunchError, match="Add --multi_gpu"):
        check_process_group(fake_accelerator(1), SIMPLE_TWO_MACHINES)


@pytest.mark.parametrize(("env", "processes"), [({}, 1), (SIMPLE_ONE, 1), (TORCHRUN, 2), (MPI, 4)])
def test_a_formed_group_or_a_single_process_trains(env: dict[str, str], processes: int) -> None:
    check_process_group(fake_accelerator(processes), env)
