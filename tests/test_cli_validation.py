"""Bad option values exit 2 with one line, before any cluster starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import commands_run
from pipeline.cli import main
from pipeline.slide_run.config import RunConfig


@pytest.fixture
def slide(tmp_path: Path) -> Path:
    from tiny_slides import write_slides

    return write_slides(tmp_path / "slides", ["a.tif"])[0]


@pytest.mark.parametrize("flags, message", [
    (["--tile-size", "100"], "multiple of 16"),
    (["--tile-size", "0"], "tile size 0"),
    (["--batch-size", "0"], "batch size"),
    (["--mpp", "-0.5"], "--mpp"),
    (["--workers", "0"], "--workers"),
    (["--model", "no-such-model.pt"], "no-such-model"),
    (["--stain-vectors", "pink"], "--stain-vectors"),
    (["--cell-expansion", "-1"], "--cell-expansion"),
    (["--cell-expansion", "500"], "more than a cell"),
    (["--cell-constrain-scale", "1.5"], "needs --cell-expansion"),
    (["--cell-expansion", "5", "--cell-constrain-scale", "0.5"], "1 or more"),
])
def test_bad_values_exit_2_before_a_cluster_starts(slide: Path, tmp_path: Path, monkeypatch, capsys,
                                                   flags: list[str], message: str) -> None:
    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(commands_run, "executor_for", no_cluster)
    code = main(["run", str(slide), "--out", str(tmp_path / "out"), "--model", "pruned80.pt", *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_defaults_are_valid() -> None:
    RunConfig().validate()


def test_an_output_folder_that_cannot_be_written_exits_2(slide: Path, tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    """``--out`` naming a file, or a folder the user may not write, exits 2 before any
    cluster starts (it used to fail with a traceback after the cluster had started)."""
    import pipeline.slide_run.config as config

    monkeypatch.setattr(commands_run, "executor_for", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("a cluster was started")))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    assert main(["run", str(slide), "--out", str(a_file), "--model", "pruned80.pt"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setattr(config.os, "access", lambda path, mode: False)  # root passes any access check
    assert main(["run", str(slide), "--out", str(tmp_path / "new" / "out"), "--model", "pruned80.pt"]) == 2
    err = capsys.readouterr().err
    assert "no permission to write in" in err and "Traceback" not in err


def test_a_slide_whose_folder_cannot_be_made_fails_alone(slide: Path, tmp_path: Path) -> None:
    from pipeline.run import process_slide
    from pipeline.slide_run.executors import SerialExecutor

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("a file where the slide's folder goes")
    outcome = process_slide(slide, RunConfig(model="pruned80.pt", out=str(out), device="cpu"),
                            SerialExecutor())
    assert outcome.status == "failed" and "cannot make" in outcome.error
