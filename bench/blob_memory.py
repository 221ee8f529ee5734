"""What one big foreground blob costs the tile tasks: bytes shipped and peak memory.

    python -m bench.blob_memory                      # blobs of 1000, 2000, 4000 px, tile 1024
    python -m bench.blob_memory --sides 7000         # one size (a grown window near MAX_WINDOW)
    python -m bench.blob_memory --quick              # seconds: small blobs, tile 128

A foreground component larger than a tile's halo is recomputed on larger windows by every
tile whose core it touches (``pipeline.stitch``). On a GPU layout the network runs on the
GPU worker and the watershed on the CPU pool, so what the predict task hands to the
segment task for those windows travels between processes. This benchmark builds a
procedural slide with one dark disc (1-px light specks at ~2 %, so its foreground mask is
not trivially compressible) and the hand-set darkness model (``bench.common``: dark =
nucleus, so the disc is one foreground component), and runs the tiles whose window touches
the disc both ways, in this process, one tile per task:

* **split** (a local GPU layout): ``read_tiles`` -> ``predict_tiles`` -> ``segment_tiles``,
  each result pickled as Dask sends it worker to worker; the pickle sizes are the bytes
  shipped (read -> predict: the windows; predict -> segment: the network outputs);
* **one task** (CPU layouts): ``infer_tiles``.

Per stage it records the peak of numpy's heap above the stage's start (``tracemalloc``:
exact and allocator-independent; torch's own buffers are not in it) and the growth of the
process's peak RSS (Linux ``VmHWM``, reset before each stage by ``/proc/self/clear_refs``).
Both paths must give every tile the same nuclei, counts and recomputed clusters (checked).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import (
    GLASS_RGB,
    default_json,
    headline,
    mib,
    quiet_logs,
    run_info,
    scratch,
    set_threads,
    tiny_checkpoint,
    write_json,
)
from pipeline.types import Box

NAME = "blob_memory"
DARK_RGB = (60, 30, 90)  # haematoxylin-dark: the darkness model calls it nucleus
SPECK_EVERY = 53  # a light 1-px speck where (y * 7919 + x * 104729) % SPECK_EVERY == 0 (~2 %)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=None,
                        help="blob diameters, model px (default 1000 2000 4000; quick 150 300)")
    parser.add_argument("--tile", type=int, default=None, help="tile size (default 1024; quick 128)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class BlobPixels:
    """A dark disc on glass, the same pixel wherever it is read from (box-invariant, as
    exact stitching needs); coarse levels are not read (no tissue mask)."""

    centre: tuple[float, float]
    radius: float

    def __call__(self, level: int, box: Box) -> np.ndarray:
        ds = 2**level
        yy, xx = np.mgrid[box.y0:box.y1, box.x0:box.x1]
        yy, xx = yy * ds, xx * ds
        disc = (yy - self.centre[0]) ** 2 + (xx - self.centre[1]) ** 2 <= self.radius**2
        disc &= (yy * 7919 + xx * 104729) % SPECK_EVERY != 0
        out = np.empty(box.shape + (3,), np.uint8)
        out[:] = GLASS_RGB
        out[disc] = DARK_RGB
        return out


@dataclass
class Stage:
    """Peak memory of one stage above its start, bytes."""

    heap: int = 0  # numpy's heap (tracemalloc)
    rss: int = 0  # VmHWM growth (Linux; 0 elsewhere)


def _vm(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_rss_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measured(fn: Callable[[Any], Any], arg: Any) -> tuple[Any, Stage]:
    """``fn(arg)`` and its peak memory above the start."""
    _reset_rss_peak()
    rss0 = _vm("VmRSS")
    tracemalloc.reset_peak()
    heap0 = tracemalloc.get_traced_memory()[0]
    result = fn(arg)
    heap = tracemalloc.get_traced_memory()[1] - heap0
    return result, Stage(heap, max(0, _vm("VmHWM") - rss0))


class MeasuringExecutor:
    """Runs the tile tasks of ``run_tiles`` in this process, one way or the other, and
    records per tile what each stage cost."""

    def __init__(self, split: bool) -> None:
        from pipeline.slide_run.executors import SerialExecutor

        self.split = split
        self.rows: list[dict[str, Any]] = []
        self._serial = SerialExecutor()

    def map(self, fn: Any, items: Any) -> Any:
        from pipeline.slide_run.tiles import predict_tiles, read_tiles, segment_tiles

        if getattr(fn, "stages", None) is None:
            yield from self._serial.map(fn, items)
            return
        for job in items:
            row: dict[str, Any] = {"tile": job.tiles[0].index}
            if self.split:
                read, row["read"] = measured(read_tiles, job)
                sent = pickle.dumps(read, protocol=pickle.HIGHEST_PROTOCOL)
                row["read_to_predict_bytes"] = len(sent)
                del read
                predicted, row["predict"] = measured(predict_tiles, pickle.loads(sent))
                sent = pickle.dumps(predicted, protocol=pickle.HIGHEST_PROTOCOL)
                row["predict_to_segment_bytes"] = len(sent)
                del predicted
                result, row["segment"] = measured(segment_tiles, pickle.loads(sent))
                del sent
            else:
                result, row["one_task"] = measured(fn.fn, job)
            (summary,) = result
            row.update(nuclei=summary.count, recomputed=summary.recomputed)
            self.rows.append(row)
            yield job, result


def blob_plan(side: int, tile: int, model: str) -> tuple[Any, Any, str]:
    """A slide with one disc of diameter ``side`` (a tile's width of glass around it),
    registered in this process, and its plan restricted to the tiles whose window meets
    the disc's box (the others are glass)."""
    from pipeline.slide.memory import MemorySlide
    from pipeline.slide.open import register_memory_slide
    from pipeline.slide_run.plan import PrepareJob, prepare_slide

    extent = side + 2 * tile + 64
    fn = BlobPixels((extent / 2, extent / 2 + 7), side / 2)
    slide = MemorySlide.procedural(extent, extent, 0.25, fn, name=f"blob-{side}")
    path = register_memory_slide(slide)
    plan = prepare_slide(PrepareJob(path, None, model, "cpu", False, tile, 64))
    r = side / 2
    disc = Box(int(fn.centre[0] - r), int(fn.centre[1] - r), int(fn.centre[0] + r) + 1,
               int(fn.centre[1] + r) + 1)
    tiles = tuple(t for t in plan.tiles if not t.window.intersect(disc).is_empty())
    return replace(plan, tiles=tiles), disc, path


def measure(side: int, tile: int, model: str, work: Path) -> dict[str, Any]:
    """Both paths on one blob: per stage, the largest peak over the tiles; bytes shipped."""
    from pipeline.slide.open import unregister_memory_slide
    from pipeline.slide_run.config import RunConfig
    from pipeline.slide_run.tile_file import tile_labels
    from pipeline.slide_run.tiles import run_tiles

    plan, disc, path = blob_plan(side, tile, model)
    cfg = RunConfig(model=model, out=str(work), tile_size=tile, device="cpu", tissue_mask=False,
                    keep_outside_tissue=True)
    runs = {}
    for split in (True, False):
        executor = MeasuringExecutor(split)
        folder = work / f"{side}-{'split' if split else 'one'}"
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        run_tiles(plan, cfg, executor, str(folder), None)
        runs[split] = (executor.rows, folder, time.perf_counter() - t0)
    unregister_memory_slide(path)
    (split_rows, split_dir, split_s), (one_rows, one_dir, one_s) = runs[True], runs[False]
    key = {r["tile"]: (r["nuclei"], r["recomputed"]) for r in one_rows}
    same = key == {r["tile"]: (r["nuclei"], r["recomputed"]) for r in split_rows} and all(
        np.array_equal(tile_labels(str(split_dir), t.index), tile_labels(str(one_dir), t.index))
        for t in plan.tiles)
    shipped = [r["predict_to_segment_bytes"] for r in split_rows]
    owner = max(split_rows, key=lambda r: r["nuclei"])
    others = [r["predict_to_segment_bytes"] for r in split_rows if r is not owner]

    def peak(rows: list[dict[str, Any]], stage: str, what: str) -> float:
        return mib(max(getattr(r[stage], what) for r in rows))

    return {
        "blob_px": side, "disc_box": [disc.y0, disc.x0, disc.y1, disc.x1], "tiles": len(plan.tiles),
        "tiles_recomputing": sum(1 for r in one_rows if r["recomputed"]),
        "nuclei": sum(r["nuclei"] for r in one_rows), "same_results": bool(same),
        "shipped_mib": {"max": mib(max(shipped)), "total": mib(sum(shipped)),
                        "owner": mib(owner["predict_to_segment_bytes"]),
                        "max_other": mib(max(others)) if others else 0.0,
                        "read_to_predict_max": mib(max(r["read_to_predict_bytes"] for r in split_rows))},
        "peak_heap_mib": {s: peak(rows, s, "heap") for rows, s in
                          ((split_rows, "read"), (split_rows, "predict"), (split_rows, "segment"),
                           (one_rows, "one_task"))},
        "peak_rss_growth_mib": {s: peak(rows, s, "rss") for rows, s in
                                ((split_rows, "read"), (split_rows, "predict"), (split_rows, "segment"),
                                 (one_rows, "one_task"))},
        "seconds": {"split": split_s, "one_task": one_s},
    }


def print_rows(rows: list[dict[str, Any]]) -> None:
    print("shipped predict -> segment, MiB per tile | peak numpy heap, MiB | peak RSS growth, MiB")
    print(f"{'blob px':>8}{'tiles':>6}{'grown':>6}{'owner':>8}{'other':>8}{'all':>8}  |{'read':>6}"
          f"{'predict':>8}{'segment':>8}{'1 task':>7}  |{'predict':>8}{'segment':>8}{'1 task':>7}")
    for r in rows:
        s, h, g = r["shipped_mib"], r["peak_heap_mib"], r["peak_rss_growth_mib"]
        print(f"{r['blob_px']:>8}{r['tiles']:>6}{r['tiles_recomputing']:>6}{s['owner']:>8.1f}"
              f"{s['max_other']:>8.1f}{s['total']:>8.1f}  |{h['read']:>6.0f}{h['predict']:>8.0f}"
              f"{h['segment']:>8.0f}{h['one_task']:>7.0f}  |{g['predict']:>8.0f}{g['segment']:>8.0f}"
              f"{g['one_task']:>7.0f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    quiet_logs()
    threads = set_threads(args.threads)
    info = run_info(NAME, argv, threads)
    sides = args.sides or ([150, 300] if args.quick else [1000, 2000, 4000])
    tile = args.tile or (128 if args.quick else 1024)
    tracemalloc.start()
    rows = []
    with scratch("bench-blob-") as work:
        model = str(tiny_checkpoint(work))
        for side in tqdm(sides, desc="blobs", unit="blob", file=sys.stderr):
            rows.append(measure(side, tile, model, work))
    tracemalloc.stop()
    print(f"one dark disc per slide, tile {tile}, hand-set darkness model; 'other': the largest of the "
          "tiles that do not own the disc")
    print_rows(rows)
    big = rows[-1]
    summary = {**info, "tile": tile, "model": "tiny (hand-set darkness)", "blobs": rows,
               "same_results": all(r["same_results"] for r in rows)}
    summary["headline"] = headline(
        f"{big['blob_px']}-px blob, tile {tile}: predict -> segment {big['shipped_mib']['owner']:.1f} MiB "
        f"for the owning tile, at most {big['shipped_mib']['max_other']:.1f} MiB for each of the other "
        f"{big['tiles'] - 1}; peak numpy heap predict {big['peak_heap_mib']['predict']:.0f} / segment "
        f"{big['peak_heap_mib']['segment']:.0f} / one task {big['peak_heap_mib']['one_task']:.0f} MiB; "
        f"{'same' if summary['same_results'] else 'DIFFERENT'} results both ways")
    summary["wall_s"] = time.perf_counter() - started
    write_json(args.json or default_json(NAME, args.quick), summary)
    return summary


if __name__ == "__main__":
    main()
