"""Phase 1b, the cells (``--cell-expansion``) the tile tasks could not make: grown from
the stitched nuclei once every tile has its nuclei, measured, and saved to a cell file
beside the tile file.

Why a phase: a cell depends on its neighbours' nuclei (a pixel joins the nearest nucleus
within the expansion, and with ``--cell-constrain-scale`` only inside that nucleus's
scaled hull), and near a tile's edge these may belong to the tiles next to it, not yet
known to the tile task (``tile_cells`` makes the others there). Once phase 1 is done,
each remaining cell is made from the stitched nuclei around it, so no cell depends on
where the seams fall (``pipeline.measure.cells``: tested tiled == whole image).

The cells of a group of nuclei lie within their extent grown by the expansion
(``cell_box``); the nuclei that can claim a pixel there lie within the expansion of that
box, and only their pixels there count (with ``--cell-constrain-scale`` only the group's
own hulls decide its cells, and those nuclei lie whole inside). Cell ids are the nucleus
ids: a tile's cells keep its tile-local nucleus ids, and phase 2 paints them with the same
offsets. A tile's cells are those of its tile file and of its cell file, merged when read
(``all_cells``): the cell file holds only this phase's, so that a tile with one cell left
does not load, merge and write again the thousand its tile task made.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from pipeline.slide_run.config import RunConfig
from pipeline.slide_run.executors import completed
from pipeline.slide_run.plan import SlidePlan
from pipeline.slide_run.tile_file import (
    TileCells,
    TileSummary,
    cell_arrays,
    read_cells,
    save_arrays,
    tile_cell_ids,
    tile_cells,
    tile_file,
    tile_labels,
    tile_nuclei,
)
from pipeline.types import Box, ReadPlan


@dataclass(frozen=True)
class CellSettings:
    """How cells are grown, in model pixels (``RunConfig.cell_expansion`` is in µm)."""

    expansion_px: float
    constrain_scale: float | None

    @property
    def reach(self) -> int:
        """Model pixels past a nucleus that its cell, or a rival nucleus, can reach."""
        return int(math.ceil(self.expansion_px)) + 1


def cell_settings(cfg: RunConfig, plan: SlidePlan) -> CellSettings | None:
    """The slide's cell settings, or None when no cells are asked for."""
    if not cfg.cell_expansion:
        return None
    return CellSettings(cfg.cell_expansion / float(plan.plan.mpp), cfg.cell_constrain_scale)


def cell_box(extent: Box, reach: int, image: Box) -> Box:
    """Where the cells of the nuclei in ``extent`` can lie (model px)."""
    return extent.grow(reach).intersect(image)


@dataclass(frozen=True)
class CellJob:
    path: str
    mpp_override: float | None
    plan: ReadPlan
    index: int
    extent: Box  # the tile's nuclei (model px)
    count: int
    neighbours: tuple[tuple[int, Box], ...]  # (tile index, extent) of tiles with nuclei nearby
    work_dir: str
    settings: CellSettings
    slide_mpp: float
    origin_shift: tuple[float, float]
    stains: Any  # measure.stain.StainVectors


@dataclass(frozen=True)
class CellSummary:
    index: int
    box: Box  # the cell labels' extent (model px)
    seconds: float
    cached: bool
    made: int = 0  # cells this phase made (the tile task made the tile's others)


def cell_file(work_dir: str | Path, index: int) -> Path:
    return Path(work_dir) / f"cells-{index:07d}.npz"


def make_cells(job: CellJob) -> CellSummary:
    """One tile's cells that its tile task did not make: grown from the stitched nuclei
    around them, measured on the slide's pixels, and saved with the tile task's (labels,
    table columns, QuPath cell features) to the tile's cell file."""
    from pipeline.slide.open import open_slide
    from pipeline.slide.region import read_region

    path = cell_file(job.work_dir, job.index)
    if path.exists():
        return CellSummary(job.index, cells_box(job.work_dir, job.index), 0.0, True)
    t0 = time.perf_counter()
    labels = tile_labels(job.work_dir, job.index)
    todo = np.arange(1, job.count + 1)
    todo = todo[~np.isin(todo, tile_cell_ids(job.work_dir, job.index))]
    nucleus_columns, nucleus_bodies = tile_nuclei(job.work_dir, job.index)
    parts = []
    # the tile tasks read these pixels before: damage here is in their records already
    with open_slide(job.path, mpp_override=job.mpp_override) as reader:
        for box, ids in _cell_groups(labels, todo, job):
            cells, nuclei = grow_cells(job, box, labels, ids)
            rgb = read_region(reader, job.plan, box)
            columns, bodies = measure_cells(box, cells, nuclei, rgb, ids, nucleus_columns, nucleus_bodies,
                                            **measure_settings(job))
            parts.append(TileCells(box, cells, ids, columns, bodies))
    # only this phase's cells: the tile task's stay in the tile file (readers merge them)
    save_arrays(path, **cell_arrays(merge_cells(parts)))
    seconds = time.perf_counter() - t0
    return CellSummary(job.index, cells_box(job.work_dir, job.index), seconds, False, len(todo))


GROUPED = 64  # up to this many cells left, phase 1b grows them on the boxes of nearby groups


def _cell_groups(labels: np.ndarray, todo: np.ndarray, job: CellJob) -> list[tuple[Box, np.ndarray]]:
    """The boxes (model px) on which to grow the cells of nuclei ``todo``, each with its
    nuclei: one box for them all, or where few are left (the tile task made the others,
    so these lie in strips along the tile's edges) one per group of overlapping cell
    boxes, so that the distance transform runs on those strips, not the whole tile."""
    boxes = object_boxes(labels)
    reach, image = job.settings.reach, job.plan.image

    def box_of(ids: list[int]) -> Box:
        extent = extent_of(boxes[np.asarray(ids) - 1])
        return cell_box(extent.shift(job.extent.y0, job.extent.x0), reach, image)

    ids = [int(i) for i in todo if boxes[i - 1, 2] > boxes[i - 1, 0]]
    if len(ids) > GROUPED:
        return [(box_of(ids), np.asarray(ids, np.int64))]
    groups = [([i], box_of([i])) for i in ids]
    merged = True
    while merged:  # join groups whose boxes overlap until none do
        merged = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                if not groups[a][1].intersect(groups[b][1]).is_empty():
                    members = groups[a][0] + groups[b][0]
                    groups[a] = (members, _union(groups[a][1], groups[b][1]))
                    del groups[b]
                    merged = True
                    break
            if merged:
                break
    return [(box, np.asarray(sorted(members), np.int64)) for members, box in groups]


def object_boxes(labels: np.ndarray) -> np.ndarray:
    """Each label's box (rows: label - 1; columns y0, x0, y1, x1; all 0 for a label
    without pixels)."""
    objects = ndi.find_objects(labels)
    return np.array([(o[0].start, o[1].start, o[0].stop, o[1].stop) if o is not None else (0, 0, 0, 0)
                     for o in objects], np.int64).reshape(-1, 4)


def extent_of(boxes: np.ndarray) -> Box:
    """The box around ``object_boxes`` rows (none empty)."""
    return Box(int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max()))


def measure_settings(job: Any) -> dict[str, Any]:
    """What :func:`measure_cells` needs of a slide, from a ``CellJob`` or a ``TileJob``."""
    return {"scale": job.plan.scale, "slide_mpp": job.slide_mpp,
            "origin_shift": tuple(float(v) for v in job.origin_shift), "stains": job.stains}


def measure_cells(box: Box, cells: np.ndarray, nuclei: np.ndarray, rgb: np.ndarray, ids: np.ndarray,
                  nucleus_columns: dict[str, np.ndarray] | Any, nucleus_bodies: list[str] | Any, *,
                  scale: float, slide_mpp: float, origin_shift: tuple[float, float], stains: Any
                  ) -> tuple[dict[str, np.ndarray], list[str]]:
    """The table columns (``writers.cells.CELL_COLUMNS``) and QuPath cell features of the
    cells of nuclei ``ids`` (``cells``/``nuclei``: those only, over ``box``; ``rgb``: the
    slide's pixels there), their nucleus's measurements taken from the tile's own
    (``nucleus_columns``/``nucleus_bodies``: every nucleus of the tile, row = id - 1)."""
    from pipeline.writers.cells import cell_features, cell_measurements

    rows = np.asarray(ids, np.int64) - 1
    own = {k: np.asarray(v)[rows] for k, v in nucleus_columns.items()}
    columns, polygons = cell_measurements(cells, nuclei, rgb, (box.y0, box.x0), scale, slide_mpp,
                                          origin_shift, stains, own)
    return columns, cell_features(polygons, columns, [nucleus_bodies[i] for i in rows.tolist()])


def merge_cells(parts: list[TileCells]) -> TileCells:
    """One tile's cells from the cells of disjoint sets of its nuclei (labels on the union
    of their boxes, rows in id order; parts read without measurements merge without)."""
    if len(parts) == 1:
        return parts[0]
    box = parts[0].box
    for part in parts[1:]:
        box = _union(box, part.box)
    labels = np.zeros(box.shape, np.int32)
    for part in parts:
        np.copyto(labels[part.box.slices((box.y0, box.x0))], part.labels, where=part.labels > 0)
    ids = np.concatenate([part.ids for part in parts])
    order = np.argsort(ids, kind="stable")
    columns = {k: np.concatenate([part.columns[k] for part in parts])[order] for k in parts[0].columns}
    bodies = [b for part in parts for b in part.bodies]
    return TileCells(box, labels, ids[order], columns, [bodies[i] for i in order.tolist()] if bodies else [],
                     sum(part.seconds for part in parts))


def grow_cells(job: CellJob, box: Box, own: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cells and nuclei of the tile's nuclei ``ids`` over ``box`` (tile-local ids,
    others 0; ``box`` holds these nuclei whole); ``own``: the tile's labels."""
    from pipeline.measure.cells import expand_nuclei

    near = box.grow(job.settings.reach).intersect(job.plan.image)
    origin = (near.y0, near.x0)
    canvas = np.zeros(near.shape, np.int32)
    for labels, at in _rivals(job, near, own):
        np.copyto(canvas[at.slices(origin)], labels, where=labels > 0)
    grown = expand_nuclei(canvas, job.settings.expansion_px, job.settings.constrain_scale, only=ids)
    crop = box.slices(origin)
    nuclei = canvas[crop]
    return grown[crop], np.where(np.isin(nuclei, ids), nuclei, 0)


def _rivals(job: CellJob, near: Box, own: np.ndarray) -> Iterator[tuple[np.ndarray, Box]]:
    """Label crops (canvas ids, model-px box) of the nuclei with a pixel in ``near``, only
    their pixels there (a pixel farther than the reach from the cells made is nobody's
    nearest there, and only the wanted nuclei's hulls count, which lie inside): the other
    tiles' nuclei with ids above the tile's own (``job.count``), then the tile's own
    nuclei. Vectorised per neighbour tile."""
    next_id = job.count
    for index, extent in job.neighbours:
        seen = extent.intersect(near)
        if index == job.index or seen.is_empty():
            continue
        labels = tile_labels(job.work_dir, index)[seen.slices((extent.y0, extent.x0))]
        ids = np.unique(labels)
        ids = ids[ids > 0]
        if not ids.size:
            continue
        lut = np.zeros(int(ids[-1]) + 1, np.int32)
        lut[ids] = np.arange(next_id + 1, next_id + 1 + len(ids), dtype=np.int32)
        next_id += len(ids)
        yield lut[labels], seen
    mine = job.extent.intersect(near)
    yield own[mine.slices((job.extent.y0, job.extent.x0))].astype(np.int32, copy=False), mine


def _union(a: Box, b: Box) -> Box:
    return Box(min(a.y0, b.y0), min(a.x0, b.x0), max(a.y1, b.y1), max(a.x1, b.x1))


def all_cells(work_dir: str, index: int, measured: bool = True) -> TileCells:
    """All of a tile's cells: those its tile task made (in its tile file) and those phase
    1b made (its cell file), merged; without columns and texts with ``measured=False``."""
    parts = [tile_cells(work_dir, index, measured)]
    path = cell_file(work_dir, index)
    if path.exists():
        with np.load(path) as f:
            parts.append(read_cells(f, "", measured))
    made = [part for part in parts if part is not None]
    if not made:
        raise FileNotFoundError(f"{path}: tile {index}'s cells were not made")
    return merge_cells(made)


def cells_box(work_dir: str, index: int) -> Box:
    """The box of all of a tile's cells (model px), from the boxes its tile file and its
    cell file record: no label image is read."""
    boxes = []
    with np.load(tile_file(work_dir, index)) as f:
        if "cell_box" in f.files:
            boxes.append(Box(*(int(v) for v in f["cell_box"])))
    path = cell_file(work_dir, index)
    if path.exists():
        with np.load(path) as f:
            boxes.append(Box(*(int(v) for v in f["box"])))
    if not boxes:
        raise FileNotFoundError(f"{path}: tile {index}'s cells were not made")
    box = boxes[0]
    for other in boxes[1:]:
        box = _union(box, other)
    return box


def cell_labels(work_dir: str, index: int) -> tuple[np.ndarray, Box]:
    """A tile's cells (tile-local ids = its nucleus ids) and their box (model px)."""
    cells = all_cells(work_dir, index, measured=False)
    return cells.labels, cells.box


def cell_columns(work_dir: str, index: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """A tile's cell table columns and its cells' GeoJSON texts without their ids."""
    cells = all_cells(work_dir, index)
    return cells.columns, cells.bodies


def run_cells(plan: SlidePlan, tiles: list[TileSummary], cfg: RunConfig, executor: Any,
              work: str) -> list[CellSummary]:
    """Phase 1b: the cells of every tile with nuclei (none without ``--cell-expansion``)."""
    from pipeline.slide_run.tiles import slide_mpp

    settings = cell_settings(cfg, plan)
    if settings is None:
        return []
    with_nuclei = [s for s in tiles if s.count]
    stains = plan.stain_vectors()
    by_bucket = _buckets(with_nuclei)
    jobs, done = [], []
    for s in with_nuclei:
        if not s.cells_left and s.cell_box is not None:  # the tile task made them all
            done.append(CellSummary(s.index, s.cell_box, 0.0, s.cached))
            continue
        near = cell_box(s.extent, 2 * settings.reach, plan.plan.image)
        nearby = {t.index: t for key in _keys(near) for t in by_bucket.get(key, ())}
        neighbours = tuple((t.index, t.extent) for _, t in sorted(nearby.items())
                           if not t.extent.intersect(near).is_empty())
        jobs.append(CellJob(plan.info.path, cfg.mpp, plan.plan, s.index, s.extent, s.count, neighbours,
                            work, settings, slide_mpp(plan),
                            tuple(float(v) for v in plan.info.bounds_xy), stains))  # type: ignore[arg-type]
    with completed(executor, make_cells, jobs) as results:
        done.extend(result for _, result in results)
    return sorted(done, key=lambda c: c.index)


BUCKET = 512  # model px: the side of the grid that finds a tile's neighbours without a scan of all


def _keys(box: Box) -> Iterator[tuple[int, int]]:
    for by in range(box.y0 // BUCKET, (box.y1 - 1) // BUCKET + 1):
        for bx in range(box.x0 // BUCKET, (box.x1 - 1) // BUCKET + 1):
            yield by, bx


def _buckets(tiles: list[TileSummary]) -> dict[tuple[int, int], list[TileSummary]]:
    """Tiles by the grid squares their nuclei's extents touch."""
    out: dict[tuple[int, int], list[TileSummary]] = {}
    for t in tiles:
        for key in _keys(t.extent):
            out.setdefault(key, []).append(t)
    return out
