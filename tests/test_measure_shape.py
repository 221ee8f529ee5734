"""QuPath's shape measurements against independent computations with shapely."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from pipeline.measure.shape import (
    AREA,
    CIRCULARITY,
    LENGTH,
    MAX_DIAMETER,
    MIN_DIAMETER,
    SHAPE_NAMES,
    SOLIDITY,
    minimum_circle_radius,
    minimum_width,
    shape_measurements,
)


def random_blobs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(6, 30))
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        a, b = rng.uniform(2, 15, 2)
        r = 1 + 0.4 * rng.random(k)
        rot = rng.uniform(0, np.pi)
        x, y = a * r * np.cos(t), b * r * np.sin(t)
        pts = np.c_[x * np.cos(rot) - y * np.sin(rot), x * np.sin(rot) + y * np.cos(rot)]
        out.append(shapely.Polygon(pts + rng.uniform(0, 5e4, 2)))
    return np.array(out, dtype=object)


def width_by_rotation(polygon: shapely.Polygon, steps: int = 20000) -> float:
    """The minimum width by brute force: the extent along many directions."""
    pts = np.asarray(polygon.exterior.coords)
    angles = np.linspace(0, np.pi, steps, endpoint=False)
    proj = pts @ np.stack([np.cos(angles), np.sin(angles)])
    return float((proj.max(axis=0) - proj.min(axis=0)).min())


def test_shape_measurements_match_shapely() -> None:
    polygons = random_blobs(100)
    polygons = polygons[shapely.is_valid(polygons)]
    mpp = 0.5
    m = shape_measurements(polygons, mpp)
    assert set(m) == set(SHAPE_NAMES)
    for i, p in enumerate(polygons):
        assert m[AREA][i] == pytest.approx(p.area * mpp**2)
        assert m[LENGTH][i] == pytest.approx(p.length * mpp)
        assert m[SOLIDITY][i] == pytest.approx(p.area / p.convex_hull.area)
        assert m[CIRCULARITY][i] == pytest.approx(4 * np.pi * p.area / p.length**2)
        assert m[MAX_DIAMETER][i] == pytest.approx(2 * shapely.minimum_bounding_radius(p) * mpp)
        # minimum width: brute force, and never more than the minimum-area rectangle's short side
        assert m[MIN_DIAMETER][i] == pytest.approx(width_by_rotation(p) * mpp, abs=1e-3)
        rect = np.asarray(shapely.minimum_rotated_rectangle(p).exterior.coords)
        short = min(np.hypot(*(rect[1] - rect[0])), np.hypot(*(rect[2] - rect[1])))
        assert m[MIN_DIAMETER][i] <= short * mpp * (1 + 1e-5)  # float32 extents


def test_known_shapes() -> None:
    square = shapely.box(10, 20, 30, 40)  # 20 x 20 px
    circle = shapely.Point(0, 0).buffer(10, quad_segs=256)
    ring = shapely.Polygon(square.exterior.coords, [shapely.box(15, 25, 25, 35).exterior.coords])
    m = shape_measurements(np.array([square, circle, ring], dtype=object), 0.25, prefix="Nucleus: ")
    assert m["Nucleus: Area µm^2"][0] == pytest.approx(25.0)
    assert m["Nucleus: Min diameter µm"][0] == pytest.approx(5.0)
    assert m["Nucleus: Max diameter µm"][0] == pytest.approx(5.0 * np.sqrt(2))
    assert m["Nucleus: Circularity"][1] == pytest.approx(1.0, abs=1e-4)
    assert m["Nucleus: Max diameter µm"][1] == pytest.approx(5.0, rel=1e-4)
    # a hole: area and length count it, circularity takes the exterior ring alone (QuPath)
    assert m["Nucleus: Area µm^2"][2] == pytest.approx(25.0 - 6.25)
    assert m["Nucleus: Length µm"][2] == pytest.approx(30.0)
    assert m["Nucleus: Circularity"][2] == pytest.approx(np.pi / 4)
    assert m["Nucleus: Solidity"][2] == pytest.approx(0.75)


def test_minimum_width_of_degenerate_and_mixed_hulls() -> None:
    hulls = shapely.convex_hull(np.array([shapely.box(0, 0, 3, 1), shapely.Point(1, 1),
                                          shapely.LineString([(0, 0), (5, 5)]),
                                          shapely.Point(0, 0).buffer(4, quad_segs=64)], dtype=object))
    w = minimum_width(hulls)
    assert w[0] == pytest.approx(1.0) and w[1] == 0 and w[2] == 0
    assert w[3] == pytest.approx(8.0, rel=1e-3)
    assert minimum_width(np.array([], dtype=object)).shape == (0,)


def test_minimum_circle_matches_geos() -> None:
    """The vectorised smallest circle (``Max diameter``) against GEOS's, hull by hull:
    random hulls of 1-60 points, regular polygons (every vertex on the circle), thin
    slivers, and triangles whose circle is their circumcircle or their longest side's."""
    rng = np.random.default_rng(3)
    hulls = []
    for _ in range(2000):
        k = int(rng.integers(1, 60))
        pts = rng.normal(size=(k, 2)) * rng.uniform(0.5, 20, 2) + rng.uniform(0, 5e4, 2)
        hulls.append(shapely.convex_hull(shapely.MultiPoint(pts)))
    for m in (3, 4, 5, 8, 33, 128):
        t = np.linspace(0, 2 * np.pi, m, endpoint=False) + rng.uniform(0, 1)
        hulls.append(shapely.Polygon(np.c_[np.cos(t), np.sin(t)] * 7.5 + 3000.25))
    hulls += [shapely.box(10, 10, 11, 11), shapely.box(0, 0, 100, 0.01),
              shapely.Polygon([(0, 0), (10, 0), (5, 1)]),  # obtuse: the long side's circle
              shapely.Polygon([(0, 0), (10, 0), (5, 8)])]  # acute: the circumcircle
    hulls = np.array(hulls, dtype=object)
    hulls = hulls[shapely.get_type_id(hulls) == 3]  # hulls of 1-2 points are not polygons
    found = minimum_circle_radius(hulls)
    expected = shapely.minimum_bounding_radius(hulls)
    np.testing.assert_allclose(found, expected, rtol=1e-9)
    assert found[-2] == pytest.approx(5.0) and found[-1] == pytest.approx(8 - 39 / 16)
