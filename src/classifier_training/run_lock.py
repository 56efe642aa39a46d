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
        self._created: list[Path] = []  # folders and the lock file this acquire() created

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise RunLockedError; creates the run folder if needed."""
        missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._created = missing[::-1]  # outermost first
            for _ in range(10):
                fd = self._open_and_lock()
                if fd is not None:
                    break
            else:
                raise RunLockedError(f"{self.path}: replaced again and again while locking")
        except OSError as err:
            raise CheckpointError(
                f"cannot write to {self.run_dir} as uid {os.getuid()}: {err.strerror}; "
                "check the folder's owner and permissions (or the bucket's access)"
            ) from err
        self._fd = fd
        _write_holder(fd)

    def _open_and_lock(self) -> int | None:
        """The locked descriptor of the current lock file, or None to retry (it was unlinked
        or replaced between open and flock by a holder that gave the folder up)."""
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        if created:
            self._created.append(self.path)
        return fd

    def release(self, *, discard: bool = False) -> None:
        """Unlock. ``discard``: the run wrote nothing, so also remove the lock file and the
        folders that :meth:`acquire` created, leaving the filesystem as it found it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if discard:  # unlink while still holding the lock (see _open_and_lock's inode check)
            for path in reversed(self._created):
                with contextlib.suppress(OSError):
                    path.unlink() if path == self.path else path.rmdir()
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
