"""One writer per run folder: an ``fcntl.flock`` on ``<run>/.lock`` held for the whole run.

The main process takes the lock before it reads or writes anything else in the run folder; a
second run into the same folder fails at once with a message naming the holder (pid, host,
start time, command). The kernel releases a flock when its holder dies, however it dies, so a
lock left behind by a killed run never blocks: the file stays (with the last holder's details)
but is free. On a filesystem without flock support the run continues with a warning.

Across machines, flock protects only where the filesystem implements it (local disks, NFSv4);
Cloud Storage FUSE locks per VM.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from classifier_training.checkpoint import CheckpointError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLockedError(CheckpointError):
    """Another live process holds the run folder's lock; the message names it."""


class RunLock:
    """Exclusive, non-blocking lock of a run folder (context manager)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise RunLockedError; creates the run folder if needed."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CheckpointError(
                f"cannot write to {self.run_dir} as uid {os.getuid()}: {err.strerror}; "
                "check the folder's owner and permissions (or the bucket's access)"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise RunLockedError(
                f"{self.run_dir} is in use by another run ({holder}); wait for it to finish, "
                "stop it, or pick another --train.output_dir"
            ) from None
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            log.warning(
                "%s: this filesystem cannot lock files (%s); make sure no other run writes "
                "to this folder",
                self.run_dir,
                err.strerror,
            )
        self._fd = fd
        _write_holder(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _write_holder(fd: int) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
    }
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        data = json.loads(raw.decode())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    parts = [f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"]
    if holder.get("started_at"):
        parts.append(f"started {holder['started_at']}")
    if holder.get("command"):
        parts.append(f"command: {holder['command']}")
    return ", ".join(parts)
