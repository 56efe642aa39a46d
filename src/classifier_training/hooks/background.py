"""Hook work that runs beside training: drawing and writing large files while the next epoch trains.

Measured on the quick start (42 classes, 2 cores): the confusion matrices, history curves and
sample grid cost 3-5 s of matplotlib per epoch, which would idle a GPU that trains an epoch in
6 s. So a hook splits its work in two:

1. on the main process, inside the hook round (this is the blocking part, keep it cheap): gather
   what the figure needs as *plain data* (numpy arrays, dicts, lists, strings, paths);
2. ``ctx.background.submit(draw_fn, *plain_args, then=..., replace=...)``: ``draw_fn`` is a
   module-level function that draws and writes the files; it runs in the worker.

The worker (``hooks.background``):

* ``process`` (default): one worker process forked at fit start (before the loader workers and
  before any job), with its own matplotlib state on the Agg backend, so drawing never competes
  with the training loop for the GIL. Arguments are pickled to it; torch objects are refused
  (:func:`check_plain`), so no tensor, module or CUDA handle crosses. The worker ignores SIGINT
  and SIGTERM (the trainer decides when to stop and shuts it down) and exits by itself if the
  trainer dies.
* ``thread``: one thread in the trainer process (no fork; drawing holds the GIL part of the time).
* ``inline``: the job runs inside ``submit`` (debugging, and the reference for "same files").

Jobs run one at a time in submission order, so epoch k's files are written before epoch k+1's.
``replace="history"`` drops a not-yet-started job with the same key (curves redrawn each epoch:
only the newest matters). At most ``max_pending`` jobs wait; beyond that ``submit`` blocks on the
oldest (a worker slower than training then shows up as blocking hook time, not as unbounded
memory).

Errors: a job's exception is kept and raised by the next :meth:`BackgroundWork.collect` (the
engine's next hook round) or :meth:`BackgroundWork.wait` (before the fit-end hooks), as a
:class:`BackgroundJobError` naming the job and carrying the worker's traceback; ``run_hooks``
then fails the run on every process through Accelerate's trigger.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal

import numpy as np

BackgroundMode = Literal["process", "thread", "inline"]
_PLAIN_SCALARS = (str, bytes, int, float, bool, complex, type(None), PurePath, np.generic)


class BackgroundJobError(RuntimeError):
    """A background hook job failed; the message names it and holds the worker's traceback."""


def check_plain(value: Any, where: str = "argument") -> None:
    """Raise TypeError unless ``value`` is plain data a worker process may receive.

    Plain: None, bool, numbers, str, bytes, paths, numpy arrays and scalars, and lists, tuples,
    dicts and dataclass instances of those. Anything else (a torch tensor or module above all) is
    refused with the place it was found, so a hook cannot hand the worker a CUDA tensor or keep
    the training model alive in a queue.
    """
    if isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{where}: numpy arrays of Python objects are not plain data")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_plain(key, f"{where} key")
            check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            check_plain(getattr(value, f.name), f"{where}.{f.name}")
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    hint = " (convert it with .cpu().numpy())" if kind.startswith("torch.") else ""
    raise TypeError(
        f"{where}: background hook jobs take plain data (numpy arrays, dicts, lists, str, "
        f"numbers, paths), got {kind}{hint}"
    )


def _timed_call(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, float]:
    """Run ``fn`` in the worker; return its result and the seconds it took."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _noop() -> None:
    """Forces the worker process to start at construction time (see BackgroundWork)."""


def _worker_init(parent_pid: int) -> None:
    """Runs once in the forked worker: Agg backend, no signals of the terminal, die with parent."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    # Ctrl-C reaches the whole process group; the trainer handles it and shuts us down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # inherited from the trainer: drawing needs no intra-op threads
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    def watch_parent() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)  # the trainer is gone (killed): nobody will read our results

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()


class _InlineExecutor(Executor):
    """Runs a job inside ``submit`` and returns its finished future."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # kept for collect(), like the other executors
            future.set_exception(err)
        return future


@dataclass
class _Job:
    name: str
    future: Future[tuple[Any, float]]
    then: Callable[[Any], None] | None
    key: str


class BackgroundWork:
    """One background worker for hook jobs (see the module docstring).

    ``busy_seconds`` sums the worker time of finished jobs (the work taken off the critical
    path), ``seconds_by_job`` splits it by job function; ``jobs_done`` counts them.
    """

    def __init__(self, mode: BackgroundMode = "process", max_pending: int = 16) -> None:
        if mode not in ("process", "thread", "inline"):
            raise ValueError(f"hooks.background must be process, thread or inline, got {mode!r}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.mode: BackgroundMode = mode
        self.max_pending = max_pending
        self.busy_seconds = 0.0
        self.seconds_by_job: dict[str, float] = {}
        self.jobs_done = 0
        self._jobs: deque[_Job] = deque()
        self._executor: Executor
        if mode == "process":
            methods = multiprocessing.get_all_start_methods()
            # fork: the worker inherits the imported modules (no re-import of the training
            # script, which spawn would do) and starts in milliseconds.
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._executor = ProcessPoolExecutor(
                max_workers=1, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)
            )
            self._executor.submit(_noop).result()  # fork now, not in the middle of an epoch
        elif mode == "thread":
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hook-bg")
        else:
            self._executor = _InlineExecutor()

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet collected."""
        return len(self._jobs)

    def submit(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        then: Callable[[Any], None] | None = None,
        replace: str = "",
        **kwargs: Any,
    ) -> None:
        """Queue ``fn(*args, **kwargs)``; ``then(result)`` runs on this process when collected.

        ``fn`` must be a module-level function (it is pickled by name) and every argument plain
        data (:func:`check_plain`). ``replace``: a key; a queued, not yet started job with the
        same key is cancelled (its ``then`` never runs).
        """
        check_plain(args, f"{_name(fn)} arguments")
        check_plain(kwargs, f"{_name(fn)} keyword arguments")
        if replace:
            for job in list(self._jobs):
                if job.key == replace and job.future.cancel():
                    self._jobs.remove(job)
        while len(self._jobs) >= self.max_pending:
            self._finish(self._jobs.popleft())  # backpressure: wait for the oldest
        future = self._executor.submit(_timed_call, fn, args, kwargs)
        self._jobs.append(_Job(_name(fn), future, then, replace))

    def collect(self) -> None:
        """Handle finished jobs in submission order without waiting; raise the first failure."""
        while self._jobs and self._jobs[0].future.done():
            self._finish(self._jobs.popleft())

    def wait(self) -> None:
        """Wait for every job, run their ``then`` callbacks; raise the first failure."""
        while self._jobs:
            self._finish(self._jobs.popleft())

    def close(self, cancel: bool = False) -> None:
        """Stop the worker. ``cancel``: drop jobs not started yet (after a failure)."""
        self._executor.shutdown(wait=True, cancel_futures=cancel)
        self._jobs.clear()

    def _finish(self, job: _Job) -> None:
        try:
            result, seconds = job.future.result()
        except BrokenProcessPool as err:
            raise BackgroundJobError(
                f"background hook job {job.name}: the worker process died ({err}); "
                "out of memory? see the system log (dmesg) for a killed process"
            ) from err
        except Exception as err:
            remote = getattr(err.__cause__, "tb", "")  # the worker's formatted traceback
            raise BackgroundJobError(
                f"background hook job {job.name} failed: {type(err).__name__}: {err}"
                + (f"\nworker traceback:\n{remote}" if remote else "")
            ) from err
        self.busy_seconds += seconds
        short = job.name.rsplit(".", 2)
        label = ".".join(short[-2:])  # module.function: which hook paid for it
        self.seconds_by_job[label] = self.seconds_by_job.get(label, 0.0) + seconds
        self.jobs_done += 1
        if job.then is not None:
            job.then(result)


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
