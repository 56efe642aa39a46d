"""Where an export bundle may go, and how it replaces an older one without destroying anything.

``--out`` may be a new folder, an empty one, or an existing export bundle (it has
``export.json``). Refused, before any work: the run folder itself, any folder that contains it,
anything inside its ``checkpoints/``, a file, and a non-empty folder that is not a bundle.

The bundle is built in a staging folder and moved into place only when complete:

- a new or other folder: staged as a sibling ``.tmp-<name>-<pid>`` and renamed; an old bundle
  is first renamed aside (``.old-<name>-<pid>``) and removed last, so a kill leaves either the
  old or the new bundle under the final name (plus a leftover that the next export removes);
- the current directory or one of its parents (``--out .``): renaming it would leave the
  shell in a deleted folder, so the files are staged inside it and renamed one by one,
  ``export.json`` last.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from classifier_training.io import fsync_dir

EXPORT_INFO_FILE = "export.json"


class OutDirRefusedError(FileExistsError):
    """``--out`` names a folder that export must not write into; the message says why."""


def check_out_dir(out: str | Path, run_dir: str | Path) -> Path:
    """The resolved bundle folder, or OutDirRefusedError when writing there could destroy data."""
    target = Path(out).resolve()
    run = Path(run_dir).resolve()
    hint = "pick a new folder or an existing export bundle"
    if target == run:
        raise OutDirRefusedError(f"--out {out} is the run folder {run_dir}; {hint}")
    if target in run.parents:
        raise OutDirRefusedError(f"--out {out} contains the run folder {run_dir}; {hint}")
    if (run / "checkpoints") in (target, *target.parents):
        raise OutDirRefusedError(f"--out {out} is inside the run's checkpoints/; {hint}")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise OutDirRefusedError(f"--out {out} is a file, not a folder; {hint}")
        if any(target.iterdir()) and not (target / EXPORT_INFO_FILE).is_file():
            raise OutDirRefusedError(
                f"--out {out} is not empty and not an export bundle (no {EXPORT_INFO_FILE}); {hint}"
            )
    return target


def _holds_cwd(folder: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    return folder == cwd or folder in cwd.parents


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(final: Path) -> None:
    """Remove staging leftovers of killed exports (their pid is gone) next to and in ``final``."""
    pattern = re.compile(rf"^\.(tmp|old)-{re.escape(final.name)}-(\d+)$")
    for folder in (final.parent, final):
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            m = pattern.match(child.name)
            if m and child.is_dir() and not _alive(int(m.group(2))):
                shutil.rmtree(child, ignore_errors=True)


def staging_dir(final: Path) -> Path:
    """A fresh, empty staging folder for a bundle that will go to ``final`` (same filesystem)."""
    remove_stale_staging(final)
    name = f".tmp-{final.name}-{os.getpid()}"
    if _holds_cwd(final):
        final.mkdir(parents=True, exist_ok=True)
        tmp = final / name
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def install_bundle(tmp: Path, final: Path) -> None:
    """Move the complete bundle in ``tmp`` (from :func:`staging_dir`) into ``final``."""
    for path in tmp.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if tmp.parent == final:
        _install_in_place(tmp, final)
        return
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _install_in_place(tmp: Path, final: Path) -> None:
    new = sorted(p.name for p in tmp.iterdir())
    # The previous bundle's files that the new one does not have would describe another model.
    for child in final.iterdir():
        if child != tmp and child.name not in new and not child.name.startswith(".tmp-"):
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    for name in sorted(new, key=lambda n: n == EXPORT_INFO_FILE):  # the marker last
        os.replace(tmp / name, final / name)
    tmp.rmdir()
    fsync_dir(final)
