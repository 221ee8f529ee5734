"""Orchestration of ``wsi-nuclei run``: slide → plan → tiles → instances → outputs.

Three phases per slide, each a set of independent tasks that a Dask cluster (or a plain
loop) executes; tasks carry paths and coordinates, never pixels or weights:

1. ``infer_tiles``: read windows, run the model (loaded once per worker), segment with
   exact ownership, measure, trace polygons; one atomic ``.npz`` per tile in ``.work/``.
   A re-run skips tiles whose file exists.
2. ``write_label_block``: one task per chunk-aligned block of the level-0 label image,
   painting owned instances with global ids (prefix sums of per-tile counts, tile order).
3. outputs, tasks in parallel and then one: ``write_nuclei`` (table, GeoJSON: the single
   writer of each), ``write_layers`` (tissue mask, RGB root image) and the label pyramid's
   fine levels per block, then ``finalize_slide`` (coarse levels, store metadata, preview);
   ``summary.json`` last — a slide is done only when its summary says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.checkpoints import default_model
from pipeline.errors import ConfigError, PipelineError, SlideReadError
from pipeline.label_sampling import block_rows as block_rows  # its home; re-exported
from pipeline.label_sampling import model_box, paint_block
from pipeline.tiling import DEFAULT_CLUSTER_MARGIN, DEFAULT_TILE_SIZE
from pipeline.types import Box, ReadPlan, SlideInfo, Tile

log = logging.getLogger(__name__)

WORK_DIR = ".work"


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs besides the slide paths; defaults serve a laptop."""

    model: str = field(default_factory=default_model)
    out: str = "results"
    tile_size: int = DEFAULT_TILE_SIZE
    batch_size: int = 1
    mpp: float | None = None
    device: str = "auto"
    gzip: bool = False
    overwrite: bool = False
    tissue_mask: bool = True
    chunk: int = 1024
    cluster_margin: int = DEFAULT_CLUSTER_MARGIN
    keep_outside_tissue: bool = False  # keep nuclei whose centroid is off the tissue mask

    def validate(self) -> None:
        """Raise ``ConfigError`` (the CLI exits 2) for settings no slide can run with, before
        any cluster starts; loads the model's metadata (a missing model raises too)."""
        import math

        from models.checkpoints import load

        multiple = load(self.model, "cpu").config.size_multiple
        problems = []
        if self.tile_size <= 0 or self.tile_size % multiple:
            problems.append(f"tile size {self.tile_size} must be a positive multiple of "
                            f"{multiple} (e.g. {max(multiple, self.tile_size // multiple * multiple)})")
        if self.batch_size < 1:
            problems.append(f"batch size {self.batch_size} must be at least 1")
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            problems.append(f"--mpp {self.mpp} must be a positive number of µm per pixel")
        if self.chunk <= 0 or self.chunk % 16:
            problems.append(f"label chunk {self.chunk} must be a positive multiple of 16")
        if self.cluster_margin < 0:
            problems.append(f"cluster margin {self.cluster_margin} must not be negative")
        problems += _output_folder_problems(Path(self.out))
        if problems:
            raise ConfigError("; ".join(problems))


def _output_folder_problems(out: Path) -> list[str]:
    """Why results could not be written under ``out`` (a file there, or a folder this user
    may not write), found before any cluster starts instead of after the first slide."""
    if out.exists() and not out.is_dir():
        return [f"--out {out} is a file, not a folder"]
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return [f"--out {out}: no permission to write in {existing}"]
    return []


@dataclass(frozen=True)
class SlidePlan:
    """What the client learns about a slide from a worker (no pixels)."""

    info: SlideInfo
    plan: ReadPlan
    tiles: tuple[Tile, ...]  # tiles with tissue
    n_tiles_total: int
    tissue: Any  # pipeline.tissue.TissueMask (small, low resolution)
    halo: int
    margin: int
    multiple: int
    device: str = "cpu"  # the kind of device the planning worker's model runs on
    damaged: tuple[tuple[int, int, int, int, str], ...] = ()  # seen by the tissue mask's reads


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


# --------------------------------------------------------------------------- executors

Task = Callable[[Any], Any]


class SerialExecutor:
    """Runs tasks in this process, in order (tests, debugging, ``--workers 0``)."""

    def map(self, fn: Task, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        for item in items:
            try:
                yield item, fn(item)
            except Exception as exc:  # reported per item, like the Dask executor
                log.debug("task failed", exc_info=True)
                yield item, exc


class DaskExecutor:
    """Bounded submission to a Dask client (backpressure, retries, per-item errors).

    ``predict_resources`` (e.g. ``{"GPU": 1}``) keeps the tasks that run the network on the
    GPU workers (planning too: the fingerprint records the planning worker's device kind).
    With ``post_resources`` as well (``{"POOL": 1}``: a local GPU layout's CPU pool), a
    batch of tiles becomes three chained tasks: :func:`read_tiles` on the pool,
    :func:`predict_tiles` on a GPU worker, :func:`segment_tiles` on the pool, the windows
    and network outputs going worker to worker; ``max_in_flight`` bounds the batches in
    flight, so windows and outputs never pile up beyond that many.
    """

    def __init__(self, client: Any, max_in_flight: int = 64, retries: int = 2,
                 predict_resources: dict[str, float] | None = None,
                 post_resources: dict[str, float] | None = None):
        self.client = client
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.predict_resources = predict_resources
        self.post_resources = post_resources

    @classmethod
    def for_layout(cls, client: Any, layout: Any, **kwargs: Any) -> DaskExecutor:
        """The executor for a cluster of ``layout`` (``None``: an attached scheduler,
        whose workers are unknown: no resources are asked for)."""
        from pipeline.cluster import post_resources, predict_resources

        return cls(client, predict_resources=predict_resources(layout),
                   post_resources=post_resources(layout), **kwargs)

    def map(self, fn: Task, items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        from pipeline.cluster import TaskFailure, bounded_map

        base = getattr(fn, "fn", fn)  # NoRetry wraps the single-task phases
        resources = self.predict_resources if base in (infer_tiles, prepare_slide) else None
        then: list[tuple[Task, dict[str, float] | None]] = []
        if fn is infer_tiles and self.post_resources:  # read -> predict -> post-process
            fn, resources = read_tiles, self.post_resources
            then = [(predict_tiles, self.predict_resources), (segment_tiles, self.post_resources)]
        for item, result in bounded_map(self.client, fn, items, self.max_in_flight,
                                        retries=self.retries, resources=resources, then=then):
            yield item, result.exception if isinstance(result, TaskFailure) else result


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class PrepareJob:
    path: str
    mpp_override: float | None
    model: str
    device: str
    tissue: bool
    tile_size: int
    cluster_margin: int


def prepare_slide(job: PrepareJob) -> SlidePlan:
    """Open the slide, choose the level, compute the tissue mask and the tile list."""
    from models.inference import context_margin
    from pipeline.cluster import get_worker_model
    from pipeline.slide import open_slide, plan_read
    from pipeline.tiling import halo_for, plan_tiles
    from pipeline.tissue import full_mask, tissue_mask

    bundle = get_worker_model(job.model, job.device)
    cfg = bundle.config
    with open_slide(job.path, mpp_override=job.mpp_override) as reader:
        plan = plan_read(reader.info, bundle.mpp)
        tissue = tissue_mask(reader) if job.tissue else full_mask(reader.info)
        info = reader.info
        damaged = _damage_records(reader)
        if damaged and not reader.reads_ok:  # not a damaged region: an unreadable slide
            raise SlideReadError(f"no region of the slide can be read: {damaged[0][4]}")
    halo = halo_for(cfg, job.cluster_margin)
    tiles = plan_tiles(plan.shape, job.tile_size, halo, cfg.size_multiple, context_margin(cfg))
    kept = tuple(t for t in tiles if tissue.covers(level0_box(t.core, plan.scale)))

    # device kind and runtime ("cpu", "cuda", "openvino-int8"): outputs of two differ in the
    # last bits, so the resume fingerprint records which made the tiles
    device = getattr(bundle.net, "runtime", None) or next(bundle.net.parameters()).device.type
    return SlidePlan(info, plan, kept, len(tiles), tissue, halo, context_margin(cfg),
                     cfg.size_multiple, device, damaged)


def level0_box(box: Box, scale: float) -> Box:
    """Level-0 pixels covered by a model-pixel box."""
    return Box(int(np.floor(box.y0 * scale)), int(np.floor(box.x0 * scale)),
               int(np.ceil(box.y1 * scale)), int(np.ceil(box.x1 * scale)))


@dataclass(frozen=True)
class TileJob:
    path: str
    mpp_override: float | None
    model: str
    device: str
    plan: ReadPlan
    tiles: tuple[Tile, ...]
    work_dir: str
    margin: int
    multiple: int
    slide_mpp: float
    # (bounds_x, bounds_y) subtracted from GeoJSON coordinates on the worker; finalize
    # re-shifts (vectorised) tiles saved with another value than FinalJob.origin_shift
    origin_shift: tuple[float, float] = (0.0, 0.0)
    # the tissue mask around these tiles (TissueMask.crop); nuclei centred off it are
    # dropped on the worker, before ids are counted. None keeps every nucleus.
    tissue: Any = None


@dataclass(frozen=True)
class TileSummary:
    index: int
    count: int
    extent: Box
    recomputed: int
    giants: tuple[Box, ...]  # giant components met (model-pixel boxes as far as seen)
    seconds: float
    cached: bool
    # worker-seconds per phase (read, network, watershed, save); zeros for cached tiles
    phases: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    dropped: int = 0  # nuclei centred off the tissue, not kept
    # stored slide tiles this tile's reads found damaged (level-0 y0, x0, y1, x1, error):
    # painted as glass, so the nuclei there are missing; such tiles are recomputed on a re-run
    damaged: tuple[tuple[int, int, int, int, str], ...] = ()


PHASES = ("read", "network", "watershed", "save")


def tile_file(work_dir: str | Path, index: int) -> Path:
    return Path(work_dir) / f"tile-{index:07d}.npz"


def infer_tiles(job: TileJob) -> list[TileSummary]:
    """Phase 1 for a batch of tiles in one task (one forward pass for the batch):
    read, predict, segment, measure, save. CPU layouts and single-process runs."""
    from pipeline.slide import open_slide

    todo, out = _not_cached(job)
    if not todo:
        return out
    bundle = _worker_model(job)
    t0 = time.perf_counter()
    with open_slide(job.path, mpp_override=job.mpp_override) as reader:
        windows, saw_damage = _read_windows(reader, job, todo)
        t_read = time.perf_counter()
        probs, dists = _predict_by_shape(bundle.net, windows)
        t_net = time.perf_counter()
        shared = ((t_read - t0) / len(todo), (t_net - t_read) / len(todo))
        predict = _window_predictor(bundle.net, lambda: reader, job, windows)
        for tile, prob, dist, damaged in zip(todo, probs, dists, saw_damage):
            before = reader.damage_fills
            summary = _segment_and_save(job, tile, prob, dist, predict, bundle.watershed, shared)
            if damaged or reader.damage_fills > before:  # grown windows read too
                summary = replace(summary, damaged=_damage_records(reader))
            out.append(summary)
    return sorted(out, key=lambda s: s.index)


@dataclass
class ReadTiles:
    """A read task's result (CPU pool of a GPU layout), handed to the predict task: the
    windows of the batch's tiles that are not cached yet."""

    job: TileJob
    cached: list[TileSummary]
    tiles: list[Tile]
    windows: list[np.ndarray]
    damaged: list[tuple[tuple[int, int, int, int, str], ...]]  # per tile, if its read met damage
    read_s: float  # worker-seconds per tile


@dataclass
class PredictedTiles:
    """A predict task's result, handed to its post-processing task: the network outputs of
    the tiles, with those of every grown-cluster window their segmentation will ask for
    (:func:`pipeline.stitch.predict_grown_windows`), so that all of a slide's windows come
    from the inference worker's device."""

    job: TileJob
    cached: list[TileSummary]
    tiles: list[Tile]
    probs: list[np.ndarray]
    dists: list[np.ndarray]
    grown: list[dict[Box, tuple[np.ndarray, np.ndarray]]]
    damaged: list[tuple[tuple[int, int, int, int, str], ...]]
    shared: tuple[float, float]  # read and network worker-seconds per tile


def read_tiles(job: TileJob) -> ReadTiles:
    """The reading part of :func:`infer_tiles` (CPU pool of a GPU layout): decoding the
    slide is CPU work, and many pool processes read faster than one GPU worker would."""
    from pipeline.slide import open_slide

    todo, cached = _not_cached(job)
    if not todo:
        return ReadTiles(job, cached, [], [], [], 0.0)
    t0 = time.perf_counter()
    with open_slide(job.path, mpp_override=job.mpp_override) as reader:
        windows, saw_damage = _read_windows(reader, job, todo)
        records = _damage_records(reader) if any(saw_damage) else ()
    damaged = [records if saw else () for saw in saw_damage]
    return ReadTiles(job, cached, todo, windows, damaged, (time.perf_counter() - t0) / len(todo))


def predict_tiles(read: ReadTiles) -> PredictedTiles:
    """The network part of :func:`infer_tiles` (GPU worker of a GPU layout): predict the
    windows, then the larger windows of the clusters they cut (the slide is opened here
    only if there are any)."""
    from pipeline.stitch import predict_grown_windows

    job = read.job
    if not read.tiles:
        return PredictedTiles(job, read.cached, [], [], [], [], [], (0.0, 0.0))
    bundle = _worker_model(job)
    t0 = time.perf_counter()
    probs, dists = _predict_by_shape(bundle.net, read.windows)
    with _SlideOnDemand(job) as slide:
        predict = _window_predictor(bundle.net, slide.reader, job, read.windows)
        grown, damage = [], []
        for tile, prob, dist, records in zip(read.tiles, probs, dists, read.damaged):
            before = slide.damage_fills
            grown.append(predict_grown_windows(tile.core, tile.window, prob, dist, job.plan.image,
                                               bundle.watershed, job.margin, job.multiple, predict))
            if slide.damage_fills > before:  # a grown window met damage
                records = tuple(sorted(set(records) | set(_damage_records(slide.reader()))))
            damage.append(records)
    shared = (read.read_s, (time.perf_counter() - t0) / len(read.tiles))
    return PredictedTiles(job, read.cached, read.tiles, probs, dists, grown, damage, shared)


class _SlideOnDemand:
    """``job``'s slide, opened at the first read: a predict task reads only for grown
    clusters, and most batches have none."""

    def __init__(self, job: TileJob) -> None:
        self.job = job
        self._reader: Any = None

    def reader(self) -> Any:
        from pipeline.slide import open_slide

        if self._reader is None:
            self._reader = open_slide(self.job.path, mpp_override=self.job.mpp_override)
        return self._reader

    @property
    def damage_fills(self) -> int:
        return self._reader.damage_fills if self._reader is not None else 0

    def __enter__(self) -> _SlideOnDemand:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.close()


def segment_tiles(predicted: PredictedTiles) -> list[TileSummary]:
    """The post-processing half of :func:`infer_tiles` (CPU pool of a GPU layout): the
    same segmentation, with grown windows served from the predict task's outputs."""
    from pipeline.stitch import replay_predictor

    job, out = predicted.job, list(predicted.cached)
    if predicted.tiles:
        params = _worker_model(job).watershed
        for i, tile in enumerate(predicted.tiles):
            summary = _segment_and_save(job, tile, predicted.probs[i], predicted.dists[i],
                                        replay_predictor(predicted.grown[i]), params,
                                        predicted.shared)
            out.append(replace(summary, damaged=predicted.damaged[i]))
    return sorted(out, key=lambda s: s.index)


def _worker_model(job: TileJob) -> Any:
    from pipeline.cluster import get_worker_model

    return get_worker_model(job.model, job.device)


def _not_cached(job: TileJob) -> tuple[list[Tile], list[TileSummary]]:
    """The batch's tiles without a tile file, and the summaries of those with one."""
    todo = [t for t in job.tiles if not tile_file(job.work_dir, t.index).exists()]
    cached = [_cached_summary(job.work_dir, t) for t in job.tiles if t not in todo]
    return todo, cached


def _read_windows(reader: Any, job: TileJob, tiles: list[Tile]) -> tuple[list[np.ndarray], list[bool]]:
    """Each tile's window, and whether reading it met a damaged stored tile."""
    from pipeline.slide import read_region

    windows, saw_damage = [], []
    for t in tiles:
        before = reader.damage_fills
        windows.append(read_region(reader, job.plan, t.window))
        saw_damage.append(reader.damage_fills > before)
    return windows, saw_damage


def _window_predictor(net: Any, reader: Callable[[], Any], job: TileJob,
                      windows: list[np.ndarray]) -> Any:
    """Network outputs for any aligned window of the slide (grown clusters), computed in
    tile-sized pieces so that worker memory stays bounded; ``reader()`` gives the open
    slide."""
    from models.inference import predict_batch
    from pipeline.slide import read_region
    from pipeline.stitch import subwindow_predictor

    def predict_window(box: Box) -> tuple[np.ndarray, np.ndarray]:
        p, d = predict_batch(net, read_region(reader(), job.plan, box)[None])
        return p[0], d[0]

    return subwindow_predictor(predict_window, job.margin, job.multiple,
                               max(max(w.shape[:2]) for w in windows), job.plan.image)


def _segment_and_save(job: TileJob, tile: Tile, prob: np.ndarray, dist: np.ndarray, predict: Any,
                      params: Any, shared: tuple[float, float]) -> TileSummary:
    """One tile's instances (owned nuclei, off-tissue ones dropped), saved to its file."""
    from pipeline.stitch import segment_tile
    from pipeline.tissue import keep_in_tissue

    t_seg = time.perf_counter()
    result = segment_tile(tile.core, tile.window, prob, dist, job.plan.image, params,
                          job.margin, job.multiple, predict)
    dropped = 0
    if job.tissue is not None:
        labels, dropped = keep_in_tissue(result.labels, (result.extent.y0, result.extent.x0),
                                         job.plan.scale, job.tissue)
        result = replace(result, labels=labels)
    t_save = time.perf_counter()
    seconds = sum(shared) + t_save - t_seg
    _save_tile(job, tile, result, seconds, dropped)
    phases = (*shared, t_save - t_seg, time.perf_counter() - t_save)
    return TileSummary(tile.index, result.count, result.extent, result.recomputed, result.giants,
                       seconds, False, phases, dropped)


def _damage_records(reader: Any) -> tuple[tuple[int, int, int, int, str], ...]:
    """The reader's damaged stored tiles as level-0 boxes (y0, x0, y1, x1, error)."""
    from pipeline.slide import nominal_downsample

    out = []
    def order(item: tuple[tuple[int, Box], str]) -> tuple[int, int, int]:
        return item[0][0], item[0][1].y0, item[0][1].x0

    for (level, box), error in sorted(reader.damaged.items(), key=order):
        ds = nominal_downsample(reader.info, level)
        out.append((int(box.y0 * ds), int(box.x0 * ds), min(int(box.y1 * ds), reader.info.height),
                    min(int(box.x1 * ds), reader.info.width), error))
    return tuple(out)


def _predict_by_shape(net: Any, windows: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Network outputs per window; windows of one shape go through one forward pass
    (border tiles have smaller windows than interior ones)."""
    from models.inference import predict_batch

    probs: list[np.ndarray] = [np.empty(0)] * len(windows)
    dists: list[np.ndarray] = [np.empty(0)] * len(windows)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(windows):
        groups.setdefault(w.shape, []).append(i)
    for members in groups.values():
        p, d = predict_batch(net, np.stack([windows[i] for i in members]))
        for k, i in enumerate(members):
            probs[i], dists[i] = p[k], d[k]
    return probs, dists


def _save_tile(job: TileJob, tile: Tile, result: Any, seconds: float, dropped: int = 0) -> None:
    """Outlines, measurements and each nucleus's GeoJSON text (all of it but the id,
    which needs the global nucleus number) are made here, on the worker, vectorised over
    the tile, so the single writer of phase 3 only splices ids into text."""
    from pipeline.atomic import save_npz_atomic
    from pipeline.writers.geojson import feature_bodies, trace_tile
    from pipeline.writers.table import instance_measurements

    scale = job.plan.scale
    offset = (result.extent.y0, result.extent.x0)
    shift = (float(job.origin_shift[0]), float(job.origin_shift[1]))
    outlines = trace_tile(result.labels, offset, scale, shift)
    columns = instance_measurements(result.labels, result.prob, offset, scale, job.slide_mpp,
                                    outlines=outlines)
    values = {k: columns[k].to_numpy() for k in columns}
    bodies = "\n".join(feature_bodies(outlines.polygons, values)).encode("utf-8")
    save_npz_atomic(tile_file(job.work_dir, tile.index),
                    labels=result.labels, extent=np.array([*offset, result.extent.y1, result.extent.x1]),
                    stats=np.array([result.count, result.recomputed, dropped]),
                    giants=np.array([(b.y0, b.x0, b.y1, b.x1) for b in result.giants],
                                    np.int64).reshape(-1, 4),
                    seconds=np.array(seconds), features=np.frombuffer(bodies, dtype=np.uint8),
                    feature_shift=np.array(shift), **{f"col_{k}": v for k, v in values.items()})


def _cached_summary(work_dir: str, tile: Tile) -> TileSummary:
    with np.load(tile_file(work_dir, tile.index)) as f:
        y0, x0, y1, x1 = (int(v) for v in f["extent"])
        count, recomputed, dropped = (int(v) for v in f["stats"])
        giants = tuple(Box(*(int(v) for v in row)) for row in f["giants"])
        return TileSummary(tile.index, count, Box(y0, x0, y1, x1), recomputed, giants,
                           float(f["seconds"]), True, dropped=dropped)


@dataclass(frozen=True)
class BlockJob:
    store: Any  # pipeline.writers.labels.LabelStoreSpec
    block: Box  # level-0, chunk-aligned
    scale: float
    model_shape: tuple[int, int]
    sources: tuple[tuple[int, Box, int], ...]  # (tile index, extent, id offset)
    work_dir: str


def write_label_block(job: BlockJob) -> int:
    """Phase 2: paint one level-0 block with global ids and write it; returns the model
    pixels claimed by two tiles (0 under exact stitching). Only this task writes these
    chunks. Nearest sampling, plus bridges that keep split nuclei whole when the model is
    finer than level 0 (``pipeline.label_sampling``)."""
    from pipeline.writers.labels import write_block

    def sources() -> Iterator[tuple[np.ndarray, Box, int]]:
        for index, extent, offset in job.sources:
            with np.load(tile_file(job.work_dir, index)) as f:
                yield f["labels"], extent, offset

    collisions: list[int] = []
    labels = paint_block(job.block, job.scale, job.model_shape, job.store.shape, sources(),
                         collisions)
    write_block(job.store, job.block, labels)
    return sum(collisions)


@dataclass(frozen=True)
class FinalJob:
    path: str
    mpp_override: float | None
    slide_id: str
    store: Any
    out_dir: str
    work_dir: str
    tiles: tuple[tuple[int, int], ...]  # (tile index, id offset) in tile order
    tissue: Any
    gzip: bool
    slide_mpp: float | None
    origin_shift: tuple[int, int]
    model_name: str
    painted: tuple[Box, ...] = ()  # level-0 label blocks holding nuclei (pyramid scope)
    model_sha256: str = ""  # recorded in the table metadata


def write_layers(job: FinalJob) -> None:
    """Phase 3, one part (in parallel with :func:`write_nuclei` and the label pyramid's
    blocks): the tissue mask and the RGB root image. Only this part writes the store's
    root attributes until :func:`finalize_slide`."""
    from pipeline.overview import slide_overview
    from pipeline.slide import open_slide
    from pipeline.writers.labels import IMAGE_SIDE, write_image, write_tissue

    write_tissue(job.store, job.tissue.mask, job.tissue.level0_per_pixel)
    with open_slide(job.path, mpp_override=job.mpp_override) as reader:
        overview = slide_overview(reader, IMAGE_SIDE)  # chunked: memory stays bounded
    write_image(job.store, *overview)  # the store's root image; the preview reuses it


def write_nuclei(job: FinalJob) -> int:
    """Phase 3, one part (in parallel with :func:`write_layers` and the label pyramid's
    blocks): the nucleus table (Parquet and the store's AnnData) and the GeoJSON, one tile
    file at a time; returns the count."""
    from pipeline.writers.geojson import GeoJSONWriter
    from pipeline.writers.table import write_table

    out = Path(job.out_dir)
    count = 0

    def frames() -> Iterator[dict[str, np.ndarray]]:
        nonlocal count
        with GeoJSONWriter(_geojson_path(job), gzip=job.gzip) as writer:
            for index, offset in job.tiles:
                with np.load(tile_file(job.work_dir, index)) as f:
                    cols = {k[4:]: f[k] for k in f.files if k.startswith("col_")}
                    n = len(cols["id"])
                    if n == 0:
                        continue
                    cols["id"] = cols["id"].astype(np.uint64) + np.uint64(offset)
                    _stream_features(writer, job, f, cols)
                count += n
                yield cols

    write_table(out, frames(), store=job.store, metadata={
        "slide": job.path, "slide_id": job.slide_id, "model": job.model_name,
        "model_sha256": job.model_sha256})
    return count


def finalize_slide(job: FinalJob) -> dict[str, Any]:
    """Phase 3, last part, after all others: the label pyramid's coarse levels (above those
    the blocks made), the store's metadata (NGFF multiscales, labels, omero) and the
    preview, which draws on the image, the labels and the table."""
    from pipeline.writers.labels import PYRAMID_BLOCK_LEVELS, build_pyramid, finalize, read_image

    out = Path(job.out_dir)
    build_pyramid(job.store, job.painted, first_level=PYRAMID_BLOCK_LEVELS + 1)
    finalize(job.store, name=job.slide_id, extra_attrs={"wsi-nuclei": {"slide": job.path,
                                                                       "model": job.model_name}})
    preview = out / "preview.png"
    _write_preview(job, preview, read_image(job.store))
    return {"zarr": str(job.store.path), "geojson": str(_geojson_path(job)),
            "table": str(out / "nuclei.parquet"), "preview": str(preview)}


def _geojson_path(job: FinalJob) -> Path:
    return Path(job.out_dir) / ("nuclei.geojson.gz" if job.gzip else "nuclei.geojson")


def _write_outputs_part(part: tuple[str, Any]) -> Any:
    """One of the parallel parts of phase 3 (one task function for the executor)."""
    from pipeline.writers.labels import build_pyramid_block

    name, arg = part
    if name == "pyramid":
        return build_pyramid_block(*arg)
    return write_layers(arg) if name == "layers" else write_nuclei(arg)


def _write_outputs(executor: Any, job: FinalJob) -> tuple[int, dict[str, str]]:
    """Phase 3: nuclei (table, GeoJSON), layers (tissue, image) and the label pyramid's
    fine levels block by block, all in parallel; then the coarse levels, metadata and
    preview. Returns the nuclei written and the output paths."""
    from pipeline.writers.labels import pyramid_blocks

    parts: list[tuple[str, Any]] = [("nuclei", job), ("layers", job)]
    parts += [("pyramid", (job.store, block)) for block in pyramid_blocks(job.store, job.painted)]
    nuclei = 0
    with _mapped(executor, NoRetry(_write_outputs_part), parts) as results:
        for (name, _), result in results:
            if isinstance(result, Exception):
                raise result
            if name == "nuclei":
                nuclei = int(result)
    return nuclei, _one(executor, finalize_slide, job)


def _stream_features(writer: Any, job: FinalJob, tile: Any, cols: dict[str, np.ndarray]) -> None:
    """Write one tile's features: its worker made each nucleus's text, here only the
    ``Nucleus id`` (the global nucleus number) is spliced in. Tiles saved with another origin
    shift are re-shifted vectorised."""
    from pipeline.writers.geojson import feature_texts, shift_bodies

    bodies = tile["features"].tobytes().decode("utf-8").split("\n")
    done = tuple(float(v) for v in tile["feature_shift"])
    bodies = shift_bodies(bodies, job.origin_shift[0] - done[0], job.origin_shift[1] - done[1])
    writer.write_texts(feature_texts(cols["id"].tolist(), bodies))


def _write_preview(job: FinalJob, path: Path, overview: tuple[np.ndarray, float] | None = None) -> None:
    """``preview.png`` (pipeline.writers.preview); ``overview``: the slide overview already
    read for the store, so that the slide is not read whole twice."""
    from pipeline.slide import open_slide
    from pipeline.writers.preview import make_preview

    with open_slide(job.path, mpp_override=job.mpp_override) as reader:
        make_preview(path, reader, job.store, job.tissue, Path(job.out_dir) / "nuclei.parquet", overview)


# --------------------------------------------------------------------------- per slide


def slide_dir(cfg: RunConfig, path: str | Path, name: str | None = None) -> Path:
    """``OUT/<name>``; ``name`` from :func:`pipeline.discovery.output_names` (default: the
    slide id, right when the slide is the only one of its id in the run)."""
    from pipeline.discovery import check_name, slide_id

    return Path(cfg.out) / check_name(name if name is not None else slide_id(path))


def process_slide(path: str | Path, cfg: RunConfig, executor: Any,
                  progress: Callable[[int, int], None] | None = None,
                  name: str | None = None) -> SlideOutcome:
    """Run one slide through the three phases; never raises for slide errors.

    A finished slide is skipped (its note says which settings differ from this run's, if
    any; only ``overwrite`` recomputes it). Partial work of an interrupted run is reused
    only when its fingerprint equals this run's, and discarded otherwise."""
    from models.checkpoints import load as load_model
    from pipeline.discovery import owner_conflict
    from pipeline.fingerprint import settings_fingerprint
    from pipeline.writers.summary import is_done, read_summary, write_summary

    path = str(path)
    out = slide_dir(cfg, path, name)
    summary_path = out / "summary.json"
    conflict = owner_conflict(summary_path, path)
    if conflict:  # never skipped as done with, nor overwriting, another slide's results
        log.error("%s: %s", path, conflict)
        return SlideOutcome(path, "failed", error=conflict, out_dir=str(out))
    bundle = load_model(cfg.model, "cpu")  # metadata only on the client: name, checksum, mpp
    settings = settings_fingerprint(cfg, bundle.sha256, bundle.watershed)
    if not cfg.overwrite and is_done(summary_path):
        done = read_summary(summary_path) or {}
        return SlideOutcome(path, "done", int(done.get("nuclei", 0)), 0.0, out_dir=str(out),
                            skipped=True, note=_skip_note(done, settings))
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
        t = time.time()
        plan = _one(executor, prepare_slide, PrepareJob(path, cfg.mpp, cfg.model, cfg.device,
                                                        cfg.tissue_mask, cfg.tile_size,
                                                        cfg.cluster_margin))
        timings["prepare_s"] = time.time() - t
        summary["fingerprint"] = _claim_work_dir(out, path, settings, plan)
        t = time.time()
        tiles = _run_tiles(plan, cfg, executor, str(work), progress)
        unreadable = _unreadable_regions(plan, tiles)
        if tiles and all(s.damaged for s in tiles) and not any(s.count for s in tiles):
            raise SlideReadError(f"no region of the slide can be read: {unreadable[0]['error']}")
        timings["inference_s"] = time.time() - t
        t = time.time()
        store, painted, n_blocks, skipped_blocks, collisions = _write_blocks(plan, tiles, cfg,
                                                                             executor, out, work)
        timings["labels_s"] = time.time() - t
        t = time.time()
        offsets = _offsets(tiles)
        n, outputs = _write_outputs(executor, FinalJob(
            path, cfg.mpp, plan.info.slide_id, store, str(out), str(work),
            tuple((s.index, offsets[s.index]) for s in tiles), plan.tissue, cfg.gzip,
            plan.info.mpp, plan.info.bounds_xy, Path(cfg.model).name, painted,
            model_sha256=bundle.sha256))
        timings["outputs_s"] = time.time() - t
        if n != sum(s.count for s in tiles):
            raise RuntimeError(f"wrote {n} nuclei but tiles found {sum(s.count for s in tiles)}")
        status = "partial" if unreadable else "done"
        summary.update({
            "status": status, "nuclei": n, "dimensions": [plan.info.width, plan.info.height],
            "slide_mpp": plan.info.mpp, "model_mpp": plan.plan.mpp, "level_read": plan.plan.level,
            "scale": plan.plan.scale, "tissue_area_um2": _tissue_area(plan),
            "tiles_total": plan.n_tiles_total, "tiles_processed": len(plan.tiles),
            "tiles_skipped_no_tissue": plan.n_tiles_total - len(plan.tiles),
            "tiles_from_cache": sum(s.cached for s in tiles),
            "clusters_recomputed": sum(s.recomputed for s in tiles),
            "giant_clusters": _giant_clusters(tiles, plan.plan.scale),
            "nuclei_outside_tissue_dropped": sum(s.dropped for s in tiles),
            "label_blocks": n_blocks, "label_blocks_from_cache": skipped_blocks,
            "label_pixel_collisions": collisions,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "tile_phases_s": {name: round(sum(s.phases[k] for s in tiles), 3)
                              for k, name in enumerate(PHASES)},
            "seconds": round(time.time() - started, 3), "versions": _versions(),
            "outputs": outputs, "origin_shift_xy": list(plan.info.bounds_xy),
            "tiles_with_damage": sum(bool(s.damaged) for s in tiles),
            "unreadable_regions": unreadable,
        })
        write_summary(summary_path, summary)
        if unreadable:
            # keep the tiles for a re-run, which recomputes only those that met damage; the
            # label blocks are all repainted then (nucleus ids shift by the new counts)
            shutil.rmtree(work / "blocks", ignore_errors=True)
            for s in tiles:
                if s.damaged:
                    tile_file(work, s.index).unlink(missing_ok=True)
            log.error("%s: %d region(s) could not be read; the slide's other results are "
                      "complete (summary.json: unreadable_regions)", path, len(unreadable))
        else:
            shutil.rmtree(work, ignore_errors=True)
        return SlideOutcome(path, status, n, time.time() - started, out_dir=str(out),
                            error=f"{len(unreadable)} unreadable region(s)" if unreadable else "",
                            counters={"tiles_from_cache": summary["tiles_from_cache"],
                                      "label_blocks_from_cache": skipped_blocks})
    except Exception as exc:  # a bad slide fails alone, with its error in its summary
        log.error("%s failed: %s", path, exc)
        log.debug("traceback", exc_info=True)
        summary.update({"status": "failed", "error": f"{exc.__class__.__name__}: {exc}",
                        "seconds": round(time.time() - started, 3), "versions": _versions()})
        write_summary(summary_path, summary)
        return SlideOutcome(path, "failed", error=str(exc), seconds=time.time() - started,
                            out_dir=str(out))


def _unreadable_regions(plan: SlidePlan, tiles: list[TileSummary]) -> list[dict[str, Any]]:
    """Each damaged stored tile once (level-0 box, error), for summary.json."""
    found = {r[:4]: r[4] for s in tiles for r in s.damaged}
    found.update({r[:4]: r[4] for r in plan.damaged})
    return [{"box_level0_yx": list(box), "error": error} for box, error in sorted(found.items())]


def _skip_note(done: dict[str, Any], settings: dict[str, Any]) -> str:
    """Why a finished slide's results may not be what this run would make."""
    from pipeline.fingerprint import differences

    old = (done.get("fingerprint") or {}).get("settings")
    changed = differences(old, settings)
    if not changed:
        return ""
    return f"made with other settings ({', '.join(changed)}); --overwrite recomputes it"


def _claim_work_dir(out: Path, path: str, settings: dict[str, Any], plan: SlidePlan) -> dict[str, Any]:
    """Make ``out/.work`` hold only work this run would make: partial results of an
    interrupted run with another fingerprint (other settings, model, slide file or device
    kind; or none, from an older version) are discarded with the label store they fed.
    Returns the fingerprint, recorded in the work folder and later in the summary."""
    from pipeline.fingerprint import (
        differences,
        fingerprint,
        read_work_fingerprint,
        slide_fingerprint,
        write_work_fingerprint,
    )

    work = out / WORK_DIR
    current = fingerprint(settings, slide_fingerprint(path, plan))
    if work.exists():
        changed = differences(read_work_fingerprint(work), current)
        if changed:
            log.warning("%s: discarding partial work of an earlier run (%s differ)", path,
                        ", ".join(changed))
            shutil.rmtree(work)
            shutil.rmtree(out / "nuclei.zarr", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    write_work_fingerprint(work, current)
    return current


@dataclass(frozen=True)
class NoRetry:
    """``fn`` with errors that cannot succeed on a retry (an unreadable file, bad settings:
    :class:`PipelineError`) returned instead of raised, so that Dask neither re-runs the
    task nor logs its traceback; the client raises them (``_one``)."""

    fn: Task

    def __call__(self, job: Any) -> Any:
        try:
            return self.fn(job)
        except PipelineError as exc:
            return exc


@contextlib.contextmanager
def _mapped(executor: Any, fn: Task, items: Iterable[Any]) -> Iterator[Iterator[tuple[Any, Any]]]:
    """``executor.map(fn, items)``, closed on any exit: a generator (``DaskExecutor``)
    then releases its queued futures at once, so the tasks of a slide that failed or was
    interrupted are cancelled now, not when the traceback that holds the generator is
    freed."""
    results = executor.map(fn, items)
    try:
        yield results
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def _one(executor: Any, fn: Task, job: Any) -> Any:
    with _mapped(executor, NoRetry(fn), [job]) as results:
        for _, result in results:
            if isinstance(result, Exception):
                raise result
            return result
    raise RuntimeError("executor returned nothing")


def _run_tiles(plan: SlidePlan, cfg: RunConfig, executor: Any, work: str,
               progress: Callable[[int, int], None] | None) -> list[TileSummary]:
    # largest windows first (border tiles are smaller): the last tasks to finish are short,
    # so workers do not idle at the end of a slide; results are re-sorted by tile index
    tiles = sorted(plan.tiles, key=lambda t: (-t.window.height * t.window.width, t.index))
    batches = [tiles[i:i + cfg.batch_size] for i in range(0, len(tiles), cfg.batch_size)]
    jobs = [TileJob(plan.info.path, cfg.mpp, cfg.model, cfg.device, plan.plan, batch, work,
                    plan.margin, plan.multiple, plan.info.mpp or 0.0,
                    origin_shift=tuple(float(v) for v in plan.info.bounds_xy),
                    tissue=None if cfg.keep_outside_tissue else _tissue_around(plan, batch))
            for batch in batches]
    done: list[TileSummary] = []
    with _mapped(executor, infer_tiles, jobs) as results:
        for _, result in results:
            if isinstance(result, Exception):
                raise result
            done.extend(result)
            if progress:
                progress(len(done), len(plan.tiles))
    return sorted(done, key=lambda s: s.index)


def _giant_clusters(tiles: list[TileSummary], scale: float) -> list[list[int]]:
    """Level-0 boxes (y0, x0, y1, x1) of the giant foreground components the tiles met
    (not segmented; see ``stitch.giant_side``): the boxes each tile saw, overlapping ones
    merged, so each giant is listed once."""
    merged = [b for s in tiles for b in s.giants]
    changed = True
    while changed:  # a few boxes per slide at most: quadratic merging is fine
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                a, b = merged[i], merged[j]
                if not a.intersect(b).is_empty():
                    merged[i] = Box(min(a.y0, b.y0), min(a.x0, b.x0), max(a.y1, b.y1), max(a.x1, b.x1))
                    del merged[j]
                    changed = True
                    break
            if changed:
                break
    boxes = sorted((level0_box(b, scale) for b in merged), key=lambda b: (b.y0, b.x0))
    return [[b.y0, b.x0, b.y1, b.x1] for b in boxes]


def _tissue_around(plan: SlidePlan, tiles: list[Tile]) -> Any:
    """The tissue mask where these tiles' nuclei can lie: their windows, grown as far as a
    cluster window may grow (``stitch.MAX_WINDOW``)."""
    from pipeline.stitch import MAX_WINDOW

    y0 = min(t.window.y0 for t in tiles) - MAX_WINDOW
    x0 = min(t.window.x0 for t in tiles) - MAX_WINDOW
    y1 = max(t.window.y1 for t in tiles) + MAX_WINDOW
    x1 = max(t.window.x1 for t in tiles) + MAX_WINDOW
    return plan.tissue.crop(level0_box(Box(y0, x0, y1, x1), plan.plan.scale))


def _offsets(tiles: list[TileSummary]) -> dict[int, int]:
    offsets, total = {}, 0
    for s in tiles:
        offsets[s.index] = total
        total += s.count
    return offsets


def _write_blocks(plan: SlidePlan, tiles: list[TileSummary], cfg: RunConfig, executor: Any,
                  out: Path, work: Path) -> tuple[Any, tuple[Box, ...], int, int, int]:
    """Phase 2: one task per level-0 block that holds nuclei. Returns the store, the
    painted blocks (now or in an earlier, interrupted run), the block count, how many
    came from that earlier run, and the model pixels two tiles claimed (0 when exact)."""
    from pipeline.atomic import atomic_write_text
    from pipeline.writers.labels import create_store, open_store

    height, width = plan.info.height, plan.info.width
    store_path = out / "nuclei.zarr"
    marker_dir = work / "blocks"
    if marker_dir.exists() and store_path.exists():
        store = open_store(store_path)
    else:
        store = create_store(store_path, (height, width), cfg.chunk, plan.info.mpp)
        marker_dir.mkdir(parents=True, exist_ok=True)
    offsets = _offsets(tiles)
    step = cfg.chunk * max(1, 2048 // cfg.chunk)
    candidates = _tiles_by_block(tiles, step, plan.plan.scale, (height, width))
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
            sources = tuple((s.index, s.extent, offsets[s.index])
                            for s in candidates.get((y0 // step, x0 // step), ())
                            if not s.extent.intersect(mbox).is_empty())
            if not sources:
                continue  # no nucleus here: unwritten chunks read as the fill value 0
            jobs.append(BlockJob(store, block, plan.plan.scale, plan.plan.shape, sources, str(work)))
            painted.append(block)
    with _mapped(executor, write_label_block, jobs) as results:
        for job, result in results:
            if isinstance(result, Exception):
                raise result
            collisions += int(result)
            atomic_write_text(marker_dir / f"{job.block.y0}-{job.block.x0}", str(int(result)))
    if collisions:
        log.error("%s: %d model pixels were claimed by two tiles (a stitching bug; please "
                  "report it)", plan.info.path, collisions)
    return store, tuple(painted), len(jobs) + skipped, skipped, collisions


def _tiles_by_block(tiles: list[TileSummary], step: int, scale: float,
                    shape: tuple[int, int]) -> dict[tuple[int, int], list[TileSummary]]:
    """Tiles with nuclei that may touch each level-0 block (a superset: the caller tests
    the exact intersection), so that block planning is linear in tiles, not blocks x tiles.

    A model row ``m`` is painted on level-0 rows ``y`` with ``floor((y + 0.5) / scale) = m``,
    i.e. ``y`` in ``[m * scale - 0.5, (m + 1) * scale - 0.5)``; for ``scale < 1`` a block
    also reads its pixels' cells (``label_sampling.model_box``: model pixels whose centre
    lies in the block). One block of slack on each side absorbs both and rounding, and
    extents reaching the model edge extend to the slide edge (``block_rows`` clamps there)."""
    last = ((shape[0] - 1) // step, (shape[1] - 1) // step)
    index: dict[tuple[int, int], list[TileSummary]] = {}
    for s in tiles:
        if not s.count:
            continue
        e = s.extent
        lo = (int(e.y0 * scale) // step - 1, int(e.x0 * scale) // step - 1)
        hi = (int(e.y1 * scale) // step + 1, int(e.x1 * scale) // step + 1)
        for by in range(max(0, lo[0]), last[0] + 1 if hi[0] >= last[0] else hi[0] + 1):
            for bx in range(max(0, lo[1]), last[1] + 1 if hi[1] >= last[1] else hi[1] + 1):
                index.setdefault((by, bx), []).append(s)
    return index


def _tissue_area(plan: SlidePlan) -> float | None:
    if plan.info.mpp is None:
        return None
    return float(plan.tissue.area_um2(plan.info.mpp))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("wsi-nuclei", "torch", "numpy", "scikit-image", "zarr", "openslide-python",
                 "openslide-bin", "dask", "distributed", "shapely"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
