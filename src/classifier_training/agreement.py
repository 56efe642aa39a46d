"""Decisions every process must share: main-only work with one outcome, and OR-ed flags.

Two patterns keep a multi-process run from hanging or splitting when one process decides:

- :func:`share_from_main` runs a function on the main process only (it touches the run folder)
  and hands every process its result, or re-raises its error on every process, so no process
  is left waiting at a barrier for a main process that already failed.
- :class:`FlagAgreement` ORs a few booleans across processes (a signal seen by one process, a
  checkpoint that one clock says is due). It uses a gloo group on CPU tensors: with NCCL a
  per-batch all-reduce of a GPU tensor plus ``.item()`` would stall the CUDA stream every
  batch, while a gloo all-reduce of two ints costs ~0.1 ms and leaves the GPU queue alone.

Both are no-ops (no collective at all) in a single process.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def share_from_main(accelerator: Any, fn: Callable[[], T]) -> T:
    """``fn()`` on the main process; every process returns its result or raises its error.

    The error is re-raised with its own type and message on the other processes (or as a
    RuntimeError with the message when the exception cannot be pickled).
    """
    if accelerator.num_processes == 1:
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            payload[0] = ("ok", fn())
        except Exception as err:  # every process must learn about it, not only this one
            error = err
            payload[0] = ("error", _picklable(err))
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        if error is not None:
            raise error
        raise value
    return value  # type: ignore[no-any-return]


def _picklable(err: BaseException) -> BaseException:
    try:
        copy = pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(str(err))
    return copy  # type: ignore[no-any-return]


class FlagAgreement:
    """OR of per-process booleans, agreed by every process (call on all of them, same order).

    ``side_group=True`` forces a separate gloo group even when the default group is gloo (tests
    use it to exercise the path a NCCL run takes).
    """

    def __init__(self, accelerator: Any, side_group: bool = False) -> None:
        self.active = accelerator.num_processes > 1 and dist.is_initialized()
        self.group: Any = None
        if self.active and (side_group or dist.get_backend() != "gloo"):
            # Collective: every rank creates it at the same point of setup.
            self.group = dist.new_group(backend="gloo")

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """The element-wise OR of ``flags`` over all processes."""
        if not self.active:
            return tuple(bool(f) for f in flags)
        values = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return tuple(bool(v) for v in values.tolist())
