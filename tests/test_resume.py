"""Resume never mixes settings: partial work is reused only when this run would make it
again, and a finished slide made otherwise says so when skipped."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.fingerprint import differences, read_work_fingerprint, slide_fingerprint
from pipeline.run import process_slide
from pipeline.slide import MemorySlide, register_memory_slide
from pipeline.slide_run.config import WORK_DIR, RunConfig
from pipeline.slide_run.executors import SerialExecutor
from pipeline.synthetic import synthetic_he

MODEL = "pruned80.pt"


class Interrupted(BaseException):
    """Stands for a kill: not an ``Exception``, so process_slide does not catch it."""


@pytest.fixture(scope="module")
def slide() -> str:
    torch.set_num_threads(2)
    rgb, _ = synthetic_he(400, 460, seed=5, mpp=0.25)
    return register_memory_slide(MemorySlide(rgb, mpp=0.25, name="resume"))


def _cfg(out: Path, tile: int, **kw) -> RunConfig:
    return RunConfig(model=MODEL, out=str(out), tile_size=tile, chunk=256, tissue_mask=False, **kw)


def _interrupt_after(n: int):
    def progress(done: int, total: int) -> None:
        if done >= n:
            raise Interrupted
    return progress


def _labels(out_dir: str) -> np.ndarray:
    return zarr.open_group(str(Path(out_dir) / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]


@pytest.mark.slow
def test_resume_with_other_tile_size_discards_partial_work(tmp_path: Path, slide: str, caplog) -> None:
    clean = process_slide(slide, _cfg(tmp_path / "clean", 256), SerialExecutor())
    assert clean.status == "done" and clean.nuclei > 30

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        process_slide(slide, _cfg(out, 128), SerialExecutor(), _interrupt_after(6))
    assert len(list((out / "resume" / WORK_DIR).glob("tile-*.npz"))) >= 6

    with caplog.at_level(logging.WARNING, logger="pipeline.slide_run.plan"):
        resumed = process_slide(slide, _cfg(out, 256), SerialExecutor())
    assert resumed.status == "done"
    assert resumed.counters["tiles_from_cache"] == 0
    assert "settings.tile_size" in caplog.text
    assert resumed.nuclei == clean.nuclei
    assert (_labels(resumed.out_dir) == _labels(clean.out_dir)).all()


@pytest.mark.slow
def test_resume_with_same_settings_reuses_partial_work(tmp_path: Path, slide: str) -> None:
    clean = process_slide(slide, _cfg(tmp_path / "clean", 256), SerialExecutor())
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        process_slide(slide, _cfg(out, 256), SerialExecutor(), _interrupt_after(2))
    assert read_work_fingerprint(out / "resume" / WORK_DIR)["settings"]["tile_size"] == 256

    resumed = process_slide(slide, _cfg(out, 256), SerialExecutor())
    assert resumed.status == "done" and resumed.counters["tiles_from_cache"] == 2
    assert resumed.nuclei == clean.nuclei
    assert (_labels(resumed.out_dir) == _labels(clean.out_dir)).all()


@pytest.mark.slow
def test_finished_slide_skipped_says_what_differs(tmp_path: Path, slide: str) -> None:
    first = process_slide(slide, _cfg(tmp_path, 256), SerialExecutor())
    same = process_slide(slide, _cfg(tmp_path, 256), SerialExecutor())
    assert same.skipped and same.note == ""

    other = process_slide(slide, _cfg(tmp_path, 512, cluster_margin=48), SerialExecutor())
    assert other.skipped and other.nuclei == first.nuclei
    assert "tile_size" in other.note and "cluster_margin" in other.note
    assert "--overwrite" in other.note

    redone = process_slide(slide, _cfg(tmp_path, 512, overwrite=True), SerialExecutor())
    assert not redone.skipped and redone.status == "done"


def test_differences_name_what_changed() -> None:
    old = {"settings": {"tile_size": 512, "watershed": {"fg": 0.5}}, "slide": {"halo": [1, 2]}}
    new = {"settings": {"tile_size": 1024, "watershed": {"fg": 0.5}}, "slide": {"halo": (1, 2)}}
    assert differences(old, new) == ["settings.tile_size"]
    assert differences(old, old) == []
    assert differences(None, new) == ["fingerprint missing"]
    new["settings"]["watershed"]["fg"] = 0.6
    new["slide"]["device"] = "cuda"
    assert differences(old, new) == ["settings.tile_size", "settings.watershed.fg", "slide.device"]


def test_slide_fingerprint_changes_when_the_file_is_replaced(tmp_path: Path) -> None:
    from types import SimpleNamespace

    plan = SimpleNamespace(plan=SimpleNamespace(level=0, scale=1.0, shape=(10, 10), mpp=0.25),
                           halo=96, margin=32, multiple=16, device="cpu")
    path = tmp_path / "slide.tif"
    path.write_bytes(b"one slide")
    first = slide_fingerprint(str(path), plan)
    path.write_bytes(b"another slide, same name")
    assert "file.size" in differences(first, slide_fingerprint(str(path), plan))
