"""A damaged region fails alone: the slide finishes as ``partial`` with everything else,
the region is recorded, the run exits 1, and a re-run retries only what failed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipeline.cli import main
from pipeline.errors import SlideReadError
from pipeline.pyramid_tiff import write_pyramidal_tiff
from pipeline.run import process_slide
from pipeline.slide_run.config import RunConfig
from pipeline.slide_run.executors import NoRetry, SerialExecutor
from pipeline.slide_run.tiles import infer_tiles, predict_tiles, read_tiles, segment_tiles
from pipeline.synthetic import synthetic_he

MODEL = "pruned80.pt"
SIDE, JPEG_TILE, RUN_TILE = 768, 256, 256


def _slide(path: Path) -> Path:
    rgb, _ = synthetic_he(SIDE, SIDE, seed=3, mpp=0.25)
    return write_pyramidal_tiff(path, rgb, mpp=0.25, tile=JPEG_TILE, compression="jpeg")


def _break_tile(path: Path, row: int, col: int) -> None:
    """Overwrite one level-0 JPEG tile with zeros (the rest of the file stays intact)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        k = row * per_row + col
        offset, count = page.dataoffsets[k], page.databytecounts[k]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * count)


def _cfg(out: Path) -> RunConfig:
    return RunConfig(model=MODEL, out=str(out), tile_size=RUN_TILE, chunk=256, tissue_mask=False,
                     device="cpu")


@pytest.mark.slow
def test_one_broken_tile_gives_a_partial_slide(tmp_path: Path) -> None:
    intact = _slide(tmp_path / "intact.tif")
    broken = _slide(tmp_path / "broken.tif")
    _break_tile(broken, 1, 1)  # the centre tile: level-0 y, x 256-512

    whole = process_slide(intact, _cfg(tmp_path / "out"), SerialExecutor())
    assert whole.status == "done"
    part = process_slide(broken, _cfg(tmp_path / "out"), SerialExecutor())
    assert part.status == "partial" and 0 < part.nuclei < whole.nuclei

    out = Path(part.out_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "partial" and summary["tiles_with_damage"] >= 1
    boxes = [r["box_level0_yx"] for r in summary["unreadable_regions"]]
    assert boxes == [[256, 256, 512, 512]]  # exactly the broken stored tile
    assert "Not a JPEG file" in summary["unreadable_regions"][0]["error"]
    # the outputs are complete for the rest: labels only outside the lost regions, and
    # every nucleus far from them equals the intact slide's
    labels = zarr.open_group(str(out / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]
    ref = zarr.open_group(str(Path(whole.out_dir) / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]
    assert len(np.unique(labels[labels > 0])) == part.nuclei
    far = np.ones(labels.shape, bool)
    for y0, x0, y1, x1 in boxes:
        far[max(0, y0 - 128):y1 + 128, max(0, x0 - 128):x1 + 128] = False
    assert ((labels > 0) == (ref > 0))[far].all()
    # kept for a re-run: the tiles that met no damage, not the label blocks
    assert (out / ".work").is_dir() and not (out / ".work" / "blocks").exists()

    again = process_slide(broken, _cfg(tmp_path / "out"), SerialExecutor())
    assert again.status == "partial" and again.nuclei == part.nuclei
    assert again.counters["tiles_from_cache"] == summary["tiles_processed"] - summary["tiles_with_damage"]
    assert (zarr.open_group(str(out / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...] == labels).all()


class Interrupted(BaseException):
    """Stands for a kill: not an ``Exception``, so process_slide does not catch it."""


def _interrupt_after_the_tiles(done: int, total: int) -> None:
    if done == total:
        raise Interrupted


@pytest.mark.slow
@pytest.mark.parametrize("split", [False, True])
def test_damage_survives_an_interrupted_run(tmp_path: Path, split: bool) -> None:
    """Killed after every tile was saved, then resumed: the tiles come from their files,
    and the damage they met must come with them; the slide is ``partial`` with the same
    unreadable region as an uninterrupted run (it was ``done``, silently incomplete)."""
    broken = _slide(tmp_path / "broken.tif")
    _break_tile(broken, 1, 1)
    executor = SplitExecutor() if split else SerialExecutor()
    whole = process_slide(broken, _cfg(tmp_path / "whole"), executor)
    assert whole.status == "partial"
    with pytest.raises(Interrupted):
        process_slide(broken, _cfg(tmp_path / "resumed"), executor, _interrupt_after_the_tiles)
    resumed = process_slide(broken, _cfg(tmp_path / "resumed"), executor)
    a, b = (json.loads((Path(o.out_dir) / "summary.json").read_text()) for o in (whole, resumed))
    assert b["tiles_from_cache"] == b["tiles_processed"]  # nothing recomputed
    assert (resumed.status, b["status"]) == ("partial", "partial")
    assert b["unreadable_regions"] == a["unreadable_regions"] != []
    assert b["tiles_with_damage"] == a["tiles_with_damage"] and resumed.nuclei == whole.nuclei
    # and the re-run after that still recomputes the damaged tiles only
    again = process_slide(broken, _cfg(tmp_path / "resumed"), executor)
    assert again.counters["tiles_from_cache"] == b["tiles_processed"] - b["tiles_with_damage"]


class SplitExecutor(SerialExecutor):
    """In this process, what a GPU cluster does: each tile batch as read_tiles,
    predict_tiles and segment_tiles, each result pickled (as Dask sends it worker to
    worker) before the next."""

    def map(self, fn, items):
        import pickle

        if getattr(fn, "fn", None) is not infer_tiles:
            yield from super().map(fn, items)
            return
        for item in items:
            result = item
            for stage in (read_tiles, predict_tiles, segment_tiles):
                result = stage(pickle.loads(pickle.dumps(result)))
            yield item, result


@pytest.mark.slow
def test_split_tile_tasks_record_damage_like_one_task(tmp_path: Path) -> None:
    """Read, predict and post-process in three tasks: the damaged region, the counts and
    the labels are those of the one-task path, and a re-run reuses the same tiles."""
    broken = _slide(tmp_path / "broken.tif")
    _break_tile(broken, 1, 1)
    one = process_slide(broken, _cfg(tmp_path / "one"), SerialExecutor())
    split = process_slide(broken, _cfg(tmp_path / "split"), SplitExecutor())
    assert (split.status, split.nuclei) == (one.status, one.nuclei) == ("partial", one.nuclei)
    a, b = (json.loads((Path(o.out_dir) / "summary.json").read_text()) for o in (one, split))
    keys = ("unreadable_regions", "tiles_with_damage", "clusters_recomputed", "nuclei", "tiles_processed")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert a["clusters_recomputed"] > 0
    labels = [zarr.open_group(str(Path(o.out_dir) / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]
              for o in (one, split)]
    assert (labels[0] == labels[1]).all()
    again = process_slide(broken, _cfg(tmp_path / "split"), SplitExecutor())
    assert again.nuclei == one.nuclei
    assert again.counters["tiles_from_cache"] == b["tiles_processed"] - b["tiles_with_damage"]


@pytest.mark.slow
def test_damaged_slide_tiled_equals_whole_window(tmp_path: Path) -> None:
    """The fill is the same for every window: tiling stays exact on a damaged slide."""
    broken = _slide(tmp_path / "broken.tif")
    _break_tile(broken, 1, 2)
    small = process_slide(broken, _cfg(tmp_path / "a"), SerialExecutor())
    big = process_slide(broken, RunConfig(model=MODEL, out=str(tmp_path / "b"), tile_size=1024,
                                          chunk=256, tissue_mask=False, device="cpu"),
                        SerialExecutor())
    assert small.status == big.status == "partial" and small.nuclei == big.nuclei
    a = zarr.open_group(str(Path(small.out_dir) / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]
    b = zarr.open_group(str(Path(big.out_dir) / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]
    assert ((a > 0) == (b > 0)).all()


@pytest.mark.slow
def test_cli_exits_1_on_a_partial_slide(tmp_path: Path, capsys) -> None:
    broken = _slide(tmp_path / "slides" / "broken.tif")
    _break_tile(broken, 0, 2)
    code = main(["--quiet", "run", str(broken), "--model", MODEL, "--out", str(tmp_path / "out"),
                 "--tile-size", str(RUN_TILE), "--cluster", "none", "--no-tissue-mask"])
    assert code == 1
    assert "partial" in capsys.readouterr().out


def test_errors_that_cannot_succeed_on_retry_are_returned_not_raised() -> None:
    def unreadable(_: object) -> None:
        raise SlideReadError("x.svs: not a readable slide")

    def bug(_: object) -> None:
        raise KeyError("bug")

    assert isinstance(NoRetry(unreadable)(None), SlideReadError)
    with pytest.raises(KeyError):  # other errors still raise (and may be retried)
        NoRetry(bug)(None)
