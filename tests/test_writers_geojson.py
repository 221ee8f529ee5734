"""QuPath GeoJSON: one smoothed outline per label (traced like rasterio's pixel edges,
areas within a few % of the pixel count, within the simplification tolerance of the
sub-pixel outline, holes kept), valid geometry on a 0.1 px grid (QuPath's is 0.01),
measurements at their precision, bytes per nucleus, deterministic ids, vectorised feature
text equal to the dict API, streaming + atomic writer (plain and gzip)."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import geojson
import numpy as np
import pytest
import rasterio.features
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon, shape
from skimage.measure import label

from pipeline.writers.geojson import (
    AREA_SLACK,
    SIMPLIFY_TOLERANCE,
    GeoJSONWriter,
    _trace,
    feature_bodies,
    feature_texts,
    label_polygons,
    nucleus_feature,
    shift_bodies,
    tile_polygons,
    trace_tile,
)
from pipeline.writers.table import instance_measurements


def synthetic_labels(h: int = 60, w: int = 80) -> np.ndarray:
    """Discs, touching discs, a C shape, border instances and a 1-px instance (int32)."""
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((h, w), np.int32)

    def disc(cy: float, cx: float, r: float) -> np.ndarray:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    lab[disc(12, 12, 7)] = 1
    left = disc(35, 15, 6)
    lab[left] = 2
    lab[disc(35, 27, 6) & ~left] = 3
    lab[5:25, 40:44] = 4
    lab[5:9, 40:55] = 4
    lab[21:25, 40:55] = 4
    lab[0:4, w - 8:w] = 5
    lab[h - 4:h, 0:5] = 6
    lab[h - 6:h, 50:60] = 7
    lab[45, 70] = 8
    for v in range(1, 9):
        assert ndi.label(lab == v)[1] == 1
    return lab


def _write(path: Path, lab: np.ndarray, scale: float) -> int:
    table = instance_measurements(lab, np.full(lab.shape, 0.75, np.float32), (3, 5), scale, 0.5)
    rows = {int(r["id"]): r for r in table.to_dict("records")}
    with GeoJSONWriter(path) as out:
        for value, poly in label_polygons(lab, (3, 5), scale):
            out.write(nucleus_feature(value, poly, rows[value]))
    return out.count


def _on_grid(geom: shapely.Geometry) -> bool:
    coords = shapely.get_coordinates(geom) * 100
    return bool(np.all(np.abs(coords - np.round(coords)) < 1e-6))


def random_ellipses(seed: int, n: int = 60, size: int = 400) -> np.ndarray:
    """Non-overlapping filled ellipses, 8-40 px long axis, axis ratio 0.5-1, any angle:
    the shapes and sizes of nuclei at 0.25-0.5 µm/px."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    k = 0
    for _ in range(n):
        d, ratio, angle = rng.uniform(8, 40), rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)
        cy, cx = rng.uniform(25, size - 25, 2)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
        mask = (u / (d / 2)) ** 2 + (v / (d * ratio / 2)) ** 2 <= 1
        if not lab[mask].any():
            k += 1
            lab[mask] = k
    return lab


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_one_valid_outline_per_label_inside_its_pixels(scale: float) -> None:
    lab = synthetic_labels()
    polys = dict(label_polygons(lab, (3, 5), scale))
    assert sorted(polys) == list(range(1, 9))
    for value, poly in polys.items():
        assert isinstance(poly, Polygon) and poly.is_valid and not poly.is_empty
        assert poly.exterior.is_ccw and _on_grid(poly)
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
    values, polys = tile_polygons(lab, (0, 0), 1.0)
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
        _, polys = tile_polygons(lab, (7, 3), scale)
        _, full = tile_polygons(lab, (7, 3), scale, tolerance=0)
        assert shapely.is_valid(polys).all() and all(_on_grid(p) for p in polys)
        assert (shapely.get_num_interior_rings(polys) == shapely.get_num_interior_rings(full)).all()
        distance = shapely.hausdorff_distance(polys, full, densify=0.1) / scale
        assert distance.max() <= SIMPLIFY_TOLERANCE + 1e-9
        assert (np.abs(shapely.area(polys) / shapely.area(full) - 1) <= AREA_SLACK).all()
    # lean: a nucleus of 8-40 px needs ~15 vertices (Douglas-Peucker at 0.35 px kept ~24)
    assert shapely.get_num_coordinates(tile_polygons(random_ellipses(1), (0, 0), scale)[1]).mean() - 1 < 17


def _tile_features(side: int, mpp: float, scale: float) -> tuple[list[str], np.ndarray, np.ndarray]:
    """GeoJSON feature texts of a synthetic tile at ``mpp`` (ids 1..n; a noisy probability
    map, so mean probabilities have all their decimals), its outlines and label areas (px)."""
    from pipeline.synthetic import synthetic_region_labels
    from pipeline.types import Box

    region = synthetic_region_labels(Box(0, 0, side, side), seed=5, mpp=mpp)
    lab = np.unique(region, return_inverse=True)[1].reshape(side, side).astype(np.int32)
    rng = np.random.default_rng(0)
    prob = np.where(lab > 0, rng.uniform(0.5, 1.0, lab.shape), rng.uniform(0.0, 0.5, lab.shape))
    outlines = trace_tile(lab, (0, 0), scale)
    table = instance_measurements(lab, prob.astype(np.float32), (0, 0), scale, 0.25, outlines=outlines)
    bodies = feature_bodies(outlines.polygons, {k: table[k].to_numpy() for k in table})
    texts = feature_texts(table["id"].tolist(), bodies)
    return texts, outlines.polygons, outlines.pixels * scale**2


@pytest.mark.parametrize(("side", "mpp", "scale", "most_bytes", "area_range"),
                         [(512, 0.25, 1.0, 560, (0.97, 1.02)), (256, 0.5, 2.0, 430, (0.95, 1.02))])
def test_geojson_bytes_per_nucleus_and_area_agreement(side: int, mpp: float, scale: float, most_bytes: int,
                                                      area_range: tuple[float, float]) -> None:
    """The same slide region as a 40x model (scale 1) and a 20x model (scale 2) sees it:
    bytes per nucleus of the GeoJSON (features and their separators; 807 / 589 on this
    tile with 0.35 px outlines and full-precision measurements, 548 / 420 without feature
    ids and with UTF-8 µ), with outlines whose area
    stays close to the label's (5th / 95th percentile within ``area_range``)."""
    texts, polys, label_area = _tile_features(side, mpp, scale)
    assert len(texts) > 100
    assert sum(len(t.encode()) + len(",\n") for t in texts) / len(texts) <= most_bytes
    ratio = shapely.area(polys) / label_area
    low, high = np.percentile(ratio, [5, 95])
    assert area_range[0] <= low and high <= area_range[1] and abs(np.median(ratio) - 1) < 0.01
    features = [json.loads(t) for t in texts]
    assert all(shape(f["geometry"]).is_valid and f["geometry"]["type"] == "Polygon" for f in features)


def test_measurements_are_written_with_their_precision() -> None:
    """Areas to 0.01 µm^2 (0.01 px^2 without an mpp), perimeter to 0.01 µm, ratios and the
    probability to 0.001, as the shortest text; "Area px^2" only where "Area µm^2" is
    missing; the dict API writes the same numbers. Non-finite values stay out."""
    poly = Polygon([(0, 0), (4, 0), (4, 3), (0, 3)])
    cols = {"area_px": [415.0, 390.88814440999995], "area_um2": [25.937512345, np.nan],
            "perimeter_um": [19.776750080582790, 19.7649], "eccentricity": [0.38140963919697835, 0.0004],
            "solidity": [0.974132863021752, 1.0], "mean_probability": [0.8999999761581421, np.inf]}
    texts = feature_texts([1, 2], feature_bodies([poly, poly], cols))
    first = ('"measurements":{"Area µm^2":25.94,"Perimeter µm":19.78,"Eccentricity":0.381,'
             '"Solidity":0.974,"Mean probability":0.9,"Nucleus id":1.0}')
    assert texts[0].endswith(first + "}}")
    second = json.loads(texts[1])["properties"]["measurements"]
    assert second == {"Area px^2": 390.89, "Perimeter µm": 19.76, "Eccentricity": 0.0, "Solidity": 1.0,
                      "Nucleus id": 2.0}
    for k, text in enumerate(texts):
        row = {key: values[k] for key, values in cols.items()}
        assert json.loads(text) == json.loads(json.dumps(nucleus_feature(k + 1, poly, row)))


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
    values, polys = tile_polygons(lab, (11, 3), scale)
    assert values.tolist() == np.unique(lab[lab > 0]).tolist()
    assert shapely.is_valid(polys).all() and (shapely.get_type_id(polys) == 3).all()
    assert all(_on_grid(p) and p.exterior.is_ccw for p in polys)
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
    values, polys = tile_polygons(lab, (0, 0), 2.0)
    assert values.tolist() == [1, 2, 3, 4, 2**32 - 5]
    assert all(isinstance(p, Polygon) and p.is_valid and p.area > 0 and _on_grid(p) for p in polys)
    assert len(polys[-1].interiors) == 1
    assert polys[-1].area == pytest.approx(96 * 4, rel=0.05)
    # the pixel-edge fallback: a degenerate smoothed outline gives the pixel square
    _, [square] = tile_polygons(lab[:3, :3], (0, 0), 1.0, tolerance=5.0)
    assert square.is_valid and square.area == 1.0


def test_polygons_align_with_table_rows() -> None:
    lab = synthetic_labels()
    table = instance_measurements(lab, np.ones(lab.shape), (0, 0), 2.0, 0.25)
    values, polys = tile_polygons(lab, (0, 0), 2.0)
    assert values.tolist() == table["id"].tolist()
    np.testing.assert_allclose(table["perimeter_um"], shapely.length(polys) * 0.25)
    hull = shapely.convex_hull(polys)
    np.testing.assert_allclose(table["solidity"], shapely.area(polys) / shapely.area(hull))
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
    _, polys = tile_polygons(lab, (1000, 2000), scale)
    coords = shapely.get_coordinates(polys)
    assert np.all(np.abs(coords * 10 - np.round(coords * 10)) < 1e-6) and shapely.is_valid(polys).all()
    assert re.search(r"\d\.\d\d", ",".join(feature_bodies(polys, {}))) is None
    _, full = tile_polygons(lab, (1000, 2000), scale, tolerance=0)
    assert shapely.hausdorff_distance(polys, full, densify=0.1).max() <= SIMPLIFY_TOLERANCE * scale + 1e-9


def test_origin_shift_is_subtracted() -> None:
    lab = np.zeros((4, 4), np.int32)
    lab[1, 2] = 9
    [(value, poly)] = list(label_polygons(lab, (10, 20), 2.0, origin_shift=(100.0, 7.0)))
    assert value == 9
    assert poly.bounds == (44 - 100, 22 - 7, 46 - 100, 24 - 7)


def test_non_integer_scale_snaps_to_qupath_grid() -> None:
    lab = synthetic_labels()
    for value, poly in label_polygons(lab, (1000, 2000), 1.9771):
        assert _on_grid(poly) and poly.is_valid
        assert abs(poly.area - (lab == value).sum() * 1.9771**2) < 0.25 * 1.9771 * poly.length


def test_split_instance_keeps_largest_part_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    lab = np.zeros((8, 8), np.int32)
    lab[1:4, 1:4] = 3
    lab[6, 6] = 3  # violates the 4-connected contract
    lab[4, 4] = 5
    lab[5, 5] = 5  # diagonal neighbours only: two 4-connected parts
    with caplog.at_level(logging.WARNING):
        polys = dict(label_polygons(lab, (0, 0), 1.0))
    assert polys[3].is_valid and polys[3].bounds == (1, 1, 4, 4)
    assert polys[5].is_valid and polys[5].area == 0.5  # one pixel's midpoint diamond
    assert "keeping the largest" in caplog.text


def test_feature_text_equals_the_dict_api() -> None:
    lab = synthetic_labels()
    table = instance_measurements(lab, np.full(lab.shape, 0.75), (3, 5), 2.0, None)
    table.loc[2, "solidity"] = np.inf  # dropped like NaN
    values, polys = tile_polygons(lab, (3, 5), 2.0)
    columns = {k: table[k].to_numpy() for k in table}
    bodies = feature_bodies(polys, columns)
    assert all("\n" not in b for b in bodies)
    ids = (values + 1000).tolist()
    texts = feature_texts(ids, bodies)
    for text, nid, poly, row in zip(texts, ids, polys, table.to_dict("records")):
        expected = nucleus_feature(nid, poly, {k: v for k, v in row.items() if k != "id"})
        assert json.loads(text) == json.loads(json.dumps(expected))
        assert "Area µm^2" not in text and "u00b5" not in text  # no mpp: NaN µm columns are left out


@pytest.mark.parametrize("scale", [1.0, 1.9771])
def test_shift_bodies_equals_shifting_on_the_worker(scale: float) -> None:
    lab = synthetic_labels()
    cols = {"eccentricity": np.zeros(8)}
    plain = feature_bodies(tile_polygons(lab, (3, 5), scale)[1], cols)
    shifted = feature_bodies(tile_polygons(lab, (3, 5), scale, origin_shift=(100.0, 7.0))[1], cols)
    assert shift_bodies(plain, 100.0, 7.0) == shifted
    assert shift_bodies(plain, 0.0, 0.0) == plain


def test_write_texts_mixes_with_write(tmp_path: Path) -> None:
    lab = synthetic_labels()
    values, polys = tile_polygons(lab, (0, 0), 1.0)
    texts = feature_texts(values.tolist(), feature_bodies(polys, {}))
    for name in ("m.geojson", "m.geojson.gz"):
        with GeoJSONWriter(tmp_path / name) as out:
            out.write_texts(texts[:3])
            out.write_texts([])
            out.write(nucleus_feature(99, polys[0], {}))
            out.write_texts(texts[3:])
        assert out.count == len(values) + 1
    with open(tmp_path / "m.geojson", encoding="utf-8") as fh:
        fc = geojson.load(fh)
    with gzip.open(tmp_path / "m.geojson.gz", "rt", encoding="utf-8") as fh:
        assert json.load(fh) == json.loads(json.dumps(fc))
    assert fc.is_valid and len(fc["features"]) == len(values) + 1


def test_featurecollection_round_trip_plain_and_gzip(tmp_path: Path) -> None:
    lab = synthetic_labels()
    n_plain = _write(tmp_path / "nuclei.geojson", lab, 2.0)
    n_gz = _write(tmp_path / "nuclei.geojson.gz", lab, 2.0)
    assert n_plain == n_gz == 8
    with open(tmp_path / "nuclei.geojson", encoding="utf-8") as fh:
        fc = geojson.load(fh)
    with gzip.open(tmp_path / "nuclei.geojson.gz", "rt", encoding="utf-8") as fh:
        assert json.load(fh) == json.loads(json.dumps(fc))
    assert fc["type"] == "FeatureCollection" and fc.is_valid
    feats = fc["features"]
    assert len(feats) == len(np.unique(lab)) - 1
    assert sorted(int(f["properties"]["measurements"]["Nucleus id"]) for f in feats) == list(range(1, 9))
    for f in feats:
        assert "id" not in f  # QuPath gives each object its own UUID; "Nucleus id" links to the labels
        geom = shape(f["geometry"])
        assert geom.geom_type == "Polygon" and geom.is_valid
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus"
        assert len(props["classification"]["color"]) == 3
        meas = props["measurements"]
        assert all(isinstance(v, float) and np.isfinite(v) for v in meas.values())
        nid = int(meas["Nucleus id"])
        area_px = (lab == nid).sum() * 4.0
        assert 0.5 * area_px <= geom.area <= area_px
        assert _on_grid(geom) and shapely.is_ccw(geom.exterior)
        assert meas["Area µm^2"] == round(area_px * 0.25, 2) and "Area px^2" not in meas  # calibrated
        assert meas["Mean probability"] == 0.75
        assert {"Solidity", "Eccentricity", "Perimeter µm"} <= set(meas)
        assert not any(k.startswith(("centroid", "bbox")) for k in meas)


def test_output_is_deterministic(tmp_path: Path) -> None:
    lab = synthetic_labels()
    for name in ("a.geojson.gz", "b.geojson.gz", "a.geojson", "b.geojson"):
        _write(tmp_path / name, lab, 1.0)
    assert (tmp_path / "a.geojson.gz").read_bytes() == (tmp_path / "b.geojson.gz").read_bytes()
    assert (tmp_path / "a.geojson.gz").read_bytes()[4:8] == bytes(4)  # no gzip timestamp
    assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()
    text = (tmp_path / "a.geojson").read_bytes()
    assert "µm".encode() in text and b"\\u00b5" not in text  # UTF-8, as RFC 8259 and QuPath read it


def test_non_finite_measurements_are_dropped() -> None:
    poly = Polygon([(0, 0), (1, 0), (1, 1), (0, 1)])
    feat = nucleus_feature(4, poly, {"area_um2": float("nan"), "solidity": np.float32(1.0),
                                          "perimeter_um": float("inf"), "note": "text"})
    assert feat["properties"]["measurements"] == {"Solidity": 1.0, "Nucleus id": 4.0}
    json.dumps(feat, allow_nan=False)
    with pytest.raises(ValueError, match="color"):
        nucleus_feature(4, poly, {}, classification={"name": "Nucleus"})


def test_interrupted_writer_leaves_no_file(tmp_path: Path) -> None:
    lab = synthetic_labels()
    for name in ("x.geojson", "x.geojson.gz"):
        path = tmp_path / name
        with pytest.raises(RuntimeError, match="boom"), GeoJSONWriter(path) as out:
            for value, poly in label_polygons(lab, (0, 0), 1.0):
                out.write(nucleus_feature(value, poly, {}))
                if out.count == 3:
                    raise RuntimeError("boom")
        assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary leftovers either
    # an existing complete file survives a failed rewrite
    _write(tmp_path / "keep.geojson", lab, 1.0)
    before = (tmp_path / "keep.geojson").read_bytes()
    with pytest.raises(KeyError), GeoJSONWriter(tmp_path / "keep.geojson") as out:
        raise KeyError("x")
    assert (tmp_path / "keep.geojson").read_bytes() == before


def test_empty_collection_and_bad_names(tmp_path: Path) -> None:
    with GeoJSONWriter(tmp_path / "empty.geojson") as out:
        assert out.add == out.write
    assert json.loads((tmp_path / "empty.geojson").read_text()) == {
        "type": "FeatureCollection", "features": []}
    with pytest.raises(ValueError):
        GeoJSONWriter(tmp_path / "x.txt")
    with pytest.raises(ValueError):
        GeoJSONWriter(tmp_path / "x.geojson", gzip=True)
    assert list(label_polygons(np.zeros((5, 5), np.int32), (0, 0), 1.0)) == []


def test_invalid_polygon_is_repaired_to_largest_valid_part(caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.writers.geojson import _clean

    bow_tie = Polygon([(0, 0), (4, 4), (4, 0), (0, 4)])  # self-intersecting: QuPath 0.6 rejects it
    with caplog.at_level(logging.WARNING):
        fixed = _clean(bow_tie, 7)
    assert fixed.is_valid and fixed.geom_type == "Polygon" and fixed.area == 4.0
    assert "nucleus 7" in caplog.text


def test_worker_text_and_finalize_splice(tmp_path: Path) -> None:
    """The tile file stores each nucleus's text, traced on the worker with the slide's
    origin shift; the single writer splices the global id in: the features equal the dict
    API's."""
    from types import SimpleNamespace

    from pipeline.slide_run.tile_file import save_tile, tile_nuclei
    from pipeline.types import Box
    from pipeline.writers.geojson import feature_texts

    lab = synthetic_labels()
    prob = np.full(lab.shape, 0.5, np.float32)
    job = SimpleNamespace(plan=SimpleNamespace(scale=2.0), slide_mpp=0.25, origin_shift=(100.0, 7.0),
                          work_dir=str(tmp_path))
    result = SimpleNamespace(labels=lab, prob=prob, extent=Box(3, 5, 3 + lab.shape[0], 5 + lab.shape[1]),
                             count=8, recomputed=0, truncated=0, giants=())
    save_tile(job, SimpleNamespace(index=4), result, 0.1)
    values, polys = tile_polygons(lab, (3, 5), 2.0, origin_shift=(100.0, 7.0))
    cols, bodies = tile_nuclei(str(tmp_path), 4)
    cols["id"] = cols["id"].astype(np.uint64) + np.uint64(1000)
    with GeoJSONWriter(tmp_path / "out.geojson") as out:
        out.write_texts(feature_texts(cols["id"].tolist(), bodies))
    features = json.loads((tmp_path / "out.geojson").read_text())["features"]
    assert len(features) == 8
    for feat, value, poly in zip(features, values, polys):
        row = {k: v[value - 1] for k, v in cols.items() if k != "id"}
        expected = nucleus_feature(1000 + int(value), poly, row)
        assert feat == json.loads(json.dumps(expected))
