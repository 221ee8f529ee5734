"""Nucleus outlines (``pipeline.writers.outlines``): one smoothed outline per label (traced
like rasterio's pixel edges, areas within a few % of the pixel count, within the
simplification tolerance of the sub-pixel outline, holes kept), valid geometry on a 0.1 px
grid (QuPath's is 0.01), aligned with the table's rows."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import rasterio.features
import shapely
from label_shapes import by_value, on_grid, random_ellipses, synthetic_labels
from scipy import ndimage as ndi
from shapely.geometry import Polygon, shape
from skimage.measure import label

from pipeline.writers.features import feature_bodies
from pipeline.writers.outlines import AREA_SLACK, SIMPLIFY_TOLERANCE, _clean, _trace, trace_tile
from pipeline.writers.table import instance_measurements


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_one_valid_outline_per_label_inside_its_pixels(scale: float) -> None:
    lab = synthetic_labels()
    polys = by_value(trace_tile(lab, (3, 5), scale))
    assert sorted(polys) == list(range(1, 9))
    for value, poly in polys.items():
        assert isinstance(poly, Polygon) and poly.is_valid and not poly.is_empty
        assert poly.exterior.is_ccw and on_grid(poly)
        count = (lab == value).sum()
        # sub-pixel outline: a little smaller than the pixels (corners cut), never larger
        assert 0.5 * count * scale**2 <= poly.area <= count * scale**2
        if count > 20:
            assert poly.area == pytest.approx(count * scale**2, rel=0.1)
        ys, xs = np.nonzero(lab == value)
        # within the pixel edges in level-0 px: model pixel (r, c) covers [c*s, (c+1)*s) x [r*s, (r+1)*s)
        x0, y0, x1, y1 = poly.bounds
        assert (xs.min() + 5) * scale <= x0 and x1 <= (xs.max() + 6) * scale
        assert (ys.min() + 3) * scale <= y0 and y1 <= (ys.max() + 4) * scale


def test_outline_area_agrees_with_label_area_on_nucleus_shapes() -> None:
    lab = random_ellipses(1)
    outlines = trace_tile(lab, (0, 0), 1.0)
    values, polys = outlines.values, outlines.polygons
    ratio = shapely.area(polys) / np.bincount(lab.ravel())[values]
    assert len(values) > 30
    assert np.mean(np.abs(ratio - 1)) < 0.015 and np.max(np.abs(ratio - 1)) < 0.05
    # lean: far fewer vertices than the pixel-edge staircase
    staircase = [len(shapely.get_coordinates(shape(g))) for g, _ in
                 rasterio.features.shapes(lab, mask=lab > 0, connectivity=4)]
    assert shapely.get_num_coordinates(polys).mean() < 0.6 * np.mean(staircase)


def thin_labels() -> np.ndarray:
    """2-4 px wide nuclei (bars, an L, a cross): the corners a coarse simplification cuts;
    and a nucleus with a 1-px hole, which it closes."""
    lab = np.zeros((60, 60), np.int32)
    lab[2:6, 2:10] = 1  # 4 x 8
    lab[2:5, 14:26] = 2  # 3 x 12
    lab[10:22, 2:5] = 3
    lab[19:22, 5:12] = 3  # L, 3 px arms
    lab[10:24, 20:23] = 4
    lab[15:18, 15:29] = 4  # cross, 3 px arms
    lab[28:32, 30:34] = 5  # 4 x 4
    lab[30:32, 40:55] = 6  # 2 x 15
    yy, xx = np.mgrid[:60, :60]
    lab[(yy - 48) ** 2 + (xx - 12) ** 2 <= 81] = 7
    lab[48, 12] = 0  # a 1-px hole
    return lab


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_lean_outlines_stay_within_the_tolerance(scale: float) -> None:
    """Few vertices, yet every outline within SIMPLIFY_TOLERANCE model px of the sub-pixel
    outline (Hausdorff; GEOS's dropped ring start points are redone), its holes kept and,
    thin parts included, within AREA_SLACK of its area."""
    for lab in (random_ellipses(1), random_ellipses(2), thin_labels()):
        polys = trace_tile(lab, (7, 3), scale).polygons
        full = trace_tile(lab, (7, 3), scale, tolerance=0).polygons
        assert shapely.is_valid(polys).all() and all(on_grid(p) for p in polys)
        assert (shapely.get_num_interior_rings(polys) == shapely.get_num_interior_rings(full)).all()
        distance = shapely.hausdorff_distance(polys, full, densify=0.1) / scale
        assert distance.max() <= SIMPLIFY_TOLERANCE + 1e-9
        assert (np.abs(shapely.area(polys) / shapely.area(full) - 1) <= AREA_SLACK).all()
    # lean: a nucleus of 8-40 px needs ~15 vertices (Douglas-Peucker at 0.35 px kept ~24)
    assert shapely.get_num_coordinates(trace_tile(random_ellipses(1), (0, 0), scale).polygons).mean() - 1 < 17


def _region(rings: np.ndarray) -> shapely.Geometry:
    """Nested rings of one label -> its area (exteriors and holes alternate: XOR)."""
    out = shapely.Polygon()
    for ring in rings:
        out = shapely.symmetric_difference(out, shapely.simplify(ring, 0.0))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_traced_pixel_edges_equal_rasterio_shapes(seed: int) -> None:
    """The numpy tracer finds the same 4-connected pixel-edge regions as rasterio (GDAL),
    holes, several parts and diagonal contacts included."""
    rng = np.random.default_rng(seed)
    lab = ndi.zoom(rng.integers(0, 6, (12, 14)), 3, order=0).astype(np.int32)
    lab[rng.random(lab.shape) < 0.08] = 0  # pepper: holes, saddles, split parts
    lab[rng.random(lab.shape) < 0.03] = 7
    rings = _trace(lab)
    corner_rings = np.array([Polygon(rings.corner[a:b]) for a, b in zip(rings.start[:-1], rings.start[1:])])
    reference: dict[int, list[shapely.Geometry]] = {}
    for geom, value in rasterio.features.shapes(lab, mask=lab > 0, connectivity=4):
        reference.setdefault(int(value), []).append(shape(geom))
    assert sorted(reference) == sorted(np.unique(rings.label).tolist())
    for value, parts in reference.items():
        mine = _region(corner_rings[rings.label == value])
        assert mine.area == (lab == value).sum() == np.sum(rings.area[rings.label == value])
        assert mine.symmetric_difference(shapely.union_all(parts)).area == 0


@pytest.mark.parametrize("scale", [1.0, 2.0, 1.9771])
def test_outlines_of_irregular_labels_are_valid(scale: float) -> None:
    """Ragged shapes (pepper, split parts, holes, 1-px bits): one valid Polygon per label,
    on the grid, CCW, at least half the pixels' area."""
    rng = np.random.default_rng(7)
    lab = ndi.zoom(rng.integers(0, 40, (20, 24)), 4, order=0).astype(np.int32)
    lab[rng.random(lab.shape) < 0.1] = 0
    lab = label(lab, connectivity=1, background=0).astype(np.int32)  # 4-connected parts
    outlines = trace_tile(lab, (11, 3), scale)
    values, polys = outlines.values, outlines.polygons
    assert values.tolist() == np.unique(lab[lab > 0]).tolist()
    assert shapely.is_valid(polys).all() and (shapely.get_type_id(polys) == 3).all()
    assert all(on_grid(p) and p.exterior.is_ccw for p in polys)
    assert (shapely.area(polys) >= 0.5 * np.bincount(lab.ravel())[values] * scale**2 * 0.999).all()


def test_tiny_nuclei_and_holes_and_big_ids() -> None:
    lab = np.zeros((20, 30), np.uint32)
    lab[1, 1] = 1  # 1 px
    lab[1, 4:6] = 2  # 2 px
    lab[4:6, 1] = 3
    lab[5, 2] = 3  # 3 px, L
    lab[4, 5], lab[5, 6] = 4, 4  # two diagonal pixels: two parts, one kept
    lab[8:18, 8:18] = 2**32 - 5  # a big id with a hole
    lab[12:14, 12:14] = 0
    outlines = trace_tile(lab, (0, 0), 2.0)
    values, polys = outlines.values, outlines.polygons
    assert values.tolist() == [1, 2, 3, 4, 2**32 - 5]
    assert all(isinstance(p, Polygon) and p.is_valid and p.area > 0 and on_grid(p) for p in polys)
    assert len(polys[-1].interiors) == 1
    assert polys[-1].area == pytest.approx(96 * 4, rel=0.05)
    # the pixel-edge fallback: a degenerate smoothed outline gives the pixel square
    [square] = trace_tile(lab[:3, :3], (0, 0), 1.0, tolerance=5.0).polygons
    assert square.is_valid and square.area == 1.0


def test_polygons_align_with_table_rows() -> None:
    lab = synthetic_labels()
    table = instance_measurements(lab, np.ones(lab.shape), (0, 0), 2.0, 0.25)
    outlines = trace_tile(lab, (0, 0), 2.0)
    values, polys = outlines.values, outlines.polygons
    assert values.tolist() == table["id"].tolist()
    np.testing.assert_allclose(table["Length µm"], shapely.length(polys) * 0.25)
    np.testing.assert_allclose(table["Area µm^2"], shapely.area(polys) * 0.25**2)
    hull = shapely.convex_hull(polys)
    np.testing.assert_allclose(table["Solidity"], shapely.area(polys) / shapely.area(hull))
    np.testing.assert_allclose(table["Max diameter µm"], 2 * shapely.minimum_bounding_radius(polys) * 0.25)
    for poly, area, cx, cy in zip(polys, table["area_px"], table["centroid_x_px"], table["centroid_y_px"]):
        assert poly.area <= area and poly.area >= 0.5 * area
        # table centroids use the pixel-index convention: continuous x - 0.5; the
        # outline is symmetric to within its simplification
        assert poly.centroid.x - 0.5 == pytest.approx(cx, abs=1.0)
        assert poly.centroid.y - 0.5 == pytest.approx(cy, abs=1.0)


@pytest.mark.parametrize("scale", [1.002, 1.9771, 0.4987])
def test_vertices_lie_on_a_tenth_of_a_pixel(scale: float) -> None:
    """At a scale that is not a whole number (a 0.5 µm/px model on a 0.499 µm/px Aperio
    slide) the vertices take one decimal, not two, and the text writes no more; the outlines
    stay valid and within the tolerance of the sub-pixel outline on the same grid."""
    lab = random_ellipses(3)
    polys = trace_tile(lab, (1000, 2000), scale).polygons
    coords = shapely.get_coordinates(polys)
    assert np.all(np.abs(coords * 10 - np.round(coords * 10)) < 1e-6) and shapely.is_valid(polys).all()
    assert re.search(r"\d\.\d\d", ",".join(feature_bodies(polys, {}))) is None
    full = trace_tile(lab, (1000, 2000), scale, tolerance=0).polygons
    assert shapely.hausdorff_distance(polys, full, densify=0.1).max() <= SIMPLIFY_TOLERANCE * scale + 1e-9


def test_origin_shift_is_subtracted() -> None:
    lab = np.zeros((4, 4), np.int32)
    lab[1, 2] = 9
    [(value, poly)] = by_value(trace_tile(lab, (10, 20), 2.0, origin_shift=(100.0, 7.0))).items()
    assert value == 9
    assert poly.bounds == (44 - 100, 22 - 7, 46 - 100, 24 - 7)


def test_non_integer_scale_snaps_to_qupath_grid() -> None:
    lab = synthetic_labels()
    for value, poly in by_value(trace_tile(lab, (1000, 2000), 1.9771)).items():
        assert on_grid(poly) and poly.is_valid
        assert abs(poly.area - (lab == value).sum() * 1.9771**2) < 0.25 * 1.9771 * poly.length


def test_split_instance_keeps_largest_part_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    lab = np.zeros((8, 8), np.int32)
    lab[1:4, 1:4] = 3
    lab[6, 6] = 3  # violates the 4-connected contract
    lab[4, 4] = 5
    lab[5, 5] = 5  # diagonal neighbours only: two 4-connected parts
    with caplog.at_level(logging.WARNING):
        polys = by_value(trace_tile(lab, (0, 0), 1.0))
    assert polys[3].is_valid and polys[3].bounds == (1, 1, 4, 4)
    assert polys[5].is_valid and polys[5].area == 0.5  # one pixel's midpoint diamond
    assert "traced to several polygons, the largest kept (ids 3, 5)" in caplog.text


def test_invalid_polygon_is_repaired_to_largest_valid_part(caplog: pytest.LogCaptureFixture) -> None:
    bow_tie = Polygon([(0, 0), (4, 4), (4, 0), (0, 4)])  # self-intersecting: QuPath 0.6 rejects it
    with caplog.at_level(logging.WARNING):
        fixed = _clean(bow_tie, 7)
    assert fixed.is_valid and fixed.geom_type == "Polygon" and fixed.area == 4.0
    assert "nucleus 7" in caplog.text



def test_a_crop_without_labels_has_no_outlines() -> None:
    outlines = trace_tile(np.zeros((5, 5), np.int32), (0, 0), 1.0)
    assert len(outlines.values) == len(outlines.polygons) == len(outlines.pixels) == 0
    assert outlines.bbox.shape == (0, 4)


def test_pieces_warn_once_for_nuclei_only(caplog: pytest.LogCaptureFixture) -> None:
    """Two labels in two pieces each: the largest piece is traced; for nuclei (against the
    watershed contract) one warning per crop, for cells (a neighbour's cell between the
    pieces is normal) nothing at warning level."""
    labels = np.zeros((20, 30), np.int32)
    labels[2:8, 2:8] = 1
    labels[12:14, 2:4] = 1  # a small second piece
    labels[2:6, 20:24] = 2
    labels[10:18, 20:28] = 2  # the larger piece of label 2
    with caplog.at_level(logging.DEBUG, logger="pipeline.writers.outlines"):
        nuclei = trace_tile(labels, (0, 0), 1.0)
        cells = trace_tile(labels, (0, 0), 1.0, pieces_expected=True)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "2 object(s) traced to several polygons" in warnings[0].getMessage()
    assert any(r.levelno == logging.DEBUG and "several polygons" in r.getMessage() for r in caplog.records)
    for outlines in (nuclei, cells):
        assert list(outlines.values) == [1, 2]
        assert outlines.polygons[0].area == pytest.approx(36, abs=4)  # the 6 x 6 piece
        assert outlines.polygons[1].area == pytest.approx(64, abs=5)  # the 8 x 8 piece
