"""Atomic, durable file writes: a reader or a crash never sees half a file.

Every writer here follows one recipe (torch-free, used by the trainer, the hooks and the export):

1. write into a fresh temp file in the destination's folder (``.<name>.<random>.tmp``, created
   with ``O_EXCL`` and mode ``0o666 & ~umask`` like any new file), flush and ``fsync`` it;
2. ``os.replace`` it onto the destination (atomic on POSIX within one filesystem);
3. ``fsync`` the folder, so the rename itself survives a power cut or a preempted VM.

On any error the temp file is removed and the destination keeps its previous content.
:func:`fsync_dir` is public for callers that rename whole folders (checkpoints, bundles).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib is only needed by callers that draw
    from matplotlib.figure import Figure

# fsync on a folder is refused by some filesystems (e.g. FUSE mounts answer EINVAL); the rename
# is then as durable as that filesystem allows, which is not a reason to fail the write.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def fsync_dir(folder: str | Path) -> None:
    """``fsync`` a folder so that renames and new entries in it are on disk.

    A no-op where folders cannot be opened (Windows) or the filesystem does not support it.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """Open a binary handle whose content replaces ``path`` when the ``with`` block ends.

    The parent folder is created if needed. If the block raises, ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically and durably; returns the path."""
    with atomic_open(path) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with UTF-8 ``text`` (written as given: no newline translation)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_text(data: Any, *, sort_keys: bool = False, indent: int | None = 2) -> str:
    """``json.dumps`` plus a final newline: the one JSON file format of the project.

    Keys keep their insertion order unless ``sort_keys`` (both are deterministic; files whose
    key order is a contract, like ``labels_mapping.json``, must not be sorted).
    """
    return json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n"


def atomic_write_json(
    path: str | Path, data: Any, *, sort_keys: bool = False, indent: int | None = 2
) -> Path:
    """Replace ``path`` with :func:`json_text` of ``data``; returns the path."""
    return atomic_write_text(path, json_text(data, sort_keys=sort_keys, indent=indent))


# zlib level of the PNGs: 3 encodes ~25% faster than Pillow's default 6 for files ~15% larger
# (a 1000x600 px plot: 15 vs 20 ms, 76 vs 66 KiB); figures are redrawn every epoch.
PNG_COMPRESS_LEVEL = 3


def save_figure(fig: Figure, path: str | Path, dpi: int = 150, **savefig: Any) -> Path:
    """Save a matplotlib figure atomically; the format comes from the suffix (``.png``...).

    PNGs are compressed at :data:`PNG_COMPRESS_LEVEL` unless ``pil_kwargs`` says otherwise.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt == "png":
        savefig["pil_kwargs"] = {
            "compress_level": PNG_COMPRESS_LEVEL,
            **savefig.get("pil_kwargs", {}),
        }
    with atomic_open(path) as handle:
        fig.savefig(handle, dpi=dpi, format=fmt, **savefig)
    return path
