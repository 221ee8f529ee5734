"""Phase 1b, the cells (``--cell-expansion``): each tile's nuclei grown into cells once
every tile has its nuclei, measured, and saved to a cell file beside its tile file.

Why a phase of its own: a cell depends on its neighbours' nuclei (a pixel joins the
nearest nucleus within the expansion, and with ``--cell-constrain-scale`` only inside
that nucleus's scaled hull), and the neighbours of a tile's nuclei may belong to the
tiles next to it. Those are final only when phase 1 is done; then each tile's cells are
made from the stitched nuclei around them, so no cell depends on where the seams fall
(``pipeline.measure.cells``: tested tiled == whole image).

A tile's cells lie within its nuclei's extent grown by the expansion (``cell_box``);
the nuclei that can claim a pixel there lie within the expansion of that box, and are
painted whole (their hulls need every pixel). Cell ids are the nucleus ids: a tile's
cells keep its tile-local nucleus ids, and phase 2 paints them with the same offsets.
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
from pipeline.slide_run.tile_file import TileSummary, pack_texts, tile_labels, tile_nuclei, unpack_texts
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


def cell_file(work_dir: str | Path, index: int) -> Path:
    return Path(work_dir) / f"cells-{index:07d}.npz"


def make_cells(job: CellJob) -> CellSummary:
    """One tile's cells: grown from the stitched nuclei around them, measured on the
    slide's pixels, saved (labels, table columns, QuPath cell features)."""
    from pipeline.atomic import save_npz_atomic
    from pipeline.slide.open import open_slide
    from pipeline.slide.region import read_region

    image = job.plan.image
    box = cell_box(job.extent, job.settings.reach, image)
    path = cell_file(job.work_dir, job.index)
    if path.exists():
        return CellSummary(job.index, box, 0.0, True)
    t0 = time.perf_counter()
    cells, nuclei = grow_cells(job, box)
    # the tile tasks read these pixels before: damage here is in their records already
    with open_slide(job.path, mpp_override=job.mpp_override) as reader:
        rgb = read_region(reader, job.plan, box)
    columns, bodies = _measure(job, box, cells, nuclei, rgb)
    save_npz_atomic(path, labels=cells, box=np.array([box.y0, box.x0, box.y1, box.x1]),
                    features=pack_texts(bodies), **{f"col_{k}": v for k, v in columns.items()},
                    stored=("features",))
    return CellSummary(job.index, box, time.perf_counter() - t0, False)


def grow_cells(job: CellJob, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """The tile's cells and nuclei over ``box`` (tile-local ids; other tiles' cells 0)."""
    from pipeline.measure.cells import expand_nuclei

    near = box.grow(job.settings.reach).intersect(job.plan.image)
    pieces = list(_rivals(job, near))
    canvas_box = near
    for _, at in pieces:
        canvas_box = _union(canvas_box, at)
    origin = (canvas_box.y0, canvas_box.x0)
    canvas = np.zeros(canvas_box.shape, np.int32)
    for labels, at in pieces:
        np.copyto(canvas[at.slices(origin)], labels, where=labels > 0)
    grown = expand_nuclei(canvas, job.settings.expansion_px, job.settings.constrain_scale)
    crop = box.slices(origin)
    cells = np.where(grown[crop] <= job.count, grown[crop], 0)
    nuclei = np.where(canvas[crop] <= job.count, canvas[crop], 0)
    return cells, nuclei


def _rivals(job: CellJob, near: Box) -> Iterator[tuple[np.ndarray, Box]]:
    """Label crops (canvas ids, model-px box) of the nuclei with a pixel in ``near``: the
    other tiles' nuclei with ids above the tile's own (``job.count``), then the tile's
    own nuclei. Without a constraint only their pixels inside ``near`` are painted (a
    pixel farther than the reach from the tile's cells is nobody's nearest there); with
    one, whole nuclei (their hulls need every pixel). Vectorised per neighbour tile."""
    next_id = job.count
    for index, extent in job.neighbours:
        seen = extent.intersect(near)
        if index == job.index or seen.is_empty():
            continue
        labels = tile_labels(job.work_dir, index)
        ids = np.unique(labels[seen.slices((extent.y0, extent.x0))])
        ids = ids[ids > 0]
        if not ids.size:
            continue
        lut = np.zeros(int(labels.max()) + 1, np.int32)
        lut[ids] = np.arange(next_id + 1, next_id + 1 + len(ids), dtype=np.int32)
        next_id += len(ids)
        if job.settings.constrain_scale is None:
            yield lut[labels[seen.slices((extent.y0, extent.x0))]], seen
            continue
        objects = ndi.find_objects(labels)
        boxes = np.array([(objects[i - 1][0].start, objects[i - 1][1].start,
                           objects[i - 1][0].stop, objects[i - 1][1].stop) for i in ids])
        y0, x0 = boxes[:, :2].min(axis=0)
        y1, x1 = boxes[:, 2:].max(axis=0)
        whole = Box(int(y0), int(x0), int(y1), int(x1))
        yield lut[labels[whole.slices()]], whole.shift(extent.y0, extent.x0)
    yield tile_labels(job.work_dir, job.index).astype(np.int32), job.extent


def _union(a: Box, b: Box) -> Box:
    return Box(min(a.y0, b.y0), min(a.x0, b.x0), max(a.y1, b.y1), max(a.x1, b.x1))


def _measure(job: CellJob, box: Box, cells: np.ndarray, nuclei: np.ndarray,
             rgb: np.ndarray) -> tuple[dict[str, np.ndarray], list[str]]:
    """The cells' table columns (``writers.cells.CELL_COLUMNS``) and QuPath cell features
    (nucleus measurements from the tile file, behind ``Nucleus: ``)."""
    from pipeline.writers.cells import cell_features, cell_measurements

    nucleus_columns, nucleus_bodies = tile_nuclei(job.work_dir, job.index)
    columns, polygons = cell_measurements(cells, nuclei, rgb, (box.y0, box.x0), job.plan.scale,
                                          job.slide_mpp, job.origin_shift, job.stains,
                                          nucleus_columns)
    return columns, cell_features(polygons, columns, nucleus_bodies)


def cell_labels(work_dir: str, index: int) -> tuple[np.ndarray, Box]:
    """A tile's cells (tile-local ids = its nucleus ids) and their box (model px)."""
    with np.load(cell_file(work_dir, index)) as f:
        return f["labels"], Box(*(int(v) for v in f["box"]))


def cell_columns(work_dir: str, index: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """A tile's cell table columns and its cells' GeoJSON texts without their ids."""
    with np.load(cell_file(work_dir, index)) as f:
        columns = {k[4:]: f[k] for k in f.files if k.startswith("col_")}
        return columns, unpack_texts(f["features"])


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
    jobs = []
    for s in with_nuclei:
        near = cell_box(s.extent, 2 * settings.reach, plan.plan.image)
        nearby = {t.index: t for key in _keys(near) for t in by_bucket.get(key, ())}
        neighbours = tuple((t.index, t.extent) for _, t in sorted(nearby.items())
                           if not t.extent.intersect(near).is_empty())
        jobs.append(CellJob(plan.info.path, cfg.mpp, plan.plan, s.index, s.extent, s.count, neighbours,
                            work, settings, slide_mpp(plan),
                            tuple(float(v) for v in plan.info.bounds_xy), stains))  # type: ignore[arg-type]
    with completed(executor, make_cells, jobs) as results:
        return sorted((result for _, result in results), key=lambda c: c.index)


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
