"""Shape measurements of outline polygons, named and defined as QuPath 0.6 defines them
(``ObjectMeasurements.ShapeFeatures``), so that an object classifier trained on StarDist or
InstanSeg detections in QuPath finds the same features on ours:

* ``Area µm^2``: the polygon's area (holes excluded);
* ``Length µm``: its perimeter (exterior and holes);
* ``Circularity``: 4π·area / perimeter² of the exterior ring alone (1 for a circle);
* ``Solidity``: area / area of the convex hull;
* ``Max diameter µm``: the diameter of the minimum bounding circle;
* ``Min diameter µm``: the minimum width (the smallest distance between two parallel
  lines that enclose the polygon; JTS ``MinimumDiameter``).

Computed for arrays of polygons at once with shapely's vectorised functions; only the
minimum width loops, over convex hulls of a few dozen vertices.
"""

from __future__ import annotations

import numpy as np
import shapely

AREA = "Area µm^2"
LENGTH = "Length µm"
CIRCULARITY = "Circularity"
SOLIDITY = "Solidity"
MAX_DIAMETER = "Max diameter µm"
MIN_DIAMETER = "Min diameter µm"
SHAPE_NAMES = (AREA, LENGTH, CIRCULARITY, SOLIDITY, MAX_DIAMETER, MIN_DIAMETER)
UNITS = {AREA: "µm^2", LENGTH: "µm", CIRCULARITY: "1", SOLIDITY: "1", MAX_DIAMETER: "µm",
         MIN_DIAMETER: "µm"}


def minimum_width(hulls: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Minimum width of each convex polygon (rotating calipers: the smallest, over the hull's
    edges, of the largest distance of a hull vertex from that edge's line), for all hulls
    at once: each hull's vertices are padded to the longest hull by repeating its last
    vertex, which changes no distance and adds only zero-length edges (ignored)."""
    hulls = np.asarray(hulls, dtype=object)
    out = np.zeros(len(hulls))
    for start in range(0, len(hulls), chunk):
        out[start:start + chunk] = _widths(hulls[start:start + chunk])
    return out


def _widths(hulls: np.ndarray) -> np.ndarray:
    coords, index = shapely.get_coordinates(shapely.get_exterior_ring(hulls), return_index=True)
    counts = np.bincount(index, minlength=len(hulls)) - 1  # the closing vertex repeats the first
    n = int(counts.max(initial=0))
    if n < 3:
        return np.zeros(len(hulls))
    starts = np.concatenate([[0], np.cumsum(counts + 1)[:-1]])
    k = np.minimum(np.arange(n)[None, :], np.maximum(counts, 1)[:, None] - 1)  # pad: last vertex
    ring = coords[starts[:, None] + k]  # (P, n, 2)
    ring = (ring - ring[:, :1]).astype(np.float32)  # local coordinates: float32 keeps 1e-4 px
    edge = np.roll(ring, -1, axis=1) - ring
    # the edge from the last real vertex back to the first (np.roll wraps to vertex 0 only
    # for the longest hulls); the padded repeats give zero-length edges
    last = np.maximum(counts, 1) - 1
    rows = np.arange(len(hulls))
    edge[rows, last] = ring[:, 0] - ring[rows, last]
    norm = np.hypot(edge[..., 0], edge[..., 1])  # (P, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        normal = np.stack([-edge[..., 1], edge[..., 0]], axis=-1) / norm[..., None]
    # the extent of every vertex along every edge's normal: (P, edge, vertex)
    normal = np.nan_to_num(normal)
    proj = normal[:, :, None, 0] * ring[:, None, :, 0] + normal[:, :, None, 1] * ring[:, None, :, 1]
    height = proj.max(axis=2) - proj.min(axis=2)
    width = np.where(norm > 0, height, np.inf).min(axis=1)
    return np.where((counts >= 3) & np.isfinite(width), width, 0.0)


def shape_measurements(polygons: np.ndarray, mpp: float, prefix: str = "") -> dict[str, np.ndarray]:
    """QuPath's shape measurements of ``polygons`` (level-0 pixel coordinates) in µm, keyed
    by ``prefix`` + name (``"Nucleus: "`` / ``"Cell: "`` for cells, nothing for detections)."""
    polygons = np.asarray(polygons, dtype=object)
    area = shapely.area(polygons)
    length = shapely.length(polygons)
    ring = shapely.get_exterior_ring(polygons)
    ring_length = shapely.length(ring)
    with np.errstate(divide="ignore", invalid="ignore"):
        # the exterior's area: the polygon's own where it has no hole (most), so that the
        # rings are rebuilt as polygons only for the few with holes
        ring_area = np.array(area, np.float64)
        holes = shapely.get_num_interior_rings(polygons) > 0
        ring_area[holes] = shapely.area(shapely.polygons(ring[holes]))
        circularity = np.where(ring_length > 0, 4 * np.pi * ring_area / ring_length**2, 0.0)
        hulls = shapely.convex_hull(polygons)
        hull_area = shapely.area(hulls)
        solidity = np.where(hull_area > 0, area / hull_area, 0.0)
    return {prefix + AREA: area * mpp * mpp,
            prefix + LENGTH: length * mpp,
            prefix + CIRCULARITY: circularity,
            prefix + SOLIDITY: solidity,
            # the circle around a polygon is the circle around its hull: fewer vertices to
            # visit (half of a cell tile's shape time went to this circle)
            prefix + MAX_DIAMETER: 2 * shapely.minimum_bounding_radius(hulls) * mpp,
            prefix + MIN_DIAMETER: minimum_width(hulls) * mpp}
