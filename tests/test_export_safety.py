"""Export never destroys: --out checks and bundle installation; the predictor skips bad images."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from classifier_training.bundle_dir import (
    EXPORT_INFO_FILE,
    OutDirRefusedError,
    check_out_dir,
    install_bundle,
    remove_stale_staging,
    staging_dir,
)
from classifier_training.deploy import export_cli
from classifier_training.deploy import predict as predict_cli
from classifier_training.deploy.onnx_export import export_run
from classifier_training.recipe import ExportConfig
from test_onnx_export import BUNDLE, make_run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_run(tmp_path_factory.mktemp("export_safety"))


def test_out_dir_refusals(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "checkpoints").mkdir(parents=True)
    cases = {
        run_dir: "is the run folder",
        tmp_path / "runs": "contains the run folder",
        tmp_path: "contains the run folder",
        run_dir / "checkpoints" / "x": "is inside the run's checkpoints/",
    }
    for out, why in cases.items():
        with pytest.raises(OutDirRefusedError, match=why):
            check_out_dir(out, run_dir)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutDirRefusedError, match="is a file"):
        check_out_dir(tmp_path / "file.txt", run_dir)
    busy = tmp_path / "photos"
    busy.mkdir()
    (busy / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(OutDirRefusedError, match=r"not empty and not an export bundle"):
        check_out_dir(busy, run_dir)
    # accepted: new, empty, an existing bundle, the run's own export/
    (tmp_path / "empty").mkdir()
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / EXPORT_INFO_FILE).write_text("{}")
    for ok in ("new", "empty", "bundle"):
        assert check_out_dir(tmp_path / ok, run_dir) == (tmp_path / ok).resolve()
    assert check_out_dir(run_dir / "export", run_dir) == (run_dir / "export").resolve()


def test_export_onto_the_run_folder_or_a_busy_folder_changes_nothing(
    run: dict[str, Any], tmp_path: Path
) -> None:
    before = snapshot(run["run"])
    with pytest.raises(OutDirRefusedError, match="is the run folder"):
        export_run(run["run"], out=run["run"])
    with pytest.raises(OutDirRefusedError, match="contains the run folder"):
        export_run(run["run"], out=run["run"].parent)
    assert snapshot(run["run"]) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert export_cli.main(["--run", str(run["run"]), "--out", str(busy)]) == 1
    assert snapshot(busy) == {"notes.txt": b"mine"}


def test_out_dot_and_replacing_an_existing_bundle(
    run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "deploy"
    here.mkdir()
    monkeypatch.chdir(here)
    args = ["--run", str(run["run"]), "--out", ".", "--verify-images", "2"]
    assert export_cli.main(args) == 0
    assert sorted(p.name for p in here.iterdir()) == BUNDLE
    first = json.loads((here / "export.json").read_text())
    (here / "model_old_variant.onnx").write_text("from an older bundle")
    assert export_cli.main([*args, "--weights", "raw"]) == 0  # cwd is now an existing bundle
    assert sorted(p.name for p in here.iterdir()) == BUNDLE  # stale file gone, no staging left
    second = json.loads((here / "export.json").read_text())
    assert (first["weights"], second["weights"]) == ("ema", "raw")
    assert Path.cwd() == here and os.path.samefile(".", here)  # the shell's folder still exists
    assert "code_version" in second and second["code_version"]["package"]
    # an existing bundle elsewhere is swapped as a whole
    other = tmp_path / "other"
    export_run(run["run"], ExportConfig(verify_images=2), out=other)
    export_run(run["run"], ExportConfig(verify_images=2, weights="raw"), out=other)
    assert sorted(p.name for p in other.iterdir()) == BUNDLE
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_leftovers_of_a_killed_export_are_removed_next_time(tmp_path: Path) -> None:
    final = tmp_path / "export"
    final.mkdir()
    (final / EXPORT_INFO_FILE).write_text("{}")
    dead, alive = 2**22 + 12345, os.getpid()
    for name in (f".tmp-export-{dead}", f".old-export-{dead}", f".tmp-export-{alive}"):
        (tmp_path / name).mkdir()
    remove_stale_staging(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-export-{alive}", "export"]
    tmp = staging_dir(final)
    (tmp / EXPORT_INFO_FILE).write_text('{"new": true}')
    install_bundle(tmp, final)
    assert json.loads((final / EXPORT_INFO_FILE).read_text()) == {"new": True}


def test_predict_reports_each_bad_image_and_still_prints_the_good_ones(
    run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = export_run(run["run"], ExportConfig(verify_images=2), out=tmp_path / "bundle")
    good = sorted((run["data"] / "valid").glob("*.jpg"))[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    missing = tmp_path / "missing.jpg"
    images = [str(good[0]), str(broken), str(good[1]), str(missing)]
    code = predict_cli.main(["--model", str(bundle), *images, "--batch-size", "2"])
    assert code == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert [r["image"] for r in out] == [str(good[0]), str(good[1])]
    err = captured.err.splitlines()
    assert err[0].startswith(f"error: {broken}: cannot read image")
    assert err[1].startswith(f"error: {missing}: cannot read image")
    assert err[2] == "2 of 4 images could not be read"
