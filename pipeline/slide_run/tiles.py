"""Phase 1, the tile tasks: read windows, run the model (loaded once per worker), segment
with exact ownership, measure, trace polygons; one tile file per tile (``tile_file``).
A re-run skips tiles whose file exists. On a layout with a CPU pool beside its GPUs a
batch runs as three chained tasks (:func:`read_tiles`, :func:`predict_tiles`,
:func:`segment_tiles`), elsewhere as one (:func:`infer_tiles`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.slide_run.config import RunConfig
from pipeline.slide_run.executors import NetworkTask, completed
from pipeline.slide_run.plan import SlidePlan, damage_records, level0_box
from pipeline.slide_run.tile_file import (
    Damage,
    TileSummary,
    cached_summary,
    measure_tile,
    save_tile,
    tile_file,
)
from pipeline.types import Box, ReadPlan, Tile

if TYPE_CHECKING:
    from pipeline.stitch.grown import GrownPlan


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
    # (bounds_x, bounds_y) subtracted from GeoJSON coordinates on the worker (QuPath's
    # origin: the slide's bounds)
    origin_shift: tuple[float, float] = (0.0, 0.0)
    # the tissue mask around these tiles (TissueMask.crop); nuclei centred off it are
    # dropped on the worker, before ids are counted. None keeps every nucleus.
    tissue: Any = None
    # the network runtime the slide was planned on (SlidePlan.runtime): a worker on another
    # refuses the tiles (fingerprint.check_runtime); empty: not pinned
    runtime: Mapping[str, Any] = field(default_factory=dict)
    # the slide's stain vectors (measure.stain.StainVectors), for the nuclei's intensities
    stains: Any = None
    # --stain-normalise: the slide's stain vectors, mapped to the training reference in
    # every window the network sees (measure.stain.normalise_stains); None: raw pixels
    normalise: Any = None
    # --cell-expansion: how cells are grown (slide_run.cells.CellSettings); the tile makes
    # those of its cells that it can (slide_run.tile_cells). None: no cells
    cells: Any = None


def infer_tiles(job: TileJob) -> list[TileSummary]:
    """Phase 1 for a batch of tiles in one task (one forward pass for the batch):
    read, predict, segment, measure, save. CPU layouts and single-process runs."""
    from pipeline.slide.open import open_slide

    todo, out = _not_cached(job)
    if not todo:
        return out
    bundle = _network(job)
    t0 = time.perf_counter()
    with open_slide(job.path, mpp_override=job.mpp_override) as reader:
        windows, saw_damage = _read_windows(reader, job, todo)
        t_read = time.perf_counter()
        probs, dists = _predict_by_shape(bundle.net, windows, job.normalise)
        t_net = time.perf_counter()
        shared = ((t_read - t0) / len(todo), (t_net - t_read) / len(todo))
        predict = _window_predictor(bundle.net, lambda: reader, job, _largest_side(windows))
        for tile, window, prob, dist, damaged in zip(todo, windows, probs, dists, saw_damage):
            before = reader.damage_fills

            def met(damaged: bool = damaged, before: int = before) -> Damage:
                # the tile's window, or a grown window its segmentation read
                return damage_records(reader) if damaged or reader.damage_fills > before else ()

            pixels = _pixels_of(job, tile, window, lambda: reader)
            out.append(_segment_and_save(job, tile, prob, dist, predict, bundle.watershed, shared, met,
                                         pixels))
    return sorted(out, key=lambda s: s.index)


@dataclass
class ReadTiles:
    """A read task's result (CPU pool of a GPU layout), handed to the predict task: the
    windows of the batch's tiles that are not cached yet."""

    job: TileJob
    cached: list[TileSummary]
    tiles: list[Tile]
    windows: list[np.ndarray]
    damaged: list[Damage]  # per tile, if its read met damage
    read_s: float  # worker-seconds per tile


@dataclass
class PredictedTiles:
    """A predict task's result, handed to its post-processing task: the network outputs of
    the tiles, and per tile what its segmentation needs of the clusters it grows
    (:func:`pipeline.stitch.tile.predict_grown_windows`: bits for a cluster's pixels in the
    tile, and the owner's watershed inputs; never a grown window's full outputs), so that
    all of a slide's windows come from the inference worker's device."""

    job: TileJob
    cached: list[TileSummary]
    tiles: list[Tile]
    probs: list[np.ndarray]
    dists: list[np.ndarray]
    grown: list[GrownPlan]
    damaged: list[Damage]
    shared: tuple[float, float]  # read and network worker-seconds per tile
    windows: list[np.ndarray] = field(default_factory=list)  # the slide's pixels (intensities)


def read_tiles(job: TileJob) -> ReadTiles:
    """The reading part of :func:`infer_tiles` (CPU pool of a GPU layout): decoding the
    slide is CPU work, and many pool processes read faster than one GPU worker would."""
    from pipeline.slide.open import open_slide

    todo, cached = _not_cached(job)
    if not todo:
        return ReadTiles(job, cached, [], [], [], 0.0)
    t0 = time.perf_counter()
    with open_slide(job.path, mpp_override=job.mpp_override) as reader:
        windows, saw_damage = _read_windows(reader, job, todo)
        records = damage_records(reader) if any(saw_damage) else ()
    damaged = [records if saw else () for saw in saw_damage]
    return ReadTiles(job, cached, todo, windows, damaged, (time.perf_counter() - t0) / len(todo))


def predict_tiles(read: ReadTiles) -> PredictedTiles:
    """The network part of :func:`infer_tiles` (GPU worker of a GPU layout): predict the
    windows, then the larger windows of the clusters they cut (the slide is opened here
    only if there are any)."""
    from pipeline.stitch.tile import predict_grown_windows

    job = read.job
    if not read.tiles:
        return PredictedTiles(job, read.cached, [], [], [], [], [], (0.0, 0.0))
    bundle = _network(job)
    t0 = time.perf_counter()
    probs, dists = _predict_by_shape(bundle.net, read.windows, job.normalise)
    with _SlideOnDemand(job) as slide:
        predict = _window_predictor(bundle.net, slide.reader, job, _largest_side(read.windows))
        grown, damage = [], []
        for tile, prob, dist, records in zip(read.tiles, probs, dists, read.damaged):
            before = slide.damage_fills
            grown.append(predict_grown_windows(tile.core, tile.window, prob, dist, job.plan.image,
                                               bundle.watershed, job.margin, job.multiple, predict))
            if slide.damage_fills > before:  # a grown window met damage
                records = tuple(sorted(set(records) | set(damage_records(slide.reader()))))
            damage.append(records)
    shared = (read.read_s, (time.perf_counter() - t0) / len(read.tiles))
    return PredictedTiles(job, read.cached, read.tiles, probs, dists, grown, damage, shared,
                          read.windows)


class _SlideOnDemand:
    """``job``'s slide, opened at the first read: a predict task reads only for grown
    clusters, and most batches have none."""

    def __init__(self, job: TileJob) -> None:
        self.job = job
        self._reader: Any = None

    def reader(self) -> Any:
        from pipeline.slide.open import open_slide

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
    same segmentation, with grown clusters replayed from the predict task's plan."""
    job, out = predicted.job, list(predicted.cached)
    if predicted.tiles:
        params = _worker_model(job).watershed
        with _SlideOnDemand(job) as slide:  # opened only for nuclei reaching past a window
            for i, tile in enumerate(predicted.tiles):
                before = slide.damage_fills

                def met(i: int = i, before: int = before) -> Damage:
                    if slide.damage_fills == before:
                        return predicted.damaged[i]
                    return tuple(sorted(set(predicted.damaged[i]) | set(damage_records(slide.reader()))))

                pixels = _pixels_of(job, tile, predicted.windows[i], slide.reader)
                out.append(_segment_and_save(job, tile, predicted.probs[i], predicted.dists[i],
                                             predicted.grown[i], params, predicted.shared, met, pixels))
    return sorted(out, key=lambda s: s.index)


def _worker_model(job: TileJob) -> Any:
    from pipeline.cluster import get_worker_model

    return get_worker_model(job.model, job.device)


def _network(job: TileJob) -> Any:
    """The worker's model, for tasks that run the network: only on the runtime the slide
    was planned on."""
    from pipeline.fingerprint import check_runtime, runtime_fingerprint

    bundle = _worker_model(job)
    if job.runtime:
        check_runtime(job.runtime, runtime_fingerprint(bundle))
    return bundle


def _not_cached(job: TileJob) -> tuple[list[Tile], list[TileSummary]]:
    """The batch's tiles without a tile file, and the summaries of those with one."""
    todo = [t for t in job.tiles if not tile_file(job.work_dir, t.index).exists()]
    cached = [cached_summary(job.work_dir, t) for t in job.tiles if t not in todo]
    return todo, cached


def _read_windows(reader: Any, job: TileJob, tiles: list[Tile]) -> tuple[list[np.ndarray], list[bool]]:
    """Each tile's window, and whether reading it met a damaged stored tile."""
    from pipeline.slide.region import read_region

    windows, saw_damage = [], []
    for t in tiles:
        before = reader.damage_fills
        windows.append(read_region(reader, job.plan, t.window))
        saw_damage.append(reader.damage_fills > before)
    return windows, saw_damage


def _largest_side(windows: list[np.ndarray]) -> int:
    return max(max(w.shape[:2]) for w in windows)


def _window_predictor(net: Any, reader: Callable[[], Any], job: TileJob, max_side: int) -> Any:
    """Network outputs for any aligned window of the slide (grown clusters), computed in
    pieces of at most ``max_side`` px a side (the batch's largest tile window) so that the
    network's activations stay tile-sized; ``reader()`` gives the open slide."""
    from models.inference import predict_batch
    from pipeline.slide.region import read_region
    from pipeline.stitch.grown import subwindow_predictor

    def predict_window(box: Box) -> tuple[np.ndarray, np.ndarray]:
        p, d = predict_batch(net, network_input(read_region(reader(), job.plan, box), job.normalise)[None])
        return p[0], d[0]

    return subwindow_predictor(predict_window, job.margin, job.multiple, max_side, job.plan.image)


def _pixels_of(job: TileJob, tile: Tile, window: np.ndarray, reader: Callable[[], Any]
               ) -> Callable[[Box], np.ndarray]:
    """The slide's pixels at model resolution over any box: cropped from the tile's window
    where the box lies inside it (nearly always), read otherwise (a nucleus of a grown
    cluster reaching past the window). A model pixel's value does not depend on the box it
    is read with, so either way the nucleus's intensities are the same."""
    from pipeline.slide.region import read_region

    w = tile.window

    def pixels(box: Box) -> np.ndarray:
        if w.y0 <= box.y0 and box.y1 <= w.y1 and w.x0 <= box.x0 and box.x1 <= w.x1:
            return window[box.y0 - w.y0:box.y1 - w.y0, box.x0 - w.x0:box.x1 - w.x0]
        return read_region(reader(), job.plan, box)

    return pixels


def _segment_and_save(job: TileJob, tile: Tile, prob: np.ndarray, dist: np.ndarray, predict: Any,
                      params: Any, shared: tuple[float, float], damage: Callable[[], Damage],
                      pixels: Callable[[Box], np.ndarray]) -> TileSummary:
    """One tile's instances (owned nuclei, off-tissue ones dropped), measured on the
    slide's ``pixels``, with the cells it can make (``--cell-expansion``), saved to its
    file with the damage its reads met (``damage()``, asked once every read is done)."""
    from pipeline.stitch.tile import segment_tile
    from pipeline.tissue import keep_in_tissue

    t_seg = time.perf_counter()
    rival_reach = None
    if job.cells is not None:
        from pipeline.slide_run.tile_cells import lookahead

        rival_reach = lookahead(job.cells)
    result = segment_tile(tile.core, tile.window, prob, dist, job.plan.image, params,
                          job.margin, job.multiple, predict, rival_reach=rival_reach)
    dropped = 0
    if job.tissue is not None:
        labels, dropped = keep_in_tissue(result.labels, (result.extent.y0, result.extent.x0),
                                         job.plan.scale, job.tissue)
        result = replace(result, labels=labels)
    t_save = time.perf_counter()
    rgb = pixels(result.extent) if result.count else None
    measured = measure_tile(job, result, rgb)
    t_cells = time.perf_counter()
    cells = None
    if job.cells is not None and result.count:
        from pipeline.slide_run.cells import measure_settings
        from pipeline.slide_run.tile_cells import cells_in_tile

        cells = cells_in_tile(result, job.cells, job.plan.image, job.plan.scale, job.tissue, pixels,
                              measure_settings(job), *measured)
    t_done = time.perf_counter()
    damaged = damage()
    seconds = sum(shared) + t_save - t_seg
    save_tile(job, tile, result, seconds, dropped, damaged, measured=measured, cells=cells)
    phases = (*shared, t_save - t_seg, time.perf_counter() - t_done + t_cells - t_save, t_done - t_cells)
    made = len(cells.ids) if cells is not None else 0
    return TileSummary(tile.index, result.count, result.extent, result.recomputed, result.giants,
                       seconds, False, phases, dropped, damaged,
                       cell_box=cells.box if cells is not None else None, cells_left=result.count - made)


def network_input(window: np.ndarray, normalise: Any) -> np.ndarray:
    """The pixels the network sees: the slide's, or with ``normalise`` (the slide's stain
    vectors) re-rendered in the training reference's stains. Per pixel with per-slide
    constants, so a tile's window is the same pixels of the normalised slide and tiling
    stays exact; the nuclei's intensities are measured on the slide's own pixels."""
    if normalise is None:
        return window
    from pipeline.measure.stain import normalise_stains

    return normalise_stains(window, normalise)


def _predict_by_shape(net: Any, windows: list[np.ndarray], normalise: Any = None
                      ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Network outputs per window (:func:`network_input` of each); windows of one shape go
    through one forward pass (border tiles have smaller windows than interior ones)."""
    from models.inference import predict_batch

    probs: list[np.ndarray] = [np.empty(0)] * len(windows)
    dists: list[np.ndarray] = [np.empty(0)] * len(windows)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(windows):
        groups.setdefault(w.shape, []).append(i)
    for members in groups.values():
        p, d = predict_batch(net, np.stack([network_input(windows[i], normalise) for i in members]))
        for k, i in enumerate(members):
            probs[i], dists[i] = p[k], d[k]
    return probs, dists


INFER_TILES = NetworkTask(infer_tiles, (read_tiles, predict_tiles, segment_tiles))


def run_tiles(plan: SlidePlan, cfg: RunConfig, executor: Any, work: str,
              progress: Callable[[int, int], None] | None) -> list[TileSummary]:
    """Phase 1: every tile with tissue, in batches of ``cfg.batch_size``; summaries in
    tile order. ``progress(done, total)`` after each batch."""
    from pipeline.slide_run.cells import cell_settings

    # largest windows first (border tiles are smaller): the last tasks to finish are short,
    # so workers do not idle at the end of a slide; results are re-sorted by tile index
    tiles = sorted(plan.tiles, key=lambda t: (-t.window.height * t.window.width, t.index))
    batches = [tiles[i:i + cfg.batch_size] for i in range(0, len(tiles), cfg.batch_size)]
    jobs = [TileJob(plan.info.path, cfg.mpp, cfg.model, cfg.device, plan.plan, batch, work,
                    plan.margin, plan.multiple, slide_mpp(plan),
                    origin_shift=tuple(float(v) for v in plan.info.bounds_xy),
                    tissue=None if cfg.keep_outside_tissue else _tissue_around(plan, batch),
                    runtime=plan.runtime, stains=plan.stain_vectors(),
                    normalise=plan.stain_vectors() if cfg.stain_normalise else None,
                    cells=cell_settings(cfg, plan))
            for batch in batches]
    done: list[TileSummary] = []
    with completed(executor, INFER_TILES, jobs) as results:
        for _, result in results:
            done.extend(result)
            if progress:
                progress(len(done), len(plan.tiles))
    return sorted(done, key=lambda s: s.index)


def _tissue_around(plan: SlidePlan, tiles: list[Tile]) -> Any:
    """The tissue mask where these tiles' nuclei can lie: their windows, grown as far as a
    cluster window may grow (``stitch.grown.MAX_WINDOW``)."""
    from pipeline.stitch.grown import MAX_WINDOW

    y0 = min(t.window.y0 for t in tiles) - MAX_WINDOW
    x0 = min(t.window.x0 for t in tiles) - MAX_WINDOW
    y1 = max(t.window.y1 for t in tiles) + MAX_WINDOW
    x1 = max(t.window.x1 for t in tiles) + MAX_WINDOW
    return plan.tissue.crop(level0_box(Box(y0, x0, y1, x1), plan.plan.scale))


def slide_mpp(plan: SlidePlan) -> float:
    """The slide's level-0 µm/px; planning refuses a slide without one (``plan_read``)."""
    if plan.info.mpp is None:
        raise ValueError(f"{plan.info.path}: no pixel size")
    return float(plan.info.mpp)
