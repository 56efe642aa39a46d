"""classifier_training.io: atomic, durable writes (temp file, fsync, rename, fsync folder)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from classifier_training import io as cio


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_text_bytes_and_json_round_trip(tmp_path: Path) -> None:
    cio.atomic_write_bytes(tmp_path / "a.bin", b"\x00\xff")
    cio.atomic_write_text(tmp_path / "b.txt", "héllo\nworld\n")
    cio.atomic_write_json(tmp_path / "c.json", {"z": 1, "a": [1, 2]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "b.txt").read_bytes() == "héllo\nworld\n".encode()
    text = (tmp_path / "c.json").read_text(encoding="utf-8")
    assert text == json.dumps({"z": 1, "a": [1, 2]}, indent=2) + "\n"
    assert _leftovers(tmp_path) == []


def test_json_keeps_key_order_unless_sorted(tmp_path: Path) -> None:
    data = {"b": 1, "a": {"d": 2, "c": 3}}
    cio.atomic_write_json(tmp_path / "kept.json", data)
    cio.atomic_write_json(tmp_path / "sorted.json", data, sort_keys=True)
    assert list(json.loads((tmp_path / "kept.json").read_text())) == ["b", "a"]
    assert (tmp_path / "sorted.json").read_text() == (
        json.dumps(data, indent=2, sort_keys=True) + "\n"
    )
    assert cio.json_text([1], indent=None) == "[1]\n"


def test_replaces_existing_file_and_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "f.txt"
    cio.atomic_write_text(target, "one")
    cio.atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert _leftovers(target.parent) == []


def test_a_failing_writer_keeps_the_old_content_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), cio.atomic_open(target) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_unserialisable_json_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    cio.atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        cio.atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert _leftovers(tmp_path) == []


def test_file_then_rename_then_folder_are_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    cio.atomic_write_text(tmp_path / "f.txt", "x")
    assert events == ["fsync-file", "replace", "fsync-dir"]


def test_fsync_dir_tolerates_filesystems_without_folder_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fd: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    cio.fsync_dir(tmp_path)  # a FUSE mount answering EINVAL is not an error

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output"):
        cio.fsync_dir(tmp_path)
    cio.fsync_dir(tmp_path / "missing")  # cannot be opened: nothing to sync


def test_new_files_get_the_usual_permissions(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = cio.atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_save_figure_format_follows_the_suffix(tmp_path: Path) -> None:
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    png = cio.save_figure(fig, tmp_path / "f.png", dpi=50)
    svg = cio.save_figure(fig, tmp_path / "f.svg")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert b"<svg" in svg.read_bytes()[:1000]
    (tmp_path / "keep.xyz").write_text("old")
    with pytest.raises(ValueError, match="xyz"):
        cio.save_figure(fig, tmp_path / "keep.xyz")
    assert (tmp_path / "keep.xyz").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_save_figure_png_compression_can_be_chosen(tmp_path: Path) -> None:
    fig = Figure(figsize=(3, 2))
    fig.add_subplot().plot([0, 1, 2], [1, 0, 1])
    fast = cio.save_figure(fig, tmp_path / "fast.png", dpi=60)
    stored = cio.save_figure(fig, tmp_path / "stored.png", dpi=60, pil_kwargs={"compress_level": 0})
    assert fast.read_bytes().startswith(b"\x89PNG") and stored.read_bytes().startswith(b"\x89PNG")
    assert stored.stat().st_size > 2 * fast.stat().st_size  # the caller's pil_kwargs win
