"""Orchestration of ``wsi-nuclei run``: slide → plan → tiles → label blocks → outputs.

Each phase is a set of independent tasks that a Dask cluster (or a plain loop) executes;
tasks carry paths and coordinates, never pixels or weights. The phases live in
``pipeline.slide_run`` (``docs/design.md`` maps them); this module drives one slide
through them, and ``summary.json`` is written last: a slide is done only when its summary
says so.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import SlideReadError
from pipeline.slide_run.blocks import offsets, write_blocks
from pipeline.slide_run.cells import run_cells
from pipeline.slide_run.config import WORK_DIR, RunConfig, slide_dir
from pipeline.slide_run.executors import one
from pipeline.slide_run.outputs import FinalJob, write_outputs
from pipeline.slide_run.plan import PREPARE_SLIDE, WORKER_RUNTIME, PrepareJob, claim_work_dir, skip_note
from pipeline.slide_run.report import missing_regions, slide_report, unreadable_regions, versions
from pipeline.slide_run.tile_file import TileSummary, tile_file
from pipeline.slide_run.tiles import run_tiles, slide_mpp

log = logging.getLogger(__name__)


@dataclass
class SlideOutcome:
    slide: str
    status: str
    nuclei: int = 0
    seconds: float = 0.0
    error: str = ""
    out_dir: str = ""
    skipped: bool = False
    counters: dict[str, int] = field(default_factory=dict)
    note: str = ""  # e.g. why a skipped slide's results differ from this run's settings


def process_slide(path: str | Path, cfg: RunConfig, executor: Any,
                  progress: Callable[[int, int], None] | None = None,
                  name: str | None = None) -> SlideOutcome:
    """Run one slide through the phases; never raises for slide errors.

    A finished slide is skipped (its note says which settings differ from this run's, if
    any; only ``overwrite`` recomputes it). Partial work of an interrupted run is reused
    only when its fingerprint equals this run's, and discarded otherwise."""
    from pipeline.discovery import owner_conflict
    from pipeline.fingerprint import run_runtime, settings_fingerprint
    from pipeline.writers.summary import is_done, read_summary, write_summary

    path = str(path)
    out = slide_dir(cfg, path, name)
    summary_path = out / "summary.json"
    conflict = owner_conflict(summary_path, path)
    if conflict:  # never skipped as done with, nor overwriting, another slide's results
        log.error("%s: %s", path, conflict)
        return SlideOutcome(path, "failed", error=conflict, out_dir=str(out))
    bundle = model_metadata(cfg.model)  # metadata only on the client: name, checksum, mpp
    settings = settings_fingerprint(cfg, bundle.sha256, bundle.watershed)
    if not cfg.overwrite and is_done(summary_path):
        done = read_summary(summary_path) or {}
        runtime = run_runtime(one(executor, WORKER_RUNTIME, (cfg.model, cfg.device)), cfg.batch_size)
        return SlideOutcome(path, "done", int(done.get("nuclei", 0)), 0.0, out_dir=str(out),
                            skipped=True, note=skip_note(done, settings, runtime))
    try:
        if cfg.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a file in the way, a full or read-only disk
        log.error("%s: cannot make its output folder %s: %s", path, out, exc)
        return SlideOutcome(path, "failed", error=f"cannot make {out}: {exc}", out_dir=str(out))
    work = out / WORK_DIR
    started = time.time()
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"slide": path, "status": "running", "model": str(bundle.path),
                               "model_sha256": bundle.sha256, "config": asdict(cfg)}
    try:
        with _timed(timings, "prepare_s"):
            plan = one(executor, PREPARE_SLIDE, PrepareJob(path, cfg.mpp, cfg.model, cfg.device,
                                                           cfg.tissue_mask, cfg.tile_size,
                                                           cfg.cluster_margin, cfg.stain_vectors))
        summary["fingerprint"] = claim_work_dir(out, path, settings, plan, cfg.batch_size)
        with _timed(timings, "inference_s"):
            tiles = run_tiles(plan, cfg, executor, str(work), progress)
            unreadable = unreadable_regions(plan, tiles)
            if tiles and all(s.damaged for s in tiles) and not any(s.count for s in tiles):
                raise SlideReadError(f"no region of the slide can be read: {unreadable[0]['error']}")
        with _timed(timings, "cells_s"):
            cells = run_cells(plan, tiles, cfg, executor, str(work))
        with _timed(timings, "labels_s"):
            blocks = write_blocks(plan, tiles, cfg, executor, out, work, cells)
        with _timed(timings, "outputs_s"):
            first_ids = offsets(tiles)
            n, outputs = write_outputs(executor, FinalJob(
                path, cfg.mpp, plan.info.slide_id, blocks.store, str(out), str(work),
                tuple((s.index, first_ids[s.index]) for s in tiles), plan.tissue, cfg.gzip,
                slide_mpp(plan), Path(cfg.model).name, blocks.painted, model_sha256=bundle.sha256,
                cells=bool(cells), stains=plan.stains))
        if n != sum(s.count for s in tiles):
            raise RuntimeError(f"wrote {n} nuclei but tiles found {sum(s.count for s in tiles)}")
        summary.update(slide_report(plan, tiles, blocks, timings))
        if cells:
            summary["cells"] = {"expansion_um": cfg.cell_expansion,
                                "constrain_scale": cfg.cell_constrain_scale,
                                # tile tasks' cell work and phase 1b's
                                "worker_s": round(sum(s.phases[-1] for s in tiles)
                                                  + sum(c.seconds for c in cells), 3),
                                "made_in_tile_tasks": sum(s.count - s.cells_left for s in tiles),
                                "made_in_phase_1b": sum(c.made for c in cells),
                                "tiles_from_cache": sum(c.cached for c in cells)}
        lacking = missing_regions(path, summary)
        status = "partial" if lacking else "done"
        summary.update({"status": status, "nuclei": n, "outputs": outputs, "versions": versions(),
                        "seconds": round(time.time() - started, 3)})
        write_summary(summary_path, summary)
        _settle_work(work, tiles, keep=bool(lacking))
        return SlideOutcome(path, status, n, time.time() - started, out_dir=str(out),
                            error="; ".join(lacking),
                            counters={"tiles_from_cache": summary["tiles_from_cache"],
                                      "label_blocks_from_cache": blocks.from_cache})
    except Exception as exc:  # a bad slide fails alone, with its error in its summary
        log.error("%s failed: %s", path, exc)
        log.debug("traceback", exc_info=True)
        summary.update({"status": "failed", "error": f"{exc.__class__.__name__}: {exc}",
                        "seconds": round(time.time() - started, 3), "versions": versions()})
        write_summary(summary_path, summary)
        return SlideOutcome(path, "failed", error=str(exc), seconds=time.time() - started,
                            out_dir=str(out))


def model_metadata(model: str | Path) -> Any:
    """The checkpoint as the client reads it (path, checksum, mpp, watershed), loaded once
    per version of its file: each slide of a batch paid ~0.2 s of ``torch.load`` and
    hashing otherwise."""
    from models.checkpoints import resolve

    path = resolve(model)
    stat = path.stat()
    return _load_metadata(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_metadata(path: str, size: int, mtime_ns: int) -> Any:
    """``checkpoints.load`` keyed by the file's size and mtime too (a rewritten file loads again)."""
    from models.checkpoints import load

    return load(path, "cpu")


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """``timings[name]``: the seconds the block took (not set when it raises)."""
    t = time.time()
    yield
    timings[name] = time.time() - t


def _settle_work(work: Path, tiles: list[TileSummary], keep: bool) -> None:
    """Remove a finished slide's work folder, or for a partial slide (``keep``) keep its tiles
    for a re-run, which recomputes only those that met damage (giant clusters come back
    from the tile files, as they would again); the label blocks are all repainted then
    (nucleus ids shift by the new counts)."""
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
        return
    shutil.rmtree(work / "blocks", ignore_errors=True)
    for cells in work.glob("cells-*.npz"):  # made from neighbours that may be recomputed
        cells.unlink()
    for s in tiles:
        if s.damaged:
            tile_file(work, s.index).unlink(missing_ok=True)
