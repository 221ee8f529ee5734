"""Exact, seam-free instances from tiles.

The watershed post-processing is a function of each foreground component alone
(``models.watershed`` contract), and a window's network output is exact away from its
edge (``models.inference``). So a tile can decide, by itself, the final instances of every
foreground component that lies entirely inside its *valid box* (window minus the
receptive-field margin, clipped to the image). Ownership: the tile whose core holds the
component's first pixel in raster order keeps it; nobody else does. Components that leave
the valid box are recomputed on a larger window around them until they fit. Result: the
same nuclei with the same pixels as whole-image processing, each exactly once.

Giant components: a foreground component whose bounding box is wider or taller than
``giant_side`` (MAX_WINDOW less the margins; 2-4 mm at the shipped resolutions, never a
real nucleus cluster: a fold, pen or an out-of-focus smear) is not segmented by anybody.
The rule is a property of the component alone, so every tile decides it the same way: a
tile that sees the component complete measures its box, and a tile growing a window
around it either completes (then it measures the same box) or sees its box pass
``giant_side`` while the window stays within ``MAX_WINDOW`` (checked before predicting).
So no giant is split, doubled or painted twice, and ``drop_giants`` applied to a
whole-image result gives exactly the tiled one. Tiles report the boxes they saw
(``TileInstances.giants``) for the run's summary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from models.config import WatershedParams
from models.watershed import foreground_components
from pipeline.stitch.components import (
    Piece,
    box_side,
    edge_ids,
    first_pixel,
    global_box,
    interior_edges,
    kept_instances,
)
from pipeline.stitch.grown import GrownCluster, GrownPlan, Predictor, giant_side, grow_component
from pipeline.types import Box


@dataclass
class TileInstances:
    """Instances owned by one tile, painted on the smallest box that holds them.

    ``labels`` has local ids 1..n numbered in raster order of each instance's first pixel
    (global model-pixel coordinates), so global ids from per-tile offsets are deterministic.
    """

    extent: Box
    labels: np.ndarray  # int32
    prob: np.ndarray  # float32 nucleus probability on the same extent
    recomputed: int = 0  # components that needed a larger window
    giants: tuple[Box, ...] = ()  # bounding boxes (as far as seen) of giant components met
    # the nuclei around the owned ones that this tile knows too (``rival_reach`` asked)
    rivals: Rivals | None = None

    @property
    def count(self) -> int:
        return int(self.labels.max()) if self.labels.size else 0


@dataclass
class Rivals:
    """What a tile knows of the nuclei it does not own, around those it owns: the final
    instances of every foreground component that lies whole inside its valid box and
    comes within ``rival_reach`` of its own components (the same instances their owners
    compute, by the decomposition contract), and where foreground lies whose instances it
    cannot know (components cut by the valid box's edge that another tile owns). A cell
    needs its nucleus's neighbours (``slide_run.tile_cells``): where they are all known,
    the tile makes the cell itself."""

    valid: Box
    labels: np.ndarray  # int32 over ``valid``: the rivals' instances (ids > 0, arbitrary)
    unknown: np.ndarray  # bool over ``valid``: foreground of unknown instances


def segment_tile(core: Box, window: Box, prob: np.ndarray, dist: np.ndarray, image: Box,
                 params: WatershedParams, margin: int, multiple: int,
                 predict: Predictor | GrownPlan, rival_reach: int | None = None) -> TileInstances:
    """Instances owned by the tile with ``core``, from its window's network outputs.

    ``predict`` recomputes outputs for larger windows when a component is truncated; or,
    on the CPU pool of a GPU layout, ``predict`` is the :class:`GrownPlan` the inference
    worker made of those components (:func:`predict_grown_windows`), replayed in order:
    a component the plan does not hold raises ``RuntimeError``. With ``rival_reach`` (px),
    also the :class:`Rivals` within that distance of the owned components' boxes.
    """
    if isinstance(predict, GrownPlan):
        replay = _Replay(predict)
        result = _segment(core, window, prob, dist, image, params, margin, multiple, replay.grow,
                          rival_reach=rival_reach)
        replay.done()
        return result

    def grow(seed: tuple[int, int], bbox: Box, valid: Box) -> GrownCluster:
        return grow_component(seed, bbox, core, valid, image, params, margin, multiple, predict)

    return _segment(core, window, prob, dist, image, params, margin, multiple, grow,
                    rival_reach=rival_reach)


Grow = Callable[[tuple[int, int], Box, Box], "GrownCluster"]
"""The component at a seed pixel, first seen on a box and cut by the tile's valid box's
edge (seed, box, valid box), grown until complete."""


def _segment(core: Box, window: Box, prob: np.ndarray, dist: np.ndarray, image: Box,
             params: WatershedParams, margin: int, multiple: int, grow: Grow,
             watershed: bool = True, rival_reach: int | None = None) -> TileInstances:
    """:func:`segment_tile` with truncated components grown by ``grow``. Every decision
    (which components are kept, grown, owned or giants; which windows are predicted)
    depends on the foreground components only, never on the instances, so
    ``watershed=False`` grows exactly the same components and only skips the watershed
    (the labels are then all zero)."""
    valid = window.grow(-margin).intersect(image)
    local = valid.slices((window.y0, window.x0))
    p, d = prob[local], dist[local]
    comps, _ = foreground_components(p, params)
    truncated_ids = edge_ids(comps, interior_edges(valid, image))
    core_local = core.shift(-valid.y0, -valid.x0)
    in_core = np.unique(comps[core_local.slices()])
    objects = ndi.find_objects(comps)

    limit = giant_side(margin, multiple)
    keep, overflow, giants = [], [], []
    for cid in in_core[in_core > 0].tolist():
        if cid in truncated_ids:
            overflow.append(cid)
            continue
        obj = objects[cid - 1]
        if box_side(obj) > limit:
            giants.append(global_box(obj, valid))
            continue
        y, x = first_pixel(comps, cid, obj)
        if core.contains(y + valid.y0, x + valid.x0):
            keep.append(cid)
    rival_ids = [] if rival_reach is None else _rival_ids(comps, objects, keep, truncated_ids,
                                                          rival_reach, limit)
    instances = kept_instances(p, d, comps, keep + rival_ids, params, watershed)
    if rival_reach is not None:  # one watershed for both: each component's instances are its own affair
        mine, theirs = np.isin(comps, keep), np.isin(comps, rival_ids)
        rival_labels = np.where(theirs, instances, 0)
        instances = np.where(mine, instances, 0)
        owned = np.zeros(comps.shape, dtype=bool)  # pixels of grown components this tile owns
    pieces = [Piece(valid, instances, p)]

    recomputed = 0
    covered = np.zeros(comps.shape, dtype=bool)
    for cid in overflow:
        obj = objects[cid - 1]
        seed_mask = (comps[obj] == cid) & ~covered[obj]
        if not seed_mask.any():
            continue  # part of a component already recomputed from another piece
        sy, sx = np.argwhere(seed_mask)[0]
        seed = (int(sy) + obj[0].start + valid.y0, int(sx) + obj[1].start + valid.x0)
        bbox = global_box(obj, valid)
        if box_side(obj) > limit:  # a giant already: no window could hold it
            giants.append(bbox)
            covered[obj] |= comps[obj] == cid
            continue
        cluster = grow(seed, bbox, valid)
        recomputed += 1
        if cluster.giant is not None:
            giants.append(cluster.giant)
        # mark every part of this tile's valid box that belongs to the recomputed component
        if not cluster.inside.is_empty():
            covered[cluster.inside.slices((valid.y0, valid.x0))] |= cluster.covered()
            if cluster.owned is not None and rival_reach is not None:
                owned[cluster.inside.slices((valid.y0, valid.x0))] |= cluster.covered()
        if cluster.owned is not None and watershed:
            pieces.append(cluster.owned.piece(params))
    result = _assemble(pieces, core, recomputed, tuple(giants))
    if rival_reach is not None:
        result.rivals = Rivals(valid, rival_labels, (comps > 0) & ~mine & ~theirs & ~owned)
    return result


def _rival_ids(comps: np.ndarray, objects: list, keep: list[int], truncated: set[int],
               reach: int, limit: int) -> list[int]:
    """Components whole inside the valid box, not kept here, not giants (nobody's), whose
    box comes within ``reach`` of a kept component's box."""
    if not keep:
        return []
    kept = [objects[cid - 1] for cid in keep]
    y0 = min(o[0].start for o in kept) - reach
    x0 = min(o[1].start for o in kept) - reach
    y1 = max(o[0].stop for o in kept) + reach
    x1 = max(o[1].stop for o in kept) + reach
    mine = set(keep)
    out = []
    for cid, obj in enumerate(objects, start=1):
        if obj is None or cid in mine or cid in truncated or box_side(obj) > limit:
            continue
        if obj[0].start < y1 and obj[0].stop > y0 and obj[1].start < x1 and obj[1].stop > x0:
            out.append(cid)
    return out


class _Replay:
    """Serves a tile's :class:`GrownPlan` to :func:`_segment`, checking each request."""

    def __init__(self, plan: GrownPlan) -> None:
        self._left = list(reversed(plan.clusters))

    def grow(self, seed: tuple[int, int], bbox: Box, valid: Box) -> GrownCluster:
        if not self._left or (self._left[-1].seed, self._left[-1].bbox) != (seed, bbox):
            raise RuntimeError(f"the cluster at {seed} ({bbox}) was not grown on the inference "
                               "worker (predict_grown_windows and segment_tile disagree)")
        return self._left.pop()

    def done(self) -> None:
        if self._left:
            raise RuntimeError(f"{len(self._left)} cluster(s) grown on the inference worker were "
                               "not asked for (predict_grown_windows and segment_tile disagree)")


def predict_grown_windows(core: Box, window: Box, prob: np.ndarray, dist: np.ndarray, image: Box,
                          params: WatershedParams, margin: int, multiple: int,
                          predict: Predictor) -> GrownPlan:
    """What :func:`segment_tile` needs of every larger window it will ask for.

    Why: on a GPU cluster the network runs on the GPU worker and the watershed on a pool of
    CPU processes, but a truncated cluster needs more windows from the *same* device (two
    devices differ in the last bits, which exact stitching does not tolerate). This runs
    segment_tile's decisions without the watershed (foreground components only, cheap) on
    the GPU side and keeps, per grown component, only what the tile reads of it
    (:class:`GrownCluster`: bits for its pixels in the tile, and the owner's watershed
    inputs); the CPU side calls segment_tile with the plan and gets exactly the result it
    would have computed itself. Windows are predicted one at a time, as segment_tile does.
    """
    clusters: list[GrownCluster] = []

    def grow(seed: tuple[int, int], bbox: Box, valid: Box) -> GrownCluster:
        cluster = grow_component(seed, bbox, core, valid, image, params, margin, multiple, predict)
        clusters.append(cluster)
        return cluster

    _segment(core, window, prob, dist, image, params, margin, multiple, grow, watershed=False)
    return GrownPlan(tuple(clusters))


def _assemble(pieces: list[Piece], core: Box, recomputed: int, giants: tuple[Box, ...]) -> TileInstances:
    """Paint the pieces on one extent and number instances in raster order."""
    boxes = [core]
    for piece in pieces:
        objs = [o for o in ndi.find_objects(piece.labels) if o is not None]
        if objs:
            boxes.append(Box(min(o[0].start for o in objs) + piece.box.y0,
                             min(o[1].start for o in objs) + piece.box.x0,
                             max(o[0].stop for o in objs) + piece.box.y0,
                             max(o[1].stop for o in objs) + piece.box.x0))
    extent = Box(min(b.y0 for b in boxes), min(b.x0 for b in boxes),
                 max(b.y1 for b in boxes), max(b.x1 for b in boxes))
    labels = np.zeros(extent.shape, dtype=np.int64)
    prob = np.zeros(extent.shape, dtype=np.float32)
    next_id = 1
    for piece in pieces:
        inter = piece.box.intersect(extent)
        if inter.is_empty():
            continue
        src = piece.labels[inter.slices((piece.box.y0, piece.box.x0))]
        dst = inter.slices((extent.y0, extent.x0))
        mask = src > 0
        labels[dst][mask] = src[mask].astype(np.int64) + (next_id - 1)
        prob[dst][mask] = piece.prob[inter.slices((piece.box.y0, piece.box.x0))][mask]
        next_id += int(src.max()) if src.size else 0
    return TileInstances(extent, _raster_order(labels), prob, recomputed, giants)


def _raster_order(labels: np.ndarray) -> np.ndarray:
    """Renumber 1..n by the raster position of each instance's first pixel."""
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids > 0
    ids, first = ids[keep], first[keep]
    order = ids[np.argsort(first, kind="stable")]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut[labels]
