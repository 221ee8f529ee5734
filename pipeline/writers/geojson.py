"""QuPath-ready GeoJSON of nuclei (QuPath 0.4 - 0.7), streamed and written atomically.

What QuPath needs (docs formats.md §1):

* A ``FeatureCollection`` of ``"objectType": "detection"`` features (light objects; QuPath
  advises detections for many objects). ``classification`` always carries ``color``
  (a name without colour fails to parse in QuPath 0.4-0.7).
* ``measurements`` as a flat dict of finite numbers: JSON has no NaN and QuPath 0.4 cannot
  read NaN strings, so non-finite values are left out.
* Valid polygons on a 0.01 px grid: QuPath 0.6+ reduces precision on import and rejects
  invalid polygons, so every polygon is snapped to the grid, checked, and repaired
  (``make_valid``, largest part) in the rare case that snapping broke it.
* Coordinates in **level-0 pixels**, origin at the top-left corner, y down, continuous
  (pixel (i, j) covers [j, j+1) x [i, i+1)).
* **OpenSlide bounds**: QuPath's default OpenSlide reader crops slides that declare
  ``openslide.bounds-x/y`` (e.g. MIRAX) to those bounds, so QuPath x = OpenSlide x -
  bounds-x. Pass ``origin_shift=(bounds_x, bounds_y)`` to target that reader
  (``SlideInfo.bounds_xy``); use (0, 0) for Bio-Formats or slides without bounds.

**Outlines** (``tile_polygons``): the boundary of each label is traced once for the whole
crop (pixel-edge rings, in numpy), each ring is replaced by the midpoints of its unit pixel
edges (what marching squares at the 0.5 level gives for a binary mask: a sub-pixel
outline without staircase), then simplified with Douglas-Peucker at
``SIMPLIFY_TOLERANCE`` model px. Why: a staircase costs a vertex per pixel step and draws
a jagged outline; the smoothed one has a few vertices per nucleus and follows the shape.
Its area is the label's pixel count x scale^2 to within a few % (slightly less: the
outline runs through boundary pixel edges' midpoints, and simplification cuts corners);
the table's ``area_px`` stays the pixel count. A nucleus whose smoothed outline is
degenerate (1-3 px) falls back to its pixel-edge polygon. One Polygon per label, exterior
counter-clockwise (shapely's sign), holes kept.

**Text** (``feature_bodies`` / ``feature_texts``): features are serialised with
vectorised code on the workers (everything but the id, which needs the global nucleus
number); the single writer only splices the uuid and ``Nucleus id`` in front of / behind
each pre-made body and writes the text (``GeoJSONWriter.write_texts``). Bodies are ASCII
(``\\u00b5`` for µ, as ``json.dumps`` writes) and free of newlines, so a tile's bodies
can be stored joined by ``\\n``.

Feature ids are deterministic UUIDs (uuid5 of ``"<slide_id>:<nucleus_id>"``): re-running a
slide gives byte-identical files, and the id ties a feature to its label value. QuPath
offers to update ids if the same objects are imported twice into one image.
"""

from __future__ import annotations

import gzip as gzip_module
import hashlib
import io
import json
import logging
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import shapely
from shapely.geometry import Polygon, mapping
from shapely.geometry.polygon import orient

from pipeline.atomic import temp_name

log = logging.getLogger(__name__)

__all__ = [
    "NUCLEUS_CLASS",
    "NUCLEUS_NAMESPACE",
    "SIMPLIFY_TOLERANCE",
    "GeoJSONWriter",
    "feature_bodies",
    "feature_texts",
    "label_polygons",
    "nucleus_feature",
    "nucleus_uuid",
    "shift_bodies",
    "tile_polygons",
]

PRECISION = 0.01  # QuPath's 0.01 px grid
SIMPLIFY_TOLERANCE = 0.35  # model px (Douglas-Peucker on the midpoint outline)
NUCLEUS_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://wsi-nuclei/nucleus")
NUCLEUS_CLASS = {"name": "Nucleus", "color": [0, 200, 0]}
# Table column -> QuPath-style measurement name.
MEASUREMENT_NAMES = {
    "id": "Nucleus id",
    "area_px": "Area px^2",
    "area_um2": "Area µm^2",
    "perimeter_um": "Perimeter µm",
    "eccentricity": "Eccentricity",
    "solidity": "Solidity",
    "mean_probability": "Mean probability",
}
_SKIP = {"centroid_x_px", "centroid_y_px", "centroid_x_um", "centroid_y_um",
         "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"}  # QuPath derives these from the ROI
_GEOMETRY_KEY = '"geometry":'
_PROPERTIES_KEY = ',"properties":'

# Pixel sides in clockwise screen order (y down): top, right, bottom, left. A boundary edge
# is walked with its pixel on the right-hand side (screen), i.e. exteriors have a positive
# shoelace area in (x, y) numbers and holes a negative one.
_SIDE_DX = np.array([1, 0, -1, 0])  # walking direction
_SIDE_DY = np.array([0, 1, 0, -1])
_START_X = np.array([0, 1, 1, 0])  # start corner of the side, relative to the pixel's (x, y)
_START_Y = np.array([0, 0, 1, 1])


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
    """Valid, single, on the 0.01 grid; falls back to the unsnapped valid polygon in the
    (practically unreachable) case that snapping would erase it, so no instance is lost."""
    geom = poly if poly.is_valid else shapely.make_valid(poly)
    part = _largest_polygon(geom, value) or poly
    snapped = _largest_polygon(shapely.set_precision(part, PRECISION), value)
    if snapped is None:
        log.warning("nucleus %d vanishes on the %.2f px grid; written unsnapped", value, PRECISION)
        snapped = part
    return orient(snapped, sign=1.0)


@dataclass(frozen=True)
class _Rings:
    """Boundary rings of every label of a crop, vertices in ring order (model px, crop
    coordinates, x right / y down). Ring ``k`` holds vertices ``start[k]:start[k+1]``."""

    label: np.ndarray  # (rings,) label value
    area: np.ndarray  # (rings,) signed pixel-edge area: > 0 exterior, < 0 hole
    start: np.ndarray  # (rings + 1,)
    corner: np.ndarray  # (edges, 2) start corner of each unit pixel edge (pixel-edge ring)
    mid: np.ndarray  # (edges, 2) midpoint of each unit pixel edge (smooth ring)


def _trace(labels: np.ndarray) -> _Rings:
    """All boundary rings of all labels at once, with array operations only.

    Every pixel side facing another value is a unit edge. Its successor is found locally
    (turn right around the same pixel if possible, else go straight, else turn left):
    this keeps each label 4-connected, like ``rasterio.features.shapes(connectivity=4)``.
    The successor permutation is split into cycles and ordered by pointer jumping
    (O(edges log ring length), no loop over nuclei or pixels).
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
    side = np.concatenate([np.full(len(p), s, dtype=np.int64) for p, s in parts])
    key = pix * 4 + side
    order = np.argsort(key, kind="stable")  # four sorted runs: a merge
    key, pix, side = key[order], pix[order], side[order]
    lab = flat[pix]
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
    mid = np.column_stack([cx + 0.5 * _SIDE_DX[s_ord], cy + 0.5 * _SIDE_DY[s_ord]])
    corner = np.column_stack([cx, cy]).astype(np.float64)
    start = np.r_[first, n]
    # shoelace of each pixel-edge ring (cyclic successor within the ring)
    nxt_in_ring = np.arange(1, n + 1)
    nxt_in_ring[start[1:] - 1] = first
    cross = cx * cy[nxt_in_ring] - cx[nxt_in_ring] * cy
    area = np.add.reduceat(cross, first) / 2.0
    return _Rings(lab[ring_order][first], area, start, corner, mid)


def _drop_collinear(coords: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rings without their exactly collinear vertices (straight and 45-degree runs of the
    midpoint outline; half-pixel coordinates, so the test is exact): same shapes, about
    half the vertices for the geometry steps that follow."""
    n = len(coords)
    first = start[:-1]
    nxt = np.arange(1, n + 1)
    nxt[start[1:] - 1] = first
    prv = np.arange(-1, n - 1)
    prv[first] = start[1:] - 1
    d_in = coords - coords[prv]
    d_out = coords[nxt] - coords
    keep = d_in[:, 0] * d_out[:, 1] != d_in[:, 1] * d_out[:, 0]
    kept = np.cumsum(keep)
    return coords[keep], np.r_[0, kept[start[1:] - 1]]


def _choose_rings(rings: _Rings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rings to build, grouped by label (exterior first, then its holes): returns
    (ring indices, polygon index of each, label values). A label with several 4-connected
    parts (against the watershed contract) keeps the largest part, with a warning."""
    values, index = np.unique(rings.label, return_inverse=True)
    exterior = rings.area > 0
    n_ext = np.bincount(index, weights=exterior, minlength=len(values))
    keep = np.ones(len(index), dtype=bool)
    for k in np.flatnonzero(n_ext > 1):  # rare: only labels that break the contract
        members = np.flatnonzero(index == k)
        ext = members[exterior[members]]
        log.warning("nucleus %d traced to %d polygons; keeping the largest", int(values[k]), len(ext))
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
    return chosen, index[chosen], values


def _build(coords: np.ndarray, start: np.ndarray, chosen: np.ndarray, poly_index: np.ndarray,
           transform: tuple[float, float, float]) -> np.ndarray:
    """Polygons (one per label) from the chosen rings' vertices, in level-0 px."""
    lengths = start[chosen + 1] - start[chosen]
    offsets = np.repeat(start[chosen] - (np.cumsum(lengths) - lengths), lengths)
    vertex = offsets + np.arange(int(lengths.sum()))
    s, tx, ty = transform
    xy = coords[vertex] * s + np.array([tx, ty])
    ring_geoms = shapely.linearrings(xy, indices=np.repeat(np.arange(len(chosen)), lengths))
    return shapely.polygons(ring_geoms, indices=poly_index)


def tile_polygons(
    labels: np.ndarray,
    offset_yx: tuple[int, int],
    scale: float,
    origin_shift: tuple[float, float] = (0.0, 0.0),
    *,
    tolerance: float = SIMPLIFY_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed outlines of every instance of a crop, in level-0 px (see module doc).

    Returns ``(values, polygons)``: the label values in ascending order (the same order as
    the rows of ``table.instance_measurements`` on the same crop) and an object array of
    one valid shapely Polygon each, on the 0.01 grid, exterior counter-clockwise.

    ``labels`` is a model-pixel crop whose [0, 0] is model pixel ``offset_yx``; ``scale``
    is level-0 px per model px; ``origin_shift=(bx, by)`` is subtracted from x and y (see
    module doc, OpenSlide bounds); ``tolerance`` (model px, 0 keeps every midpoint) is the
    Douglas-Peucker tolerance.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if labels.size == 0 or not labels.any():
        return np.zeros(0, dtype=np.int64), np.empty(0, dtype=object)
    lab = labels if labels.dtype.kind in "iu" else labels.astype(np.int64)
    if lab.dtype.kind == "i" and lab.min() < 0:
        raise ValueError("label values must be >= 0")
    rings = _trace(lab)
    chosen, poly_index, values = _choose_rings(rings)
    s = float(scale)
    transform = (s, offset_yx[1] * s - origin_shift[0], offset_yx[0] * s - origin_shift[1])
    mid, mid_start = _drop_collinear(rings.mid, rings.start)
    smooth = _build(mid, mid_start, chosen, poly_index, transform)
    polys = shapely.simplify(smooth, tolerance * s, preserve_topology=False) if tolerance > 0 else smooth
    polys = shapely.set_precision(polys, PRECISION, mode="pointwise")
    # degenerate: invalid, or less than half the pixels' area (a 1-px diamond is half)
    least = 0.5 * np.bincount(poly_index, weights=rings.area[chosen]) * s * s
    good = (shapely.get_type_id(polys) == 3) & shapely.is_valid(polys) & (shapely.area(polys) >= least)
    bad = np.flatnonzero(~good)
    if len(bad):  # rare: a simplification or snap that broke one, tiny nuclei that collapse
        edges = _build(rings.corner, rings.start, chosen, poly_index, transform)
        for i in bad:
            fixed = _clean(shapely.simplify(smooth[i], tolerance * s, preserve_topology=True), int(values[i]))
            if fixed.is_empty or fixed.area < least[i]:
                fixed = _clean(shapely.simplify(edges[i], 0.0), int(values[i]))
            polys[i] = fixed
    return values.astype(np.int64), shapely.orient_polygons(polys, exterior_cw=False)


def label_polygons(
    labels: np.ndarray,
    offset_yx: tuple[int, int],
    scale: float,
    origin_shift: tuple[float, float] = (0.0, 0.0),
    *,
    tolerance: float = SIMPLIFY_TOLERANCE,
) -> Iterator[tuple[int, Polygon]]:
    """``(label value, Polygon)`` pairs of ``tile_polygons``, ascending by value."""
    values, polys = tile_polygons(labels, offset_yx, scale, origin_shift, tolerance=tolerance)
    yield from zip(values.tolist(), polys)


def nucleus_uuid(slide_id: str, nucleus_id: int) -> str:
    """Deterministic feature id of a nucleus."""
    return str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{slide_id}:{int(nucleus_id)}"))


def _uuids(slide_id: str, nucleus_ids: Iterable[int]) -> list[str]:
    """``nucleus_uuid`` for many ids: the same uuid5 (SHA-1 of namespace + name, version
    and variant bits set), without building a ``uuid.UUID`` per id (3x faster)."""
    prefix = hashlib.sha1(NUCLEUS_NAMESPACE.bytes + f"{slide_id}:".encode())
    out = []
    for nid in nucleus_ids:
        h = prefix.copy()
        h.update(b"%d" % nid)
        x = h.hexdigest()
        out.append(f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{'89ab'[int(x[16], 16) & 3]}{x[17:20]}-{x[20:32]}")
    return out


def _finite_measurements(nucleus_id: int, measurements: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in measurements.items():
        if key in _SKIP:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[MEASUREMENT_NAMES.get(key, key)] = number
    out["Nucleus id"] = float(nucleus_id)
    return out


def _classification_json(classification: Mapping[str, Any]) -> dict[str, Any]:
    if "color" not in classification or "name" not in classification:
        raise ValueError("classification needs both 'name' and 'color' (QuPath cannot parse it otherwise)")
    return {"name": str(classification["name"]), "color": [int(c) for c in classification["color"]]}


def nucleus_feature(
    slide_id: str,
    nucleus_id: int,
    polygon: Polygon,
    measurements: Mapping[str, Any],
    classification: Mapping[str, Any] = NUCLEUS_CLASS,
) -> dict[str, Any]:
    """One QuPath detection feature. ``measurements`` may use table column names (mapped
    to QuPath-style names; centroid/bbox columns dropped) or final names; non-numeric and
    non-finite values are dropped. (``feature_bodies`` + ``feature_texts`` write the same
    feature as text, for many nuclei at once.)"""
    return {
        "type": "Feature",
        "id": nucleus_uuid(slide_id, nucleus_id),
        "geometry": mapping(polygon),
        "properties": {
            "objectType": "detection",
            "classification": _classification_json(classification),
            "measurements": _finite_measurements(nucleus_id, measurements),
        },
    }


def feature_bodies(
    polygons: np.ndarray | Sequence[Polygon],
    measurements: Mapping[str, Any],
    classification: Mapping[str, Any] = NUCLEUS_CLASS,
) -> list[str]:
    """Each nucleus's feature text without its id parts (see ``feature_texts``).

    ``measurements`` maps table column names (or final names) to arrays aligned with
    ``polygons``; ``id`` and centroid/bbox columns are skipped, non-finite values left
    out. Geometry text comes from GEOS (``shapely.to_geojson``), numbers from numpy
    (shortest round-trip repr), both vectorised: this runs on the workers.
    """
    geoms = shapely.to_geojson(np.asarray(polygons, dtype=object))
    n = len(geoms)
    columns: list[list[str]] = []
    for key, values in measurements.items():
        if key in _SKIP or key in ("id", "Nucleus id"):
            continue
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (n,):
            raise ValueError(f"measurement {key!r} has shape {v.shape}, expected ({n},)")
        finite = np.isfinite(v)
        if not finite.any():
            continue
        name = json.dumps(MEASUREMENT_NAMES.get(key, key))
        text = np.strings.add(np.strings.add(f"{name}:", v.astype(str)), ",")
        if not finite.all():
            text = np.where(finite, text, "")
        columns.append(text.tolist())
    tail = (_PROPERTIES_KEY + '{"objectType":"detection","classification":'
            + json.dumps(_classification_json(classification), separators=(",", ":"))
            + ',"measurements":{')
    if not columns:
        return [_GEOMETRY_KEY + g + tail for g in geoms]
    return [_GEOMETRY_KEY + g + tail + "".join(parts) for g, parts in zip(geoms, zip(*columns))]


def feature_texts(slide_id: str, nucleus_ids: Iterable[int], bodies: Iterable[str]) -> list[str]:
    """Complete feature JSON texts: the id (uuid5 of ``"<slide_id>:<nucleus_id>"``) spliced
    in front of each body and the ``Nucleus id`` measurement behind it. One string
    format per nucleus: this is all the single writer does per nucleus."""
    ids = [int(i) for i in nucleus_ids]
    return [f'{{"type":"Feature","id":"{u}",{b}"Nucleus id":{i}.0}}}}}}'
            for u, b, i in zip(_uuids(slide_id, ids), bodies, ids)]


def shift_bodies(bodies: Sequence[str], dx: float, dy: float) -> list[str]:
    """Bodies with their geometry translated by (-dx, -dy), re-snapped to the grid
    (vectorised: parse, translate, write), for an origin shift known only later."""
    if not len(bodies) or (dx == 0 and dy == 0):
        return list(bodies)
    heads, rests = [], []
    for body in bodies:
        geom, sep, rest = body[len(_GEOMETRY_KEY):].partition(_PROPERTIES_KEY)
        if not body.startswith(_GEOMETRY_KEY) or not sep:
            raise ValueError("not a feature body (from feature_bodies)")
        heads.append(geom)
        rests.append(rest)
    geoms = shapely.from_geojson(np.asarray(heads, dtype=object))
    geoms = shapely.transform(geoms, lambda c: c - np.array([dx, dy]))
    geoms = shapely.set_precision(geoms, PRECISION, mode="pointwise")
    return [f"{_GEOMETRY_KEY}{g}{_PROPERTIES_KEY}{r}" for g, r in zip(shapely.to_geojson(geoms), rests)]


class GeoJSONWriter:
    """Stream a FeatureCollection to ``path`` (``.geojson``/``.json``, gzip if ``.gz``).

    Features are written one by one (``write``) or as pre-serialised text (``write_texts``;
    nothing accumulates in memory) to a hidden temporary file in the same folder, renamed
    onto ``path`` when the ``with`` block ends normally and deleted if it raises.
    ``gzip=None`` follows the suffix; an explicit value must agree with it. Gzip output has
    no timestamp, so equal inputs give equal bytes.
    """

    def __init__(self, path: str | os.PathLike[str], gzip: bool | None = None) -> None:
        self.path = Path(path)
        name = self.path.name.lower()
        is_gz = name.endswith(".gz")
        if not name.removesuffix(".gz").endswith((".geojson", ".json")):
            raise ValueError(f"{self.path}: expected a .geojson, .json, .geojson.gz or .json.gz name")
        if gzip is not None and gzip != is_gz:
            raise ValueError(f"{self.path}: gzip={gzip} does not match the file suffix")
        self.gzip = is_gz
        self.count = 0
        self._tmp: Path | None = None
        self._raw: IO[bytes] | None = None
        self._text: io.TextIOWrapper | None = None

    def __enter__(self) -> GeoJSONWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_name(self.path)
        self._raw = open(self._tmp, "wb")
        stream: IO[bytes] = self._raw
        if self.gzip:
            stream = gzip_module.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=6)
        self._text = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
        self._text.write('{"type": "FeatureCollection", "features": [')
        return self

    def write(self, feature: Mapping[str, Any]) -> None:
        """Append one feature (must be JSON-serialisable without NaN)."""
        self.write_texts([json.dumps(feature, allow_nan=False, separators=(",", ":"))])

    add = write  # alias: ``writer.add(feature)`` reads naturally in the orchestrator

    def write_texts(self, texts: Sequence[str]) -> None:
        """Append features given as JSON text, one complete feature object per string
        (e.g. from ``feature_texts``; not parsed again: the caller vouches for them)."""
        if self._text is None:
            raise RuntimeError("GeoJSONWriter.write outside its 'with' block")
        if not len(texts):
            return
        self._text.write(("\n" if self.count == 0 else ",\n") + ",\n".join(texts))
        self.count += len(texts)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._text is None or self._raw is None or self._tmp is None:
            raise RuntimeError("GeoJSONWriter exited without being entered")
        complete = False
        try:
            if exc_type is None:
                self._text.write("\n]}\n")
            self._text.close()  # flushes; writes the gzip trailer (the raw file stays open)
            complete = exc_type is None
        finally:
            self._raw.close()
            self._text = None
            if complete:
                os.replace(self._tmp, self.path)
                log.info("wrote %d features to %s", self.count, self.path)
            else:
                self._tmp.unlink(missing_ok=True)
                log.warning("GeoJSON %s not written (interrupted)", self.path)
