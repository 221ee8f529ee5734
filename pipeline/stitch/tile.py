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
    """Instances of the kept components only (valid by the decomposition contract: on
    any crop that holds them whole); none at all without ``watershed`` (the planning pass
    of :func:`predict_grown_windows`, whose decisions do not depend on instances)."""
    if not keep or not watershed:
        return np.zeros(prob.shape, dtype=np.int32)
    selected = np.isin(comps, np.asarray(keep, dtype=comps.dtype))
    return split_components(dist, np.where(selected, comps, 0), params, prob=prob)


def segment_tile(core: Box, window: Box, prob: np.ndarray, dist: np.ndarray, image: Box,
                 params: WatershedParams, margin: int, multiple: int,
                 predict: Predictor | GrownPlan) -> TileInstances:
    """Instances owned by the tile with ``core``, from its window's network outputs.

    ``predict`` recomputes outputs for larger windows when a component is truncated; or,
    on the CPU pool of a GPU layout, ``predict`` is the :class:`GrownPlan` the inference
    worker made of those components (:func:`predict_grown_windows`), replayed in order:
    a component the plan does not hold raises ``RuntimeError``.
    """
    if isinstance(predict, GrownPlan):
        replay = _Replay(predict)
        result = _segment(core, window, prob, dist, image, params, margin, multiple, replay.grow)
        replay.done()
        return result

    def grow(seed: tuple[int, int], bbox: Box, valid: Box) -> GrownCluster:
        return _grow_component(seed, bbox, core, valid, image, params, margin, multiple, predict)

    return _segment(core, window, prob, dist, image, params, margin, multiple, grow)


Grow = Callable[[tuple[int, int], Box, Box], "GrownCluster"]
"""The component at a seed pixel, first seen on a box and cut by the tile's valid box's
edge (seed, box, valid box), grown until complete."""


def _segment(core: Box, window: Box, prob: np.ndarray, dist: np.ndarray, image: Box,
             params: WatershedParams, margin: int, multiple: int, grow: Grow,
             watershed: bool = True) -> TileInstances:
    """:func:`segment_tile` with truncated components grown by ``grow``. Every decision
    (which components are kept, grown, owned or giants; which windows are predicted)
    depends on the foreground components only, never on the instances, so
    ``watershed=False`` grows exactly the same components and only skips the watershed
    (the labels are then all zero)."""
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
        cluster = grow(seed, bbox, valid)
        recomputed += 1
        if cluster.giant is not None:
            giants.append(cluster.giant)
        # mark every part of this tile's valid box that belongs to the recomputed component
        if not cluster.inside.is_empty():
            covered[cluster.inside.slices((valid.y0, valid.x0))] |= cluster.covered()
        if cluster.owned is not None and watershed:
            pieces.append(cluster.owned.piece(params))
    return _assemble(pieces, core, recomputed, tuple(giants))


def _pack(mask: np.ndarray) -> bytes:
    return np.packbits(mask, axis=None).tobytes()


def _unpack(bits: bytes, box: Box) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(bits, np.uint8), count=box.height * box.width)
    return flat.reshape(box.shape).view(bool)


@dataclass(frozen=True)
class OwnedCluster:
    """What the watershed of a grown component reads, for the tile that owns it, and no more.

    Why compact: on a GPU layout it travels from the inference worker to the CPU pool.
    The watershed of one component reads its distance and probability at its own pixels
    only, and ``prob > fg_threshold`` in its box (a hole that holds another component's
    foreground stays open): 8 bytes per component pixel and 2 bits per box pixel, where
    the grown window's outputs are 8 bytes per window pixel (the window also holds the
    growth room and every other component in it). :meth:`piece` rebuilds maps that equal
    the network's wherever the watershed reads them (elsewhere: 1 on foreground, 0 off
    it), so the instances are the same, and both paths segment from this form.
    """

    box: Box  # the component's bounding box (model px)
    cid: int  # its id among the window's components (ids shift instance ids, not shapes)
    foreground: bytes  # prob > fg_threshold on box, packed bits
    mask: bytes  # the component's pixels on box, packed bits
    prob: np.ndarray  # float32 at the component's pixels, raster order
    dist: np.ndarray  # float32, likewise

    @classmethod
    def of(cls, box: Box, prob: np.ndarray, dist: np.ndarray, comps: np.ndarray, cid: int,
           params: WatershedParams) -> OwnedCluster:
        """From the component's crops of a window's outputs and components (on ``box``)."""
        if not 0.0 <= params.fg_threshold < 1.0:
            raise ValueError(f"fg_threshold {params.fg_threshold} is not a probability below 1")
        mask = comps == cid
        return cls(box, cid, _pack(prob > params.fg_threshold), _pack(mask),
                   np.ascontiguousarray(prob[mask], np.float32), np.ascontiguousarray(dist[mask], np.float32))

    def piece(self, params: WatershedParams) -> _Piece:
        """The component's instances and probability on its box."""
        mask = _unpack(self.mask, self.box)
        prob = _unpack(self.foreground, self.box).astype(np.float32)
        prob[mask] = self.prob
        dist = np.zeros(self.box.shape, np.float32)
        dist[mask] = self.dist
        comps = np.where(mask, np.int32(self.cid), np.int32(0))
        labels = _instances(prob, dist, comps, [self.cid], params)
        return _Piece(self.box, labels, np.where(mask, prob, np.float32(0)))


@dataclass(frozen=True)
class GrownCluster:
    """One truncated component of a tile, grown on larger windows until complete (or a
    giant, or gone below threshold): what the tile's segmentation needs of it. A tile that
    does not own it needs only its pixels in the tile's valid box (bits) and whether it is
    a giant; the owner also its watershed's inputs."""

    seed: tuple[int, int]  # the request: seed pixel and the box seen before growing
    bbox: Box
    windows: tuple[Box, ...]  # the windows predicted for it, in order
    inside: Box  # the component's box within the tile's valid box (empty: none there)
    inside_bits: bytes  # its pixels on ``inside``, packed bits
    giant: Box | None = None  # its box, if it is a giant (then nobody segments it)
    owned: OwnedCluster | None = None  # this tile owns it: its watershed's inputs

    def covered(self) -> np.ndarray:
        """The component's pixels on ``inside``."""
        return _unpack(self.inside_bits, self.inside)


@dataclass(frozen=True)
class GrownPlan:
    """The grown components of one tile, in the order the tile meets them
    (:func:`predict_grown_windows`): what the inference worker sends the CPU pool."""

    clusters: tuple[GrownCluster, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.clusters)

    @property
    def windows(self) -> tuple[Box, ...]:
        """Every window predicted for the tile, in order."""
        return tuple(w for c in self.clusters for w in c.windows)


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
        cluster = _grow_component(seed, bbox, core, valid, image, params, margin, multiple, predict)
        clusters.append(cluster)
        return cluster

    _segment(core, window, prob, dist, image, params, margin, multiple, grow, watershed=False)
    return GrownPlan(tuple(clusters))


def _global_box(obj: tuple[slice, slice], valid: Box) -> Box:
    return Box(obj[0].start + valid.y0, obj[1].start + valid.x0,
               obj[0].stop + valid.y0, obj[1].stop + valid.x0)


def _grow_component(seed: tuple[int, int], bbox: Box, core: Box, tile_valid: Box, image: Box,
                    params: WatershedParams, margin: int, multiple: int,
                    predict: Predictor) -> GrownCluster:
    """Recompute the component holding ``seed`` on windows that grow until it fits.

    Returns what the tile needs of it: its pixels in the tile's valid box, its box if it
    is a giant (then nothing is segmented), and if this tile owns it, its watershed's
    inputs. Windows stay within ``MAX_WINDOW``: the growth step shrinks to fit, and a
    component whose box passes ``giant_side`` stops growing.
    """
    limit = giant_side(margin, multiple)
    extra = 2 * multiple
    windows: list[Box] = []
    request = seed, bbox
    while True:
        room = (MAX_WINDOW - max(bbox.height, bbox.width)) // 2 - margin - multiple
        window = aligned_window(bbox, margin + max(multiple, min(extra, room)), multiple)
        windows.append(window)
        found = _in_window(window, seed, bbox, core, tile_valid, image, params, margin, limit, predict)
        if isinstance(found, Box):  # still cut by the window's edge: grow around all of it seen
            bbox, extra = found, extra * 2
            continue
        return GrownCluster(*request, tuple(windows), *found)


def _in_window(window: Box, seed: tuple[int, int], bbox: Box, core: Box, tile_valid: Box, image: Box,
               params: WatershedParams, margin: int, limit: int, predict: Predictor
               ) -> Box | tuple[Box, bytes, Box | None, OwnedCluster | None]:
    """The component at ``seed`` in ``window``'s outputs: its box if the window's edge
    cuts it, else :class:`GrownCluster`'s fields from ``inside`` on. One window's outputs
    at a time: they are this function's own and freed when it returns."""
    prob, dist = predict(window)
    valid = window.grow(-margin).intersect(image)
    local = valid.slices((window.y0, window.x0))
    p, d = prob[local], dist[local]
    comps, _ = _components(p, params)
    cid = _seed_component(comps, seed, bbox, valid)
    if cid == 0:  # the component vanished below threshold in this window
        return Box(0, 0, 0, 0), b"", None, None
    obj = ndi.find_objects(comps, max_label=cid)[cid - 1]
    box = _global_box(obj, valid)
    giant = _side(obj) > limit
    if not giant and cid in _edge_ids(comps, _interior_edges(valid, image)):
        return box
    inside = box.intersect(tile_valid)
    bits = b"" if inside.is_empty() else _pack(comps[inside.slices((valid.y0, valid.x0))] == cid)
    if giant:
        log.info("foreground component at %s is larger than %d px: not segmented "
                 "(summary.json: giant_clusters)", seed, limit)
        return inside, bits, box, None
    y, x = _first_pixel(comps, cid, obj)
    if not core.contains(y + valid.y0, x + valid.x0):
        return inside, bits, None, None
    return inside, bits, None, OwnedCluster.of(box, p[obj], d[obj], comps[obj], cid, params)


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
