"""QuPath GeoJSON (``pipeline.writers.features`` and ``geojson``): measurements at their
precision, bytes per nucleus, vectorised feature text equal to the dict API, the worker's
text spliced by the single writer, streaming + atomic writer (plain and gzip)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import geojson
import numpy as np
import pytest
import shapely
from label_shapes import on_grid, synthetic_labels
from shapely.geometry import Polygon, shape

from pipeline.writers.features import feature_bodies, feature_texts, nucleus_feature
from pipeline.writers.geojson import GeoJSONWriter
from pipeline.writers.outlines import TileOutlines, trace_tile
from pipeline.writers.table import instance_measurements


def _texts(lab: np.ndarray, offset: tuple[int, int], scale: float, mpp: float,
           prob: np.ndarray | float = 0.75) -> tuple[list[str], TileOutlines]:
    """The pipeline's path: outlines, measurements, feature bodies (the worker), ids
    spliced in (the writer); ids are the label values."""
    outlines = trace_tile(lab, offset, scale)
    table = instance_measurements(lab, np.broadcast_to(np.float32(prob), lab.shape), offset, scale, mpp,
                                  outlines=outlines)
    bodies = feature_bodies(outlines.polygons, {k: table[k].to_numpy() for k in table})
    return feature_texts(table["id"].tolist(), bodies), outlines


def _write(path: Path, lab: np.ndarray, scale: float) -> int:
    with GeoJSONWriter(path) as out:
        out.write_texts(_texts(lab, (3, 5), scale, 0.5)[0])
    return out.count


def _tile_features(side: int, mpp: float, scale: float) -> tuple[list[str], np.ndarray, np.ndarray]:
    """GeoJSON feature texts of a synthetic tile at ``mpp`` (ids 1..n; a noisy probability
    map, so mean probabilities have all their decimals), its outlines and label areas (px)."""
    from pipeline.synthetic import synthetic_region_labels
    from pipeline.types import Box

    region = synthetic_region_labels(Box(0, 0, side, side), seed=5, mpp=mpp)
    lab = np.unique(region, return_inverse=True)[1].reshape(side, side).astype(np.int32)
    rng = np.random.default_rng(0)
    prob = np.where(lab > 0, rng.uniform(0.5, 1.0, lab.shape), rng.uniform(0.0, 0.5, lab.shape))
    texts, outlines = _texts(lab, (0, 0), scale, 0.25, prob.astype(np.float32))
    return texts, outlines.polygons, outlines.pixels * scale**2


@pytest.mark.parametrize(("side", "mpp", "scale", "most_bytes", "area_range"),
                         [(512, 0.25, 1.0, 630, (0.97, 1.02)), (256, 0.5, 2.0, 500, (0.95, 1.02))])
def test_geojson_bytes_per_nucleus_and_area_agreement(side: int, mpp: float, scale: float, most_bytes: int,
                                                      area_range: tuple[float, float]) -> None:
    """The same slide region as a 40x model (scale 1) and a 20x model (scale 2) sees it:
    bytes per nucleus of the GeoJSON (features and their separators; 807 / 589 on this
    tile with 0.35 px outlines and full-precision measurements, 548 / 420 without feature
    ids and with UTF-8 µ, 618 / 490 with QuPath's six shape measurements), with outlines
    whose area
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
    """Areas to 0.01 µm^2, lengths to 0.01 µm, ratios and the probability to 0.001, as
    the shortest text; never "Area px^2" (QuPath derives it); the dict API writes the same
    numbers. Non-finite values stay out."""
    poly = Polygon([(0, 0), (4, 0), (4, 3), (0, 3)])
    cols = {"area_px": [415.0, 390.88814440999995], "Area µm^2": [25.937512345, np.nan],
            "Length µm": [19.776750080582790, 19.7649], "Circularity": [0.83311, 0.9],
            "Max diameter µm": [7.2149, 7.0], "Eccentricity": [0.38140963919697835, 0.0004],
            "Solidity": [0.974132863021752, 1.0], "Detection probability": [0.8999999761581421, np.inf]}
    texts = feature_texts([1, 2], feature_bodies([poly, poly], cols))
    first = ('"measurements":{"Area µm^2":25.94,"Length µm":19.78,"Circularity":0.833,'
             '"Max diameter µm":7.21,"Eccentricity":0.381,"Solidity":0.974,"Detection probability":0.9,'
             '"Nucleus id":1.0}')
    assert texts[0].endswith(first + "}}")
    second = json.loads(texts[1])["properties"]["measurements"]
    assert second == {"Length µm": 19.76, "Circularity": 0.9, "Max diameter µm": 7.0, "Eccentricity": 0.0,
                      "Solidity": 1.0, "Nucleus id": 2.0}
    for k, text in enumerate(texts):
        row = {key: values[k] for key, values in cols.items()}
        assert json.loads(text) == json.loads(json.dumps(nucleus_feature(k + 1, poly, row)))


def test_feature_text_equals_the_dict_api() -> None:
    lab = synthetic_labels()
    table = instance_measurements(lab, np.full(lab.shape, 0.75), (3, 5), 2.0, 0.25)
    table.loc[2, "Solidity"] = np.inf  # dropped like NaN
    outlines = trace_tile(lab, (3, 5), 2.0)
    values, polys = outlines.values, outlines.polygons
    columns = {k: table[k].to_numpy() for k in table}
    bodies = feature_bodies(polys, columns)
    assert all("\n" not in b for b in bodies)
    ids = (values + 1000).tolist()
    texts = feature_texts(ids, bodies)
    for text, nid, poly, row in zip(texts, ids, polys, table.to_dict("records")):
        expected = nucleus_feature(nid, poly, {k: v for k, v in row.items() if k != "id"})
        assert json.loads(text) == json.loads(json.dumps(expected))
        assert "Area µm^2" in text and "Area px^2" not in text and "u00b5" not in text


def test_write_texts_mixes_with_write(tmp_path: Path) -> None:
    lab = synthetic_labels()
    outlines = trace_tile(lab, (0, 0), 1.0)
    values, polys = outlines.values, outlines.polygons
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
        assert on_grid(geom) and shapely.is_ccw(geom.exterior)
        assert meas["Area µm^2"] == round(geom.area * 0.25, 2) and "Area px^2" not in meas  # calibrated
        assert meas["Detection probability"] == 0.75
        assert {"Area µm^2", "Length µm", "Circularity", "Solidity", "Max diameter µm", "Min diameter µm",
                "Eccentricity", "Detection probability", "Nucleus id"} == set(meas)
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
    feat = nucleus_feature(4, poly, {"Area µm^2": float("nan"), "Solidity": np.float32(1.0),
                                          "Length µm": float("inf"), "note": "text"})
    assert feat["properties"]["measurements"] == {"Solidity": 1.0, "Nucleus id": 4.0}
    json.dumps(feat, allow_nan=False)
    with pytest.raises(ValueError, match="color"):
        nucleus_feature(4, poly, {}, classification={"name": "Nucleus"})


def test_interrupted_writer_leaves_no_file(tmp_path: Path) -> None:
    lab = synthetic_labels()
    for name in ("x.geojson", "x.geojson.gz"):
        path = tmp_path / name
        with pytest.raises(RuntimeError, match="boom"), GeoJSONWriter(path) as out:
            for text in _texts(lab, (0, 0), 1.0, 0.5)[0]:
                out.write_texts([text])
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
        out.write_texts([])
    assert json.loads((tmp_path / "empty.geojson").read_text()) == {
        "type": "FeatureCollection", "features": []}
    with pytest.raises(ValueError):
        GeoJSONWriter(tmp_path / "x.txt")
    with pytest.raises(ValueError):
        GeoJSONWriter(tmp_path / "x.geojson", gzip=True)


def test_worker_text_and_finalize_splice(tmp_path: Path) -> None:
    """The tile file stores each nucleus's text, traced on the worker with the slide's
    origin shift; the single writer splices the global id in: the features equal the dict
    API's."""
    from types import SimpleNamespace

    from pipeline.slide_run.tile_file import save_tile, tile_nuclei
    from pipeline.types import Box

    lab = synthetic_labels()
    prob = np.full(lab.shape, 0.5, np.float32)
    job = SimpleNamespace(plan=SimpleNamespace(scale=2.0), slide_mpp=0.25, origin_shift=(100.0, 7.0),
                          work_dir=str(tmp_path), stains=None)
    result = SimpleNamespace(labels=lab, prob=prob, extent=Box(3, 5, 3 + lab.shape[0], 5 + lab.shape[1]),
                             count=8, recomputed=0, truncated=0, giants=())
    save_tile(job, SimpleNamespace(index=4), result, 0.1)
    outlines = trace_tile(lab, (3, 5), 2.0, origin_shift=(100.0, 7.0))
    values, polys = outlines.values, outlines.polygons
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
