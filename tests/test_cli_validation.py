"""Bad option values exit 2 with one line, before any cluster starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import commands_run
from pipeline.cli import main
from pipeline.run import RunConfig


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
