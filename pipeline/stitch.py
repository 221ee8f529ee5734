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

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from models.config import WatershedParams
from models.watershed import foreground_components, split_components
from pipeline.tiling import aligned_window
from pipeline.types import Box

log = logging.getLogger(__name__)

EIGHT = np.ones((3, 3), dtype=bool)
# Windows never grow past this many model pixels per side; components too large to fit
# (see ``giant_side``) are dropped, the same way by every tile.
MAX_WINDOW = 8192


def giant_side(margin: int, multiple: int) -> int:
    """Components with a bounding-box side above this are giants (not segmented): the
    largest that a window of at most ``MAX_WINDOW`` still holds with its margins."""
    return MAX_WINDOW - 2 * (margin + 2 * multiple)


def drop_giants(instances: np.ndarray, prob: np.ndarray, params: WatershedParams,
                side: int) -> np.ndarray:
    """``instances`` without the pixels of foreground components whose bounding box has a
    side above ``side``: the whole-image counterpart of the tiled rule."""
    comps, _ = foreground_components(prob, params)
    giants = [i + 1 for i, o in enumerate(ndi.find_objects(comps))
              if o is not None and _side(o) > side]
    if not giants:
        return instances
    return np.where(np.isin(comps, giants), 0, instances)


def _side(obj: tuple[slice, slice]) -> int:
    return max(obj[0].stop - obj[0].start, obj[1].stop - obj[1].start)

Predictor = Callable[[Box], tuple[np.ndarray, np.ndarray]]
"""Network outputs (probability, distance) for an aligned window box (model px)."""


def subwindow_predictor(predict: Predictor, margin: int, multiple: int, max_side: int,
                        image: Box | None = None) -> Predictor:
    """``predict`` for windows of any size in pieces of at most ``max_side`` px a side.

    Why: a cluster grown towards ``MAX_WINDOW`` would otherwise run the network on one
    8192^2 window (tens of GB of activations). The caller uses only the window minus
    ``margin``, and there the outputs are box-invariant for grid-aligned windows, so each
    piece contributes its own interior (pieces aligned to ``multiple``, overlapping by
    ``2 * margin``) and the assembled interior equals the one-shot result. The outer
    ``margin`` ring, which no caller reads, is left at zero, and so is everything outside
    ``image`` (callers clip to the image, so mirrored pixels beyond it are not computed).
    """
    core_side = (max_side - 2 * margin) // multiple * multiple
    if core_side < multiple:
        raise ValueError(f"max_side {max_side} leaves no core for margin {margin}")

    def predict_in_pieces(window: Box) -> tuple[np.ndarray, np.ndarray]:
        if max(window.height, window.width) <= max_side:
            return predict(window)
        prob = np.zeros(window.shape, np.float32)
        dist = np.zeros(window.shape, np.float32)
        inner = window.grow(-margin)
        if image is not None:
            inner = inner.intersect(image)
        for y in range(inner.y0, inner.y1, core_side):
            for x in range(inner.x0, inner.x1, core_side):
                core = Box(y, x, min(y + core_side, inner.y1), min(x + core_side, inner.x1))
                piece = aligned_window(core, margin, multiple)
                p, d = predict(piece)
                src = core.slices((piece.y0, piece.x0))
                prob[core.slices((window.y0, window.x0))] = p[src]
                dist[core.slices((window.y0, window.x0))] = d[src]
        return prob, dist

    return predict_in_pieces


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

    @property
    def count(self) -> int:
        return int(self.labels.max()) if self.labels.size else 0


@dataclass
class _Piece:
    box: Box  # global box of ``labels``/``prob``
    labels: np.ndarray
    prob: np.ndarray


def _interior_edges(valid: Box, image: Box) -> tuple[bool, bool, bool, bool]:
    """Which sides of the valid box are cuts through the image (top, left, bottom, right)."""
    return (valid.y0 > image.y0, valid.x0 > image.x0, valid.y1 < image.y1, valid.x1 < image.x1)


def _edge_ids(comps: np.ndarray, edges: tuple[bool, bool, bool, bool]) -> set[int]:
    sides = []
    if edges[0]:
        sides.append(comps[0, :])
    if edges[1]:
        sides.append(comps[:, 0])
    if edges[2]:
        sides.append(comps[-1, :])
    if edges[3]:
        sides.append(comps[:, -1])
    if not sides:
        return set()
    ids = np.unique(np.concatenate(sides))
    return set(ids[ids > 0].tolist())


def _first_pixel(comps: np.ndarray, cid: int, obj: tuple[slice, slice]) -> tuple[int, int]:
    """First pixel of component ``cid`` in raster order (local coordinates)."""
    row = obj[0].start
    cols = np.flatnonzero(comps[row, obj[1]] == cid)
    return row, obj[1].start + int(cols[0])


def _components(prob: np.ndarray, params: WatershedParams) -> tuple[np.ndarray, int]:
    return foreground_components(prob, params)


def _instances(prob: np.ndarray, dist: np.ndarray, comps: np.ndarray, keep: list[int],
               params: WatershedParams, watershed: bool = True) -> np.ndarray:
    """Instances of the kept components only (valid by the decomposition contract);
    none at all without ``watershed`` (the window-planning pass of
    :func:`predict_grown_windows`, whose decisions do not depend on instances)."""
    if not keep or not watershed:
        return np.zeros(prob.shape, dtype=np.int32)
    selected = np.isin(comps, np.asarray(keep, dtype=comps.dtype))
    return split_components(dist, np.where(selected, comps, 0), params, prob=prob)


def segment_tile(core: Box, window: Box, prob: np.ndarray, dist: np.ndarray, image: Box,
                 params: WatershedParams, margin: int, multiple: int,
                 predict: Predictor, watershed: bool = True) -> TileInstances:
    """Instances owned by the tile with ``core``, from its window's network outputs.

    ``predict`` recomputes outputs for larger windows when a component is truncated.
    Every decision (which components are kept, grown, owned or giants; which windows are
    predicted) depends on the foreground components only, never on the instances, so
    ``watershed=False`` asks ``predict`` for exactly the same windows and only skips the
    watershed (the labels are then all zero).
    """
    valid = window.grow(-margin).intersect(image)
    local = valid.slices((window.y0, window.x0))
    p, d = prob[local], dist[local]
    comps, _ = _components(p, params)
    truncated_ids = _edge_ids(comps, _interior_edges(valid, image))
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
        if _side(obj) > limit:
            giants.append(_global_box(obj, valid))
            continue
        y, x = _first_pixel(comps, cid, obj)
        if core.contains(y + valid.y0, x + valid.x0):
            keep.append(cid)
    pieces = [_Piece(valid, _instances(p, d, comps, keep, params, watershed), p)]

    recomputed = 0
    covered = np.zeros(comps.shape, dtype=bool)
    for cid in overflow:
        obj = objects[cid - 1]
        seed_mask = (comps[obj] == cid) & ~covered[obj]
        if not seed_mask.any():
            continue  # part of a component already recomputed from another piece
        sy, sx = np.argwhere(seed_mask)[0]
        seed = (int(sy) + obj[0].start + valid.y0, int(sx) + obj[1].start + valid.x0)
        bbox = _global_box(obj, valid)
        if _side(obj) > limit:  # a giant already: no window could hold it
            giants.append(bbox)
            covered[obj] |= comps[obj] == cid
            continue
        piece, giant, owned = _grow_component(seed, bbox, core, image, params, margin,
                                              multiple, predict, watershed)
        recomputed += 1
        if giant is not None:
            giants.append(giant)
        # mark every part of this tile's valid box that belongs to the recomputed component
        inter = piece.box.intersect(valid)
        if not inter.is_empty():
            sub = piece.labels[inter.slices((piece.box.y0, piece.box.x0))] > 0
            covered[inter.slices((valid.y0, valid.x0))] |= sub | (
                piece.prob[inter.slices((piece.box.y0, piece.box.x0))] > 0)
        if owned:
            pieces.append(piece)
    return _assemble(pieces, core, recomputed, tuple(giants))


def predict_grown_windows(core: Box, window: Box, prob: np.ndarray, dist: np.ndarray, image: Box,
                          params: WatershedParams, margin: int, multiple: int,
                          predict: Predictor) -> dict[Box, tuple[np.ndarray, np.ndarray]]:
    """The network outputs of every larger window :func:`segment_tile` will ask for.

    Why: on a GPU cluster the network runs on the GPU worker and the watershed on a pool of
    CPU processes, but a truncated cluster needs more windows from the *same* device (two
    devices differ in the last bits, which exact stitching does not tolerate). This runs
    segment_tile's decisions without the watershed (foreground components only, cheap) on
    the GPU side; the CPU side then calls segment_tile with :func:`replay_predictor` of the
    result and gets exactly the outputs it would have computed itself.
    """
    seen: dict[Box, tuple[np.ndarray, np.ndarray]] = {}

    def recording(box: Box) -> tuple[np.ndarray, np.ndarray]:
        if box not in seen:
            seen[box] = predict(box)
        return seen[box]

    segment_tile(core, window, prob, dist, image, params, margin, multiple, recording,
                 watershed=False)
    return seen


def replay_predictor(outputs: dict[Box, tuple[np.ndarray, np.ndarray]]) -> Predictor:
    """A predictor that only serves the windows of :func:`predict_grown_windows`."""

    def replay(box: Box) -> tuple[np.ndarray, np.ndarray]:
        try:
            return outputs[box]
        except KeyError:
            raise RuntimeError(f"window {box} was not predicted on the inference worker "
                               "(predict_grown_windows and segment_tile disagree)") from None

    return replay


def _global_box(obj: tuple[slice, slice], valid: Box) -> Box:
    return Box(obj[0].start + valid.y0, obj[1].start + valid.x0,
               obj[0].stop + valid.y0, obj[1].stop + valid.x0)


def _grow_component(seed: tuple[int, int], bbox: Box, core: Box, image: Box,
                    params: WatershedParams, margin: int, multiple: int,
                    predict: Predictor, watershed: bool = True) -> tuple[_Piece, Box | None, bool]:
    """Recompute the component holding ``seed`` on windows that grow until it fits.

    Returns its instances (only that component, zero elsewhere; its probability marks
    its pixels), its box if it is a giant (then nothing is segmented), and whether this
    tile owns it. Windows stay within ``MAX_WINDOW``: the growth step shrinks to fit, and
    a component whose box passes ``giant_side`` stops growing.
    """
    limit = giant_side(margin, multiple)
    extra = 2 * multiple
    while True:
        room = (MAX_WINDOW - max(bbox.height, bbox.width)) // 2 - margin - multiple
        window = aligned_window(bbox, margin + max(multiple, min(extra, room)), multiple)
        prob, dist = predict(window)
        valid = window.grow(-margin).intersect(image)
        local = valid.slices((window.y0, window.x0))
        p, d = prob[local], dist[local]
        comps, _ = _components(p, params)
        cid = _seed_component(comps, seed, bbox, valid)
        if cid == 0:  # the component vanished below threshold in this window
            empty = np.zeros(comps.shape, np.float32)
            return _Piece(valid, np.zeros(comps.shape, np.int32), empty), None, False
        obj = ndi.find_objects(comps, max_label=cid)[cid - 1]
        box = _global_box(obj, valid)
        if _side(obj) > limit:
            log.info("foreground component at %s is larger than %d px: not segmented "
                     "(summary.json: giant_clusters)", seed, limit)
            p_only = np.where(comps == cid, p, 0.0).astype(np.float32)
            return _Piece(valid, np.zeros(comps.shape, np.int32), p_only), box, False
        if cid not in _edge_ids(comps, _interior_edges(valid, image)):
            y, x = _first_pixel(comps, cid, obj)
            owned = core.contains(y + valid.y0, x + valid.x0)
            labels = _instances(p, d, comps, [cid], params, watershed)
            p_only = np.where(comps == cid, p, 0.0).astype(np.float32)
            return _Piece(valid, labels, p_only), None, owned
        bbox = box
        extra *= 2


def _seed_component(comps: np.ndarray, seed: tuple[int, int], bbox: Box, valid: Box) -> int:
    """The component at ``seed``; if the seed pixel fell just below threshold in this
    window (outputs of windows of other shapes differ by ~1e-7), the component holding
    most of the previously seen box; 0 if nothing is left there."""
    cid = int(comps[seed[0] - valid.y0, seed[1] - valid.x0])
    if cid:
        return cid
    inside = comps[bbox.intersect(valid).slices((valid.y0, valid.x0))]
    ids, counts = np.unique(inside[inside > 0], return_counts=True)
    return int(ids[np.argmax(counts)]) if ids.size else 0


def _assemble(pieces: list[_Piece], core: Box, recomputed: int, giants: tuple[Box, ...]) -> TileInstances:
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
