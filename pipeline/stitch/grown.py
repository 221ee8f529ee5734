"""Components cut by a tile's valid box, grown on larger windows until complete.

Windows never exceed ``MAX_WINDOW``; a component wider than ``giant_side`` is a giant and
nobody segments it. A grown window is predicted in tile-sized pieces
(``subwindow_predictor``). On a GPU layout the inference worker grows the components
(``predict_grown_windows`` in ``tile``) and ships a ``GrownPlan``: per component only what
the tile's segmentation reads of it.
"""

from __future__ import annotations

import logging
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
from pipeline.tiling import aligned_window
from pipeline.types import Box

log = logging.getLogger(__name__)

# Windows never grow past this many model pixels per side; components too large to fit
# (see ``giant_side``) are dropped, the same way by every tile.
MAX_WINDOW = 8192


def giant_side(margin: int, multiple: int) -> int:
    """Components with a bounding-box side above this are giants (not segmented): the
    largest that a window of at most ``MAX_WINDOW`` still holds with its margins."""
    return MAX_WINDOW - 2 * (margin + 2 * multiple)


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

    def piece(self, params: WatershedParams) -> Piece:
        """The component's instances and probability on its box."""
        mask = _unpack(self.mask, self.box)
        prob = _unpack(self.foreground, self.box).astype(np.float32)
        prob[mask] = self.prob
        dist = np.zeros(self.box.shape, np.float32)
        dist[mask] = self.dist
        comps = np.where(mask, np.int32(self.cid), np.int32(0))
        labels = kept_instances(prob, dist, comps, [self.cid], params)
        return Piece(self.box, labels, np.where(mask, prob, np.float32(0)))


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


def grow_component(seed: tuple[int, int], bbox: Box, core: Box, tile_valid: Box, image: Box,
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
    comps, _ = foreground_components(p, params)
    cid = _seed_component(comps, seed, bbox, valid)
    if cid == 0:  # the component vanished below threshold in this window
        return Box(0, 0, 0, 0), b"", None, None
    obj = ndi.find_objects(comps, max_label=cid)[cid - 1]
    box = global_box(obj, valid)
    giant = box_side(obj) > limit
    if not giant and cid in edge_ids(comps, interior_edges(valid, image)):
        return box
    inside = box.intersect(tile_valid)
    bits = b"" if inside.is_empty() else _pack(comps[inside.slices((valid.y0, valid.x0))] == cid)
    if giant:
        log.info("foreground component at %s is larger than %d px: not segmented "
                 "(summary.json: giant_clusters)", seed, limit)
        return inside, bits, box, None
    y, x = first_pixel(comps, cid, obj)
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
