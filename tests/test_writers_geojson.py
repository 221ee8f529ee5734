"""QuPath GeoJSON: pixel-edge polygons with exact areas, valid geometry on the 0.01 grid,
deterministic ids, streaming + atomic writer (plain and gzip)."""

from __future__ import annotations

import gzip
import json
import logging
import uuid
from pathlib import Path

import geojson
import numpy as np
import pytest
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon, shape

from pipeline.writers.geojson import GeoJSONWriter, label_polygons, nucleus_feature, nucleus_uuid
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


def _write(path: Path, lab: np.ndarray, scale: float, slide: str = "slide-A") -> int:
    table = instance_measurements(lab, np.full(lab.shape, 0.75, np.float32), (3, 5), scale, 0.5)
    rows = {int(r["id"]): r for r in table.to_dict("records")}
    with GeoJSONWriter(path) as out:
        for value, poly in label_polygons(lab, (3, 5), scale):
            out.write(nucleus_feature(slide, value, poly, rows[value]))
    return out.count


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_polygon_area_is_pixel_count_times_scale_squared(scale: float) -> None:
    lab = synthetic_labels()
    polys = dict(label_polygons(lab, (3, 5), scale))
    assert sorted(polys) == list(range(1, 9))
    for value, poly in polys.items():
        assert isinstance(poly, Polygon) and poly.is_valid
        assert poly.area == (lab == value).sum() * scale**2
        ys, xs = np.nonzero(lab == value)
        # pixel edges in level-0 px: model pixel (r, c) covers [c*s, (c+1)*s) x [r*s, (r+1)*s)
        assert poly.bounds == ((xs.min() + 5) * scale, (ys.min() + 3) * scale,
                               (xs.max() + 6) * scale, (ys.max() + 4) * scale)


def test_polygons_align_with_table_rows() -> None:
    lab = synthetic_labels()
    table = instance_measurements(lab, np.ones(lab.shape), (0, 0), 2.0, None)
    polys = list(label_polygons(lab, (0, 0), 2.0))
    assert [v for v, _ in polys] == table["id"].tolist()
    for (_, poly), area, cx in zip(polys, table["area_px"], table["centroid_x_px"]):
        assert poly.area == area
        # table centroids use the pixel-index convention: continuous x - 0.5 (the
        # centroid of a geometry carrying a 0.01 precision grid is itself snapped)
        assert poly.centroid.x - 0.5 == pytest.approx(cx, abs=0.005)


def test_origin_shift_is_subtracted() -> None:
    lab = np.zeros((4, 4), np.int32)
    lab[1, 2] = 9
    [(value, poly)] = list(label_polygons(lab, (10, 20), 2.0, origin_shift=(100.0, 7.0)))
    assert value == 9
    assert poly.bounds == (44 - 100, 22 - 7, 46 - 100, 24 - 7)


def test_non_integer_scale_snaps_to_qupath_grid() -> None:
    lab = synthetic_labels()
    for value, poly in label_polygons(lab, (1000, 2000), 1.9771):
        coords = shapely.get_coordinates(poly)
        np.testing.assert_allclose(coords * 100, np.round(coords * 100), atol=1e-6)
        assert poly.is_valid
        assert abs(poly.area - (lab == value).sum() * 1.9771**2) < 0.05 * poly.length


def test_split_instance_keeps_largest_part_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    lab = np.zeros((8, 8), np.int32)
    lab[1:4, 1:4] = 3
    lab[6, 6] = 3  # violates the 4-connected contract
    lab[4, 4] = 5
    lab[5, 5] = 5  # diagonal neighbours only: two 4-connected parts
    with caplog.at_level(logging.WARNING):
        polys = dict(label_polygons(lab, (0, 0), 1.0))
    assert polys[3].area == 9 and polys[3].is_valid
    assert polys[5].area == 1
    assert "keeping the largest" in caplog.text


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
    ids = [f["id"] for f in feats]
    assert len(set(ids)) == len(ids)
    for f in feats:
        assert uuid.UUID(f["id"]).version == 5
        geom = shape(f["geometry"])
        assert geom.geom_type == "Polygon" and geom.is_valid
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus"
        assert len(props["classification"]["color"]) == 3
        meas = props["measurements"]
        assert all(isinstance(v, float) and np.isfinite(v) for v in meas.values())
        nid = int(meas["Nucleus id"])
        assert f["id"] == nucleus_uuid("slide-A", nid)
        assert geom.area == (lab == nid).sum() * 4.0
        assert meas["Area px^2"] == geom.area
        assert meas["Area µm^2"] == pytest.approx(geom.area * 0.25)
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
    other = json.loads((tmp_path / "a.geojson").read_text())
    _write(tmp_path / "c.geojson", lab, 1.0, slide="slide-B")
    assert not {f["id"] for f in other["features"]} & {
        f["id"] for f in json.loads((tmp_path / "c.geojson").read_text())["features"]}


def test_non_finite_measurements_are_dropped() -> None:
    poly = Polygon([(0, 0), (1, 0), (1, 1), (0, 1)])
    feat = nucleus_feature("s", 4, poly, {"area_um2": float("nan"), "solidity": np.float32(1.0),
                                          "perimeter_um": float("inf"), "note": "text"})
    assert feat["properties"]["measurements"] == {"Solidity": 1.0, "Nucleus id": 4.0}
    json.dumps(feat, allow_nan=False)
    with pytest.raises(ValueError, match="color"):
        nucleus_feature("s", 4, poly, {}, classification={"name": "Nucleus"})


def test_interrupted_writer_leaves_no_file(tmp_path: Path) -> None:
    lab = synthetic_labels()
    for name in ("x.geojson", "x.geojson.gz"):
        path = tmp_path / name
        with pytest.raises(RuntimeError, match="boom"), GeoJSONWriter(path) as out:
            for value, poly in label_polygons(lab, (0, 0), 1.0):
                out.write(nucleus_feature("s", value, poly, {}))
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
