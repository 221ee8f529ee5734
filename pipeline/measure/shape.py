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


def _padded_rings(hulls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each hull's vertices (without the closing repeat) in coordinates local to its first
    vertex, padded to the longest hull by repeating its last vertex: (P, n, 2) float64,
    and the vertex counts."""
    coords, index = shapely.get_coordinates(shapely.get_exterior_ring(hulls), return_index=True)
    counts = np.bincount(index, minlength=len(hulls)) - 1  # the closing vertex repeats the first
    n = max(int(counts.max(initial=0)), 1)
    starts = np.concatenate([[0], np.cumsum(counts + 1)[:-1]]).astype(np.intp)
    k = np.minimum(np.arange(n)[None, :], np.maximum(counts, 1)[:, None] - 1)  # pad: last vertex
    ring = coords[np.minimum(starts[:, None] + k, max(len(coords) - 1, 0))] if len(coords) else \
        np.zeros((len(hulls), n, 2))
    return ring - ring[:, :1], counts


def _widths(hulls: np.ndarray) -> np.ndarray:
    ring64, counts = _padded_rings(hulls)
    if int(counts.max(initial=0)) < 3:
        return np.zeros(len(hulls))
    ring = ring64.astype(np.float32)  # local coordinates: float32 keeps 1e-4 px
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


def minimum_circle_radius(hulls: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Radius of the smallest circle around each convex polygon (``Max diameter`` is its
    diameter), for all hulls at once: GEOS's ``minimum_bounding_radius`` took 60 % of the
    shape measurements, one polygon at a time."""
    hulls = np.asarray(hulls, dtype=object)
    out = np.zeros(len(hulls))
    for start in range(0, len(hulls), chunk):
        out[start:start + chunk] = _circle_radii(hulls[start:start + chunk])
    return out


def _circle_radii(hulls: np.ndarray, rounds: int = 64) -> np.ndarray:
    """Elzinga and Hearn's algorithm, vectorised: a circle is kept with the 2 or 3
    vertices that define it (its support); while a vertex lies outside, the farthest such
    vertex joins the support and the circle becomes the smallest one through it around
    the support (that vertex lies on the new circle; the radius only grows, so this ends
    with the smallest circle around all). Hulls still open after ``rounds`` go to GEOS."""
    pts, counts = _padded_rings(hulls)
    p = len(hulls)
    rows = np.arange(p)
    # start: the first vertex and the vertex farthest from it (a diameter circle)
    far = np.argmax(_squared_distances(pts, np.zeros(2)), axis=1)
    support = np.stack([np.zeros(p, np.intp), far, far], axis=1)
    centre = pts[rows, far] / 2
    radius2 = _squared_distances(centre, np.zeros(2))
    at = np.flatnonzero(counts > 0)  # the hulls whose circle may still miss a vertex
    for _ in range(rounds):
        d2 = _squared_distances(pts[at], centre[at, None])
        worst = np.argmax(d2, axis=1)
        outside = d2[np.arange(len(at)), worst] > radius2[at] * (1 + 1e-12) + 1e-18
        at, worst = at[outside], worst[outside]
        if not len(at):
            break
        support[at], centre[at], radius2[at] = _circle_through(pts[at], support[at], worst)
    else:  # not converged (never seen): the few left are GEOS's
        radius2[at] = shapely.minimum_bounding_radius(hulls[at]) ** 2
    return np.sqrt(radius2)


def _circle_through(pts: np.ndarray, support: np.ndarray, new: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The smallest circle through vertex ``new`` around the support vertices (rows of
    ``pts``): the smallest candidate that holds all four, of the circles with ``new`` and
    one support vertex as diameter and through ``new`` and two support vertices."""
    rows = np.arange(len(pts))
    d = pts[rows, new]  # (P, 2)
    s = pts[rows[:, None], support]  # (P, 3, 2)
    cands_c, cands_r, cands_s = [], [], []
    for i in range(3):  # diameter circles
        c = (d + s[:, i]) / 2
        cands_c.append(c)
        cands_r.append(_squared_distances(d, c))
        cands_s.append(np.stack([support[:, i], new, new], axis=1))
    for i, j in ((0, 1), (0, 2), (1, 2)):  # circumcircles
        c, r2 = _circumcircle(d, s[:, i], s[:, j])
        cands_c.append(c)
        cands_r.append(r2)
        cands_s.append(np.stack([support[:, i], support[:, j], new], axis=1))
    centres = np.stack(cands_c, axis=1)  # (P, 6, 2)
    radii = np.stack(cands_r, axis=1)  # (P, 6)
    four = np.concatenate([s, d[:, None]], axis=1)  # (P, 4, 2)
    d2 = _squared_distances(four[:, None], centres[:, :, None])  # (P, 6, 4)
    holds = (d2 <= radii[..., None] * (1 + 1e-9) + 1e-12).all(axis=-1) & np.isfinite(radii)
    best = np.argmin(np.where(holds, radii, np.inf), axis=1)
    return np.stack(cands_s, axis=1)[rows, best], centres[rows, best], radii[rows, best]


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b|² over the last axis (x, y), broadcast: two planes, not a reduction over an
    axis of two."""
    dy, dx = a[..., 0] - b[..., 0], a[..., 1] - b[..., 1]
    return dy * dy + dx * dx


def _circumcircle(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres and squared radii of the circles through ``a``, ``b``, ``c`` (rows);
    infinite radius for collinear or repeated points."""
    ba, ca = b - a, c - a
    det = 2 * (ba[:, 0] * ca[:, 1] - ba[:, 1] * ca[:, 0])
    b2, c2 = ba[:, 0] ** 2 + ba[:, 1] ** 2, ca[:, 0] ** 2 + ca[:, 1] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ux = (ca[:, 1] * b2 - ba[:, 1] * c2) / det
        uy = (ba[:, 0] * c2 - ca[:, 0] * b2) / det
    ok = np.abs(det) > 1e-12 * np.maximum(b2 * c2, 1e-300) ** 0.5
    r2 = np.where(ok, ux * ux + uy * uy, np.inf)
    centre = a + np.stack([np.where(ok, ux, 0.0), np.where(ok, uy, 0.0)], axis=1)
    return centre, r2


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
            prefix + MAX_DIAMETER: 2 * minimum_circle_radius(hulls) * mpp,
            prefix + MIN_DIAMETER: minimum_width(hulls) * mpp}
