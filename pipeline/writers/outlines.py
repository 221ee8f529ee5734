"""Nucleus outlines of a label crop, and the per-label pixel statistics that come with them.

Why a module of its own: the outlines are the GeoJSON's geometry *and* the table's
perimeter, solidity, centroid, moments and bbox (``table.instance_measurements``), so one
tracing serves both, on the worker, once per tile.

**Coordinates** are **level-0 pixels**, origin at the top-left corner, y down, continuous
(pixel (i, j) covers [j, j+1) x [i, i+1)), as QuPath reads GeoJSON. ``origin_shift=(bx,
by)`` is subtracted: QuPath's default OpenSlide reader crops slides that declare
``openslide.bounds-x/y`` (e.g. MIRAX) to those bounds (``SlideInfo.bounds_xy``; (0, 0) for
Bio-Formats or slides without bounds).

**Grid and validity**: QuPath 0.6+ reduces precision on import and rejects invalid polygons,
so every vertex is snapped to ``PRECISION`` (0.1 px, on QuPath's 0.01 px grid, one decimal a
coordinate where the model's scale is not a whole number, and well below the outline
tolerance), and a polygon that is not valid by construction (GEOS's simplification
validates its own output) is checked and repaired (``make_valid``, largest part) when needed.

**Outlines** (``trace_tile``): the boundary of each label is traced
once for the whole crop (pixel-edge rings, in numpy; the same regions as rasterio's
``features.shapes`` with 4-connectivity, and the label moments for the table come with
them), each ring is replaced by the midpoints of its unit pixel edges (what marching
squares at the 0.5 level gives for a binary mask: a sub-pixel outline without staircase),
then simplified with GEOS's Douglas-Peucker at ``SIMPLIFY_TOLERANCE`` = 0.5 model px. Why:
a staircase costs a vertex per pixel step and draws a jagged outline; the smoothed one has
a few vertices per nucleus and follows the shape. Every outline stays within 0.5 model px
(Hausdorff distance) of the sub-pixel one (both on the vertex grid), keeps its holes and
moves its area by at most ``AREA_SLACK`` (3 %): a nucleus that the simplification would
change more is simplified again at ``RETRY_FACTOR`` x the tolerance (0.35 px). That
catches the corners of 2-4 px wide parts (a 4 x 8 px nucleus lost 13.5 % of its area at
0.5 px, a 4 x 4 one 19 %), 1-px holes (a diamond 0.5 px across) and the outlines whose
first vertex GEOS dropped (it removes a ring's start point that lies within the tolerance of
its neighbours' chord without checking the points on either side again: up to ~1.1 x the
tolerance away). On the benchmark's crops 1.9 % of the nuclei are redone at 40x, 9.0 % at
20x (mostly small ones). The area is the label's pixel count x scale^2 to within a few
% either way (the outline runs through boundary pixel edges' midpoints, half a pixel^2
less per outline, and simplification cuts or adds corners; ``bench.postprocess_speed``:
median ratio 1.000 at 40x, 0.993 at 20x, 5th-95th percentile 0.989-1.007 and 0.971-1.010);
the table's ``area_px`` stays the pixel count. A nucleus whose smoothed outline is
degenerate (invalid after repair, or under half its pixels' area: a few 1-3 px shapes)
falls back to its pixel-edge polygon. One Polygon per label, exterior counter-clockwise
(shapely's sign), holes kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.geometry.polygon import orient

log = logging.getLogger(__name__)

__all__ = ["SIMPLIFY_TOLERANCE", "XY_DECIMALS", "TileOutlines", "trace_tile"]

# Vertex grid, level-0 px: a tenth of a pixel, on QuPath's 0.01 px grid and 5x or more
# finer than the outline tolerance; 1 decimal a coordinate where the scale is not whole
PRECISION = 0.1
_GRID = 10.0  # 1 / PRECISION, exactly
XY_DECIMALS = 1  # decimals of PRECISION
SIMPLIFY_TOLERANCE = 0.5  # model px (Douglas-Peucker on the midpoint outline)
# A nucleus whose area the simplification moves by more than AREA_SLACK (the corners of 2-4
# px wide parts), or that loses a hole or its first vertex (``trace_tile``), is simplified
# again at RETRY_FACTOR x the tolerance (0.35 px)
AREA_SLACK = 0.03
RETRY_FACTOR = 0.7

# Pixel sides in clockwise screen order (y down): top, right, bottom, left. A boundary edge
# is walked with its pixel on the right-hand side (screen), i.e. exteriors have a positive
# shoelace area in (x, y) numbers and holes a negative one.
_SIDE_DX = np.array([1, 0, -1, 0])  # walking direction
_SIDE_DY = np.array([0, 1, 0, -1])
_START_X = np.array([0, 1, 1, 0])  # start corner of the side, relative to the pixel's (x, y)
_START_Y = np.array([0, 0, 1, 1])
# id of the step d(a) + d(b) from the midpoint of an edge on side a to the next, on side b
_STEP_ID = ((_SIDE_DX[:, None] + _SIDE_DX[None, :] + 2) * 5
            + _SIDE_DY[:, None] + _SIDE_DY[None, :] + 2).ravel()


def _largest_polygon(geom: shapely.Geometry, value: int) -> Polygon | None:
    """A single Polygon from any (multi)geometry, warning when parts are dropped."""
    if isinstance(geom, Polygon):
        return geom if not geom.is_empty else None
    # two levels of parts: a GeometryCollection from make_valid may hold MultiPolygons
    polys = [p for g in shapely.get_parts(geom) for p in shapely.get_parts(g)
             if isinstance(p, Polygon) and not p.is_empty]
    if not polys:
        return None
    if len(polys) > 1:
        log.warning("nucleus %d traced to %d polygons; keeping the largest", value, len(polys))
    return max(polys, key=lambda p: p.area)


def _clean(poly: Polygon, value: int) -> Polygon:
    """Valid, single, on the grid; falls back to the unsnapped valid polygon in the
    (practically unreachable) case that snapping would erase it, so no instance is lost."""
    geom = poly if poly.is_valid else shapely.make_valid(poly)
    part = _largest_polygon(geom, value) or poly
    snapped = _largest_polygon(shapely.set_precision(part, PRECISION), value)
    if snapped is None:
        log.warning("nucleus %d vanishes on the %.1f px grid; written unsnapped", value, PRECISION)
        snapped = part
    return orient(snapped, sign=1.0)


@dataclass(frozen=True)
class _Rings:
    """Boundary rings of every label of a crop, vertices in ring order (model px, crop
    coordinates, x right / y down). Ring ``k`` holds vertices ``start[k]:start[k+1]``."""

    label: np.ndarray  # (rings,) label value
    area: np.ndarray  # (rings,) signed pixel-edge area: > 0 exterior, < 0 hole
    start: np.ndarray  # (rings + 1,)
    corner: np.ndarray  # (edges, 2) int start corner (x, y) of each unit pixel edge (pixel-edge ring)
    mid: np.ndarray  # (vertices, 2) smooth ring: unit edges' midpoints, collinear ones left out
    mid_start: np.ndarray  # (rings + 1,) ring k's midpoints: mid_start[k]:mid_start[k+1]
    nxt: np.ndarray  # (edges,) the next edge of the same ring


@dataclass(frozen=True)
class TileOutlines:
    """``trace_tile``'s outlines with the per-label pixel statistics that the tracing
    gives for free (Green's theorem over the pixel edges: exact, and the edges are far
    fewer than the pixels). Every label part counts, not only the outlined one."""

    values: np.ndarray  # (n,) label values, ascending
    polygons: np.ndarray  # (n,) one Polygon each, level-0 px
    pixels: np.ndarray  # (n,) pixel count
    centroid: np.ndarray  # (n, 2) mean pixel index (row, col) in the crop
    moments: np.ndarray  # (n, 3) central second moments per pixel: row-row, col-col, row-col
    bbox: np.ndarray  # (n, 4) row0, col0, row1, col1: half-open model-px range in the crop


def _trace(labels: np.ndarray) -> _Rings | None:
    """All boundary rings of all labels at once, with array operations only.

    Every pixel side facing another value is a unit edge. Its successor is found locally
    (turn right around the same pixel if possible, else go straight, else turn left):
    this keeps each label 4-connected, like ``rasterio.features.shapes(connectivity=4)``.
    The successor permutation is split into cycles and ordered by pointer jumping
    (O(edges log ring length), no loop over nuclei or pixels). None without labels.
    """
    stride = labels.shape[1] + 2
    flat = np.pad(labels, 1).ravel()
    # boundaries between vertical neighbours (k, k + stride) and horizontal ones (k, k + 1)
    hk = np.flatnonzero(flat[stride:] != flat[:-stride])
    vk = np.flatnonzero(flat[1:] != flat[:-1])
    below, right_of = hk + stride, vk + 1
    parts = ((below[flat[below] != 0], 0), (vk[flat[vk] != 0], 1),
             (hk[flat[hk] != 0], 2), (right_of[flat[right_of] != 0], 3))
    pix = np.concatenate([p for p, _ in parts])
    if len(pix) == 0:
        return None
    side = np.concatenate([np.full(len(p), s, dtype=np.int64) for p, s in parts])
    key = pix * 4 + side
    order = np.argsort(key, kind="stable")  # four sorted runs: a merge
    key, pix, side = key[order], pix[order], side[order]
    lab = flat[pix]
    if lab.min() < 0:
        raise ValueError("label values must be >= 0")
    step = np.array([1, stride, -1, -stride])  # walking direction of each side, flat index
    out = np.roll(step, 1)  # the neighbour across each side: up, right, down, left
    ahead = pix + step[side]
    beyond = ahead + out[side]
    turn_right = flat[ahead] != lab  # the pixel's next side is a boundary edge: convex corner
    straight = ~turn_right & (flat[beyond] != lab)
    nkey = np.where(turn_right, pix * 4 + (side + 1) % 4,
                    np.where(straight, ahead * 4 + side, beyond * 4 + (side + 3) % 4))
    n = len(key)
    nxt = np.empty(n, dtype=np.int64)  # successor keys are a permutation of the keys
    nxt[np.argsort(nkey, kind="stable")] = np.arange(n)
    # a ring is no longer than its label's edge count: that bounds the doubling rounds
    per_label = np.bincount(lab) if int(lab.max()) < 8 * n else np.unique(lab, return_counts=True)[1]
    rounds = max(1, int(np.ceil(np.log2(max(int(per_label.max()), 2)))))
    # cycle representative = smallest edge index of the cycle (window doubling)
    rep = np.arange(n)
    jump = nxt
    for _ in range(rounds):
        rep = np.minimum(rep, rep[jump])
        jump = jump[jump]
    # break each cycle before its representative, rank edges by distance to that tail
    tail = nxt == rep
    succ = np.where(tail, np.arange(n), nxt)
    dist = (~tail).astype(np.int64)
    for _ in range(rounds):
        dist = dist + dist[succ]
        succ = succ[succ]
    ring_len = np.bincount(rep, minlength=n)
    reps = np.flatnonzero(ring_len)
    first = np.cumsum(ring_len[reps]) - ring_len[reps]
    ring_start = np.zeros(n, dtype=np.int64)
    ring_start[reps] = first
    ring_order = np.empty(n, dtype=np.int64)
    ring_order[ring_start[rep] + ring_len[rep] - 1 - dist] = np.arange(n)
    y, x = np.divmod(pix[ring_order], stride)
    s_ord = side[ring_order]
    cx = x - 1 + _START_X[s_ord]
    cy = y - 1 + _START_Y[s_ord]
    start = np.r_[first, n]
    nxt_in_ring = np.arange(1, n + 1)  # cyclic successor within the ring
    nxt_in_ring[start[1:] - 1] = first
    prv_in_ring = np.arange(-1, n - 1)
    prv_in_ring[first] = start[1:] - 1
    # smooth ring: the edges' midpoints, without those on a straight or 45-degree run (the
    # step from one midpoint to the next is half the sum of the two edge directions)
    step = _STEP_ID[s_ord * 4 + s_ord[nxt_in_ring]]
    keep = step != step[prv_in_ring]
    s_kept = s_ord[keep]
    mid = np.column_stack([cx[keep] + 0.5 * _SIDE_DX[s_kept], cy[keep] + 0.5 * _SIDE_DY[s_kept]])
    mid_start = np.r_[0, np.cumsum(keep)[start[1:] - 1]]
    cross = cx * cy[nxt_in_ring] - cx[nxt_in_ring] * cy  # shoelace of each pixel-edge ring
    area = np.add.reduceat(cross, first) / 2.0
    return _Rings(lab[ring_order][first], area, start, np.column_stack([cx, cy]), mid, mid_start,
                  nxt_in_ring)


def _label_stats(rings: _Rings, index: np.ndarray, n_labels: int,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel count, mean pixel index, central second moments and bbox of every label
    (``index``: label of each ring) from its pixel-edge rings, by Green's theorem.

    Pixel (i, j) is the unit square [j, j+1] x [i, i+1]: the integrals of 1, x, y, xy over
    it equal the pixel-centre sums, and the one of x^2 exceeds (j + 1/2)^2 by 1/12. Each
    label's coordinates are taken from its first corner, so the numbers stay small.
    """
    lengths = np.diff(rings.start)
    first = rings.start[:-1]
    first_ring = np.unique(index, return_index=True)[1]
    origin = rings.corner[rings.start[first_ring]]
    xy = rings.corner - np.repeat(origin[index], lengths, axis=0)
    x0, y0 = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    x1, y1 = x0[rings.nxt], y0[rings.nxt]
    c = x0 * y1 - x1 * y0

    def total(term: np.ndarray) -> np.ndarray:  # sum per ring (contiguous), then per label
        return np.bincount(index, np.add.reduceat(term * c, first), n_labels)

    area = np.bincount(index, np.add.reduceat(c, first), n_labels) / 2
    mx = total(x0 + x1) / 6 / area
    my = total(y0 + y1) / 6 / area
    mxx = (total(x0 * x0 + x0 * x1 + x1 * x1) / 12 - area / 12) / area - mx * mx
    myy = (total(y0 * y0 + y0 * y1 + y1 * y1) / 12 - area / 12) / area - my * my
    mxy = total(x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) / 24 / area - mx * my
    centroid = np.column_stack([my + origin[:, 1] - 0.5, mx + origin[:, 0] - 0.5])
    bbox = np.empty((n_labels, 4), dtype=np.int64)
    for k, (ufunc, fill, axis) in enumerate(((np.minimum, np.iinfo(np.int64).max, 1),
                                             (np.minimum, np.iinfo(np.int64).max, 0),
                                             (np.maximum, -1, 1), (np.maximum, -1, 0))):
        bbox[:, k] = fill
        ufunc.at(bbox[:, k], index, ufunc.reduceat(rings.corner[:, axis], first))
    return area, centroid, np.column_stack([myy, mxx, mxy]), bbox


def _choose_rings(rings: _Rings, values: np.ndarray, index: np.ndarray,
                  pieces_expected: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rings to build, grouped by label (exterior first, then its holes): returns (ring
    indices, polygon index of each). A label with several 4-connected parts keeps the
    largest part: for nuclei against the watershed contract (a warning), for cells
    (``pieces_expected``) where a nearer neighbour's cell cuts one in two (logged at debug
    level, once per crop: a slide has hundreds)."""
    exterior = rings.area > 0
    n_ext = np.bincount(index, weights=exterior, minlength=len(values))
    keep = np.ones(len(index), dtype=bool)
    several = np.flatnonzero(n_ext > 1)
    if len(several):
        log.log(logging.DEBUG if pieces_expected else logging.WARNING,
                "%d object(s) traced to several polygons, the largest kept (ids %s)", len(several),
                ", ".join(str(int(values[k])) for k in several[:10]) + (", ..." if len(several) > 10 else ""))
    for k in several:  # rare: only labels in pieces
        members = np.flatnonzero(index == k)
        ext = members[exterior[members]]
        best = ext[np.argmax(rings.area[ext])]
        shell = Polygon(rings.corner[rings.start[best]:rings.start[best + 1]])
        for m in members:
            if m == best:
                continue
            inside = False
            if not exterior[m]:
                hole = Polygon(rings.corner[rings.start[m]:rings.start[m + 1]])
                inside = shell.contains(hole.representative_point())
            keep[m] = inside
    chosen = np.flatnonzero(keep)
    chosen = chosen[np.lexsort((~exterior[chosen], index[chosen]))]
    return chosen, index[chosen]


def _build(coords: np.ndarray, start: np.ndarray, chosen: np.ndarray, poly_index: np.ndarray,
           transform: tuple[float, float, float]) -> np.ndarray:
    """Polygons (one per label) from the chosen rings' vertices, in level-0 px, on the
    grid (rounded like ``set_precision``: k / 10, the nearest double)."""
    lengths = start[chosen + 1] - start[chosen]
    offsets = np.repeat(start[chosen] - (np.cumsum(lengths) - lengths), lengths)
    vertex = offsets + np.arange(int(lengths.sum()))
    s, tx, ty = transform
    xy = np.rint((coords[vertex] * s + np.array([tx, ty])) * _GRID) / _GRID
    ring_geoms = shapely.linearrings(xy, indices=np.repeat(np.arange(len(chosen)), lengths))
    return shapely.polygons(ring_geoms, indices=poly_index)


def _first_vertex(polygons: np.ndarray) -> np.ndarray:
    """First vertex of each exterior ring (None for an empty polygon)."""
    return shapely.get_point(shapely.get_exterior_ring(polygons), 0)


def _simplify(polygons: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """GEOS's Douglas-Peucker of on-grid polygons, and the indices of those to check.

    GEOS returns valid areas (it checks its result and repairs it with buffer(0)) made of
    a subset of the (snapped) vertices; only a repair can add vertices off the grid: those
    are snapped again, and need checking again.
    """
    out = shapely.simplify(polygons, tolerance, preserve_topology=False)
    coords, owner = shapely.get_coordinates(out, return_index=True)
    check = np.unique(owner[np.any(np.abs(coords * _GRID - np.rint(coords * _GRID)) > 1e-6, axis=1)])
    if len(check):
        out[check] = shapely.set_precision(out[check], PRECISION, mode="pointwise")
    return out, check


def trace_tile(
    labels: np.ndarray,
    offset_yx: tuple[int, int],
    scale: float,
    origin_shift: tuple[float, float] = (0.0, 0.0),
    *,
    tolerance: float = SIMPLIFY_TOLERANCE,
    pieces_expected: bool = False,
) -> TileOutlines:
    """Smoothed outlines of every instance of a crop, in level-0 px (see module doc), and
    the label statistics the table needs (``TileOutlines``).

    The label values come in ascending order (the order of the rows of
    ``table.instance_measurements`` on the same crop), with one valid shapely Polygon
    each, on the 0.1 px grid, exterior counter-clockwise.

    ``labels`` is a model-pixel crop whose [0, 0] is model pixel ``offset_yx``; ``scale``
    is level-0 px per model px; ``origin_shift=(bx, by)`` is subtracted from x and y (see
    module doc, OpenSlide bounds); ``tolerance`` (model px, 0 keeps every midpoint) is the
    Douglas-Peucker tolerance. ``pieces_expected``: labels may come in several parts
    (cells), logged at debug level only.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    lab = labels if labels.dtype.kind in "iu" else labels.astype(np.int64)
    rings = _trace(lab) if lab.size else None
    if rings is None:
        empty = np.zeros(0)
        return TileOutlines(np.zeros(0, dtype=np.int64), np.empty(0, dtype=object), empty,
                            empty.reshape(0, 2), empty.reshape(0, 3), np.zeros((0, 4), dtype=np.int64))
    values, index = np.unique(rings.label, return_inverse=True)
    pixels, centroid, moments, bbox = _label_stats(rings, index, len(values))
    chosen, poly_index = _choose_rings(rings, values, index, pieces_expected)
    s = float(scale)
    transform = (s, offset_yx[1] * s - origin_shift[0], offset_yx[0] * s - origin_shift[1])
    smooth = _build(rings.mid, rings.mid_start, chosen, poly_index, transform)
    if tolerance > 0:
        polys, check = _simplify(smooth, tolerance * s)
        # done again finer: a nucleus whose area moved by more than AREA_SLACK (thin parts),
        # that lost a hole (a 1-px hole is a diamond 0.5 px across), or whose outline lost
        # its first vertex: GEOS drops a ring's start point when it is within the tolerance
        # of its neighbours' chord, without checking the points on either side again (up
        # to ~1.1 x the tolerance away; 1-3 % of the nuclei)
        whole = shapely.area(smooth)
        changed = ((np.abs(shapely.area(polys) - whole) > AREA_SLACK * whole)
                   | (shapely.get_num_interior_rings(polys) != shapely.get_num_interior_rings(smooth))
                   | ~shapely.equals_exact(_first_vertex(polys), _first_vertex(smooth)))
        coarse = np.flatnonzero(changed)
        if len(coarse):
            polys[coarse], again = _simplify(smooth[coarse], RETRY_FACTOR * tolerance * s)
            check = np.union1d(check, coarse[again])
    else:
        polys, check = smooth, np.arange(len(smooth))
    valid = np.ones(len(polys), dtype=bool)
    valid[check] = shapely.is_valid(polys[check])
    # degenerate: invalid, or less than half the pixels' area (a 1-px diamond is half)
    least = 0.5 * np.bincount(poly_index, weights=rings.area[chosen]) * s * s
    good = (shapely.get_type_id(polys) == 3) & valid & (shapely.area(polys) >= least)
    bad = np.flatnonzero(~good)
    if len(bad):  # rare: a simplification or snap that broke one, tiny nuclei that collapse
        edges = _build(rings.corner, rings.start, chosen, poly_index, transform)
        for i in bad:
            fixed = _clean(shapely.simplify(smooth[i], tolerance * s, preserve_topology=True), int(values[i]))
            if fixed.is_empty or fixed.area < least[i]:
                fixed = _clean(shapely.simplify(edges[i], 0.0), int(values[i]))
            polys[i] = fixed
    return TileOutlines(values.astype(np.int64), shapely.orient_polygons(polys, exterior_cw=False),
                        pixels, centroid, moments, bbox)
