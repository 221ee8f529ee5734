"""Phase 2, the label blocks: one task per chunk-aligned block of the level-0 label image,
painting owned instances with global ids (prefix sums of per-tile counts, in tile order).
A marker per painted block lets a resumed run skip it."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.label_sampling import model_box, paint_block
from pipeline.slide_run.config import RunConfig
from pipeline.slide_run.executors import completed
from pipeline.slide_run.plan import SlidePlan
from pipeline.slide_run.tile_file import TileSummary, tile_labels
from pipeline.types import Box

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockJob:
    store: Any  # pipeline.writers.labels.LabelStoreSpec
    block: Box  # level-0, chunk-aligned
    scale: float
    model_shape: tuple[int, int]
    sources: tuple[tuple[int, Box, int], ...]  # (tile index, extent, id offset)
    work_dir: str
    cell_sources: tuple[tuple[int, Box, int], ...] = ()  # (tile index, cell box, id offset)


def write_label_block(job: BlockJob) -> int:
    """Phase 2: paint one level-0 block with global ids and write it, and its cells when
    made; returns the model pixels claimed by two tiles (0 under exact stitching). Only
    this task writes these chunks. Nearest sampling, plus bridges that keep split nuclei
    whole when the model is finer than level 0 (``pipeline.label_sampling``)."""
    from pipeline.slide_run.cells import cell_labels
    from pipeline.writers.labels import CELL_NAME, LABEL_NAME, write_block

    def nuclei() -> Iterator[tuple[np.ndarray, Box, int]]:
        for index, extent, offset in job.sources:
            yield tile_labels(job.work_dir, index), extent, offset

    def cells() -> Iterator[tuple[np.ndarray, Box, int]]:
        for index, box, offset in job.cell_sources:
            yield cell_labels(job.work_dir, index)[0], box, offset

    collisions: list[int] = []
    for name, sources in ((LABEL_NAME, nuclei), (CELL_NAME, cells)):
        if name in job.store.labels:
            labels = paint_block(job.block, job.scale, job.model_shape, job.store.shape, sources(),
                                 collisions)
            write_block(job.store, job.block, labels, name)
    return sum(collisions)


def offsets(tiles: list[TileSummary]) -> dict[int, int]:
    """Each tile's first global nucleus id less one: the counts of the tiles before it."""
    out, total = {}, 0
    for s in tiles:
        out[s.index] = total
        total += s.count
    return out


@dataclass(frozen=True)
class LabelBlocks:
    """What phase 2 made: the label store and its blocks holding nuclei."""

    store: Any  # pipeline.writers.labels.LabelStoreSpec
    painted: tuple[Box, ...]  # painted now or in an earlier, interrupted run (pyramid scope)
    count: int
    from_cache: int  # painted by that earlier run
    collisions: int  # model pixels claimed by two tiles (0 under exact stitching)


def write_blocks(plan: SlidePlan, tiles: list[TileSummary], cfg: RunConfig, executor: Any,
                 out: Path, work: Path, cells: Sequence[Any] = ()) -> LabelBlocks:
    """Phase 2: one task per level-0 block that holds nuclei (or cells: ``cells`` are
    phase 1b's ``CellSummary``s, when made)."""
    from pipeline.atomic import atomic_write_text
    from pipeline.writers.labels import CELL_NAME, LABEL_NAME, create_store, open_store

    height, width = plan.info.height, plan.info.width
    store_path = out / "nuclei.zarr"
    marker_dir = work / "blocks"
    if marker_dir.exists() and store_path.exists():
        store = open_store(store_path)
    else:
        store = create_store(store_path, (height, width), cfg.chunk, plan.info.mpp,
                             labels=(LABEL_NAME, CELL_NAME) if cells else (LABEL_NAME,))
        marker_dir.mkdir(parents=True, exist_ok=True)
    first_ids = offsets(tiles)
    step = cfg.chunk * max(1, 2048 // cfg.chunk)
    candidates = _tiles_by_block([(s.index, s.extent) for s in tiles if s.count], step,
                                 plan.plan.scale, (height, width))
    cell_candidates = _tiles_by_block([(c.index, c.box) for c in cells], step, plan.plan.scale,
                                      (height, width))
    jobs, painted, skipped, collisions = [], [], 0, 0
    for y0 in range(0, height, step):
        for x0 in range(0, width, step):
            block = Box(y0, x0, min(y0 + step, height), min(x0 + step, width))
            marker = marker_dir / f"{y0}-{x0}"
            if marker.exists():  # painted by an interrupted run; holds its collision count
                skipped += 1
                collisions += int(marker.read_text() or 0)
                painted.append(block)
                continue
            mbox = model_box(block, plan.plan.scale, plan.plan.shape)
            key = (y0 // step, x0 // step)
            sources = tuple((index, extent, first_ids[index]) for index, extent in candidates.get(key, ())
                            if not extent.intersect(mbox).is_empty())
            cell_sources = tuple((index, box, first_ids[index]) for index, box in cell_candidates.get(key, ())
                                 if not box.intersect(mbox).is_empty())
            if not sources and not cell_sources:
                continue  # no nucleus here: unwritten chunks read as the fill value 0
            jobs.append(BlockJob(store, block, plan.plan.scale, plan.plan.shape, sources, str(work),
                                 cell_sources))
            painted.append(block)
    with completed(executor, write_label_block, jobs) as results:
        for job, result in results:
            collisions += int(result)
            atomic_write_text(marker_dir / f"{job.block.y0}-{job.block.x0}", str(int(result)))
    if collisions:
        log.error("%s: %d model pixels were claimed by two tiles (a stitching bug; please "
                  "report it)", plan.info.path, collisions)
    return LabelBlocks(store, tuple(painted), len(jobs) + skipped, skipped, collisions)


def _tiles_by_block(tiles: list[tuple[int, Box]], step: int, scale: float,
                    shape: tuple[int, int]) -> dict[tuple[int, int], list[tuple[int, Box]]]:
    """Tiles (index, model-px extent of their nuclei or cells) that may touch each level-0
    block (a superset: the caller tests the exact intersection), so that block planning
    is linear in tiles, not blocks x tiles.

    A model row ``m`` is painted on level-0 rows ``y`` with ``floor((y + 0.5) / scale) = m``,
    i.e. ``y`` in ``[m * scale - 0.5, (m + 1) * scale - 0.5)``; for ``scale < 1`` a block
    also reads its pixels' cells (``label_sampling.model_box``: model pixels whose centre
    lies in the block). One block of slack on each side absorbs both and rounding, and
    extents reaching the model edge extend to the slide edge (``block_rows`` clamps there)."""
    last = ((shape[0] - 1) // step, (shape[1] - 1) // step)
    index: dict[tuple[int, int], list[tuple[int, Box]]] = {}
    for s in tiles:
        e = s[1]
        lo = (int(e.y0 * scale) // step - 1, int(e.x0 * scale) // step - 1)
        hi = (int(e.y1 * scale) // step + 1, int(e.x1 * scale) // step + 1)
        for by in range(max(0, lo[0]), last[0] + 1 if hi[0] >= last[0] else hi[0] + 1):
            for bx in range(max(0, lo[1]), last[1] + 1 if hi[1] >= last[1] else hi[1] + 1):
                index.setdefault((by, bx), []).append(s)
    return index


