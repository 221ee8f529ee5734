"""End to end: slide → pipeline → outputs, checked by re-reading them with the libraries
users use, and the stitching guarantee with the real network."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely.geometry
import torch
import zarr
from scipy import ndimage as ndi

from models import checkpoints
from models.inference import predict_image
from models.watershed import postprocess
from pipeline.label_sampling import CONNECTIVITY
from pipeline.measure.intensity import INTENSITY_NAMES, stain_intensities
from pipeline.measure.stain import StainVectors, normalise_stains
from pipeline.run import process_slide
from pipeline.slide.memory import MemorySlide
from pipeline.slide.open import register_memory_slide
from pipeline.slide_run.config import RunConfig
from pipeline.slide_run.executors import SerialExecutor
from pipeline.synthetic import synthetic_he

MODEL = "pruned80.pt"  # the shipped default; exactness does not depend on the weights


@pytest.fixture(scope="module")
def bundle() -> Iterator[checkpoints.ModelBundle]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield checkpoints.load(MODEL, fold_bn=True)  # the network the pipeline runs
    torch.set_num_threads(before)  # later modules (test_distributed) compare on one thread


@pytest.fixture(scope="module")
def slide_image() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_he(600, 700, seed=11, mpp=0.25)


def _run(tmp: Path, rgb: np.ndarray, tile: int, **kw) -> tuple[Path, object]:
    path = register_memory_slide(MemorySlide(rgb, mpp=0.25, name=f"synthetic-{tile}"))
    cfg = RunConfig(model=MODEL, out=str(tmp), tile_size=tile, chunk=256, tissue_mask=False, **kw)
    outcome = process_slide(path, cfg, SerialExecutor())
    assert outcome.status == "done", outcome.error
    return Path(outcome.out_dir), outcome


def _labels(out: Path) -> np.ndarray:
    return zarr.open_group(str(out / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]


def _same_partition(a: np.ndarray, b: np.ndarray) -> None:
    assert ((a > 0) == (b > 0)).all(), f"{int(((a > 0) != (b > 0)).sum())} pixels differ"
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def _geopandas_reads(path: Path, table: pd.DataFrame) -> None:
    """What a GIS user does: geopandas (through GDAL's GeoJSON driver) reads every feature,
    valid, with its nested measurements, and µm in the names survives as UTF-8."""
    geopandas = pytest.importorskip("geopandas")
    frame = geopandas.read_file(f"/vsigzip/{path}")
    assert len(frame) == len(table) and frame.geometry.is_valid.all()
    assert (frame.geom_type == "Polygon").all()
    measurements = frame["measurements"].map(lambda m: json.loads(m) if isinstance(m, str) else m)
    assert sorted(int(m["Nucleus id"]) for m in measurements) == sorted(table["id"].tolist())
    assert all("Area µm^2" in m for m in measurements)


@pytest.mark.slow
@pytest.mark.parametrize("tile", [128, 256, 400])
def test_tiled_pipeline_equals_whole_image(tmp_path: Path, bundle, slide_image, tile: int) -> None:
    rgb, _ = slide_image
    prob, dist = predict_image(bundle.net, rgb)
    whole = postprocess(prob, dist, bundle.watershed)
    out, outcome = _run(tmp_path, rgb, tile)
    labels = _labels(out)
    assert whole.max() > 100
    _same_partition(labels.astype(np.int64), whole.astype(np.int64))
    assert outcome.nuclei == whole.max()
    # each nucleus's stain intensities, measured in its tile, equal the whole image's
    stains = StainVectors.from_dict(json.loads((out / "summary.json").read_text())["stain_vectors"])
    fg = labels > 0
    pairs = np.unique(np.stack([whole[fg].astype(np.int64), labels[fg].astype(np.int64)]), axis=1)[::-1]
    expected = stain_intensities(whole, rgb, stains, pairs[1])
    table = pd.read_parquet(out / "nuclei.parquet").set_index("id").loc[pairs[0]]
    assert np.isfinite(table[list(INTENSITY_NAMES)].to_numpy()).all()
    for name in INTENSITY_NAMES:
        np.testing.assert_allclose(table[name].to_numpy(), expected[name], rtol=1e-9, atol=1e-12,
                                   err_msg=name)


@pytest.mark.slow
def test_stain_normalised_run_equals_whole_image_inference_on_the_normalised_image(
        tmp_path: Path, bundle, slide_image) -> None:
    """--stain-normalise: the network sees every window (tiles, grown clusters) re-rendered
    with the slide's vectors, a per-pixel map with per-slide constants, so tiling stays
    exact; intensities are still measured on the slide's own pixels."""
    rgb, _ = slide_image
    out, outcome = _run(tmp_path, rgb, 128, stain_normalise=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fingerprint"]["settings"]["stain_normalise"] is True
    stains = StainVectors.from_dict(summary["stain_vectors"])
    assert stains.source == "estimated"
    normalised = normalise_stains(rgb, stains)
    assert (np.abs(normalised.astype(int) - rgb) > 2).any(axis=-1).mean() > 0.5  # colours moved
    whole = postprocess(*predict_image(bundle.net, normalised), bundle.watershed)
    raw = postprocess(*predict_image(bundle.net, rgb), bundle.watershed)
    assert ((whole > 0) != (raw > 0)).sum() > 100  # so the run's labels tell which it saw
    labels = _labels(out)
    _same_partition(labels.astype(np.int64), whole.astype(np.int64))
    assert outcome.nuclei == whole.max()
    fg = labels > 0
    pairs = np.unique(np.stack([whole[fg].astype(np.int64), labels[fg].astype(np.int64)]), axis=1)[::-1]
    expected = stain_intensities(whole, rgb, stains, pairs[1])
    table = pd.read_parquet(out / "nuclei.parquet").set_index("id").loc[pairs[0]]
    for name in INTENSITY_NAMES:
        np.testing.assert_allclose(table[name].to_numpy(), expected[name], rtol=1e-9, atol=1e-12,
                                   err_msg=name)


@pytest.mark.slow
def test_outputs_agree_and_are_readable(tmp_path: Path, slide_image) -> None:
    rgb, truth = slide_image
    out, outcome = _run(tmp_path, rgb, 256, gzip=True)
    labels = _labels(out)
    ids = np.unique(labels[labels > 0])
    assert len(ids) == outcome.nuclei == len(set(ids.tolist()))

    table = pd.read_parquet(out / "nuclei.parquet")
    assert len(table) == outcome.nuclei
    assert sorted(table["id"].tolist()) == ids.tolist()
    areas = np.bincount(labels.ravel())[table["id"].to_numpy().astype(int)]
    assert np.allclose(table["area_px"], areas)

    with gzip.open(out / "nuclei.geojson.gz", "rt") as f:
        collection = json.load(f)
    features = collection["features"]
    assert collection["type"] == "FeatureCollection" and len(features) == outcome.nuclei
    by_id = dict(zip(table["id"].tolist(), areas.tolist()))
    ratios = []
    for feature in features:
        geometry = shapely.geometry.shape(feature["geometry"])
        assert geometry.is_valid and feature["properties"]["objectType"] == "detection"
        nucleus = int(feature["properties"]["measurements"]["Nucleus id"])
        # smoothed sub-pixel outlines: within a few % of the pixels' area, over that nucleus
        ratios.append(geometry.area / by_id[nucleus])
        point = geometry.representative_point()
        assert labels[int(point.y), int(point.x)] == nucleus
    assert 0.5 <= min(ratios) and max(ratios) <= 1.03 and np.mean(np.abs(np.subtract(ratios, 1))) < 0.03
    _geopandas_reads(out / "nuclei.geojson.gz", table)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["nuclei"] == outcome.nuclei
    assert (out / "preview.png").exists() and not (out / ".work").exists()


@pytest.mark.slow
def test_rerun_skips_a_finished_slide(tmp_path: Path, slide_image) -> None:
    """(Resuming an interrupted run: tests/test_resume.py.)"""
    rgb, _ = slide_image
    out, first = _run(tmp_path, rgb, 256)
    before = _labels(out)
    _, again = _run(tmp_path, rgb, 256)
    assert again.skipped and again.nuclei == first.nuclei and again.note == ""
    assert (_labels(out) == before).all()


@pytest.mark.slow
@pytest.mark.parametrize(("mpp", "size"), [(0.5, (300, 350)), (0.3, (500, 580))])
def test_model_finer_than_the_slide_keeps_each_nucleus_whole(tmp_path: Path, mpp: float,
                                                             size: tuple[int, int]) -> None:
    """Slides coarser than the 0.25 µm/px model (scale 0.5 and 0.83): level 0 skips model
    rows and columns, and nearest sampling alone split a nucleus on each of these slides;
    each must be one 4-connected piece, with the table's id, inside the table's box."""
    rgb, _ = synthetic_he(*size, seed=11, mpp=mpp)
    out, outcome = _run(tmp_path, rgb, 256, mpp=mpp)
    assert json.loads((out / "summary.json").read_text())["scale"] == pytest.approx(0.25 / mpp)
    labels = _labels(out).astype(np.int64)
    ids = np.unique(labels[labels > 0])
    table = pd.read_parquet(out / "nuclei.parquet").set_index("id")
    assert outcome.nuclei > 50 and len(ids) == outcome.nuclei == len(table)
    assert sorted(table.index.tolist()) == ids.tolist()
    structure = ndi.generate_binary_structure(2, CONNECTIVITY)
    objects = ndi.find_objects(labels)
    for nucleus in ids.tolist():
        sl = objects[nucleus - 1]
        assert ndi.label(labels[sl] == nucleus, structure)[1] == 1, f"nucleus {nucleus} is split"
        row = table.loc[nucleus]
        assert row.bbox_y0 <= sl[0].start and sl[0].stop <= row.bbox_y1
        assert row.bbox_x0 <= sl[1].start and sl[1].stop <= row.bbox_x1


class _ReversedExecutor(SerialExecutor):
    """Runs each batch of tasks last first: the two parallel parts of phase 3 in the other order."""

    def map(self, fn, items):  # type: ignore[no-untyped-def]
        return reversed(list(super().map(fn, list(items))))


def test_output_parts_do_not_depend_on_their_order(tmp_path: Path, slide_image) -> None:
    """``write_layers`` and ``write_nuclei`` run in parallel on a cluster: either order
    gives the same files, byte for byte (the preview and the GeoJSON included)."""
    rgb, _ = slide_image
    outs = []
    for name, executor in [("forward", SerialExecutor()), ("reversed", _ReversedExecutor())]:
        path = register_memory_slide(MemorySlide(rgb, mpp=0.25, name="order"))
        cfg = RunConfig(model=MODEL, out=str(tmp_path / name), tile_size=256, chunk=256,
                        tissue_mask=False)
        outcome = process_slide(path, cfg, executor)
        assert outcome.status == "done", outcome.error
        outs.append(Path(outcome.out_dir))
    for rel in ("nuclei.geojson", "nuclei.parquet", "preview.png"):
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    assert np.array_equal(_labels(outs[0]), _labels(outs[1]))


@pytest.mark.slow
def test_giant_clusters_make_the_slide_partial(tmp_path: Path, monkeypatch, caplog, capsys) -> None:
    """Foreground clusters too large for any window (here: a tiny MAX_WINDOW) are not
    segmented: the user is told with a WARNING, the slide is ``partial`` with the clusters'
    level-0 boxes in summary.json, and the run exits 1 (it said ``done``, exit 0, and only
    an INFO line on a worker); a re-run reuses every tile and says the same."""
    import logging

    import pipeline.stitch.grown as grown
    from pipeline.cli import main
    from pipeline.pyramid_tiff import write_pyramidal_tiff

    monkeypatch.setattr(grown, "MAX_WINDOW", 360)  # giant side 72 model pixels (pruned80)
    rgb, _ = synthetic_he(400, 460, seed=5, mpp=0.25)
    slide = write_pyramidal_tiff(tmp_path / "giants.tif", rgb, mpp=0.25)
    args = ["run", str(slide), "--model", MODEL, "--out", str(tmp_path / "out"), "--tile-size", "128",
            "--cluster", "none", "--no-tissue-mask", "--device", "cpu"]
    with caplog.at_level(logging.WARNING):
        assert main(args) == 1
    assert "partial" in capsys.readouterr().out
    assert any(r.levelno == logging.WARNING and "giant" in r.getMessage() for r in caplog.records)
    summary = json.loads((tmp_path / "out" / "giants" / "summary.json").read_text())
    assert summary["status"] == "partial" and summary["unreadable_regions"] == []
    giants = summary["giant_clusters"]
    assert giants and all(0 <= y0 < y1 <= 400 and 0 <= x0 < x1 <= 460 for y0, x0, y1, x1 in giants)
    assert main(args) == 1
    again = json.loads((tmp_path / "out" / "giants" / "summary.json").read_text())
    assert again["giant_clusters"] == giants and again["tiles_from_cache"] == again["tiles_processed"]


@pytest.mark.slow
@pytest.mark.parametrize("tile, constrain", [(128, 1.5), (400, None)])
def test_cells_do_not_depend_on_the_tiles(tmp_path: Path, bundle, slide_image, tile: int,
                                          constrain: float | None, monkeypatch) -> None:
    """``--cell-expansion``: the stored cells equal the whole image's nuclei grown at once,
    each cell carries its nucleus's id, and the outputs hold QuPath cells. Cells are made
    in the tile tasks and in phase 1b (there in groups of nearby cells, or with 400 px
    tiles all of a tile's on one box)."""
    import pipeline.slide_run.cells as cell_phase
    from pipeline.measure.cells import expand_nuclei
    from pipeline.writers.cells import CELL_COLUMNS

    if tile == 400:
        monkeypatch.setattr(cell_phase, "GROUPED", 0)

    rgb, _ = slide_image
    prob, dist = predict_image(bundle.net, rgb)
    whole = postprocess(prob, dist, bundle.watershed)
    out, outcome = _run(tmp_path, rgb, tile, cell_expansion=2.5, cell_constrain_scale=constrain)
    group = zarr.open_group(str(out / "nuclei.zarr"), mode="r")
    nuclei, cells = group["labels/nuclei/s0"][...], group["labels/cells/s0"][...]
    expected = expand_nuclei(whole, 2.5 / 0.25, constrain)  # the model works at 0.25 µm/px here
    assert (cells > 0).sum() > 1.5 * (nuclei > 0).sum()
    _same_partition(cells.astype(np.int64), expected.astype(np.int64))
    assert (cells[nuclei > 0] == nuclei[nuclei > 0]).all()  # a cell's id is its nucleus's
    table = pd.read_parquet(out / "nuclei.parquet").set_index("id")
    assert set(CELL_COLUMNS) <= set(table.columns) and len(table) == outcome.nuclei
    cell_px = np.bincount(cells.ravel())[table.index.to_numpy()]
    assert np.allclose(table["Cell: Area µm^2"] / 0.25**2, cell_px, rtol=0.1)
    ratio = table["Nucleus/Cell area ratio"]
    assert ((ratio > 0) & (ratio <= 1)).all()
    collection = json.loads((out / "nuclei.geojson").read_text())
    assert len(collection["features"]) == outcome.nuclei
    for feature in collection["features"][:50]:
        props = feature["properties"]
        assert props["objectType"] == "cell"
        cell = shapely.geometry.shape(feature["geometry"])
        nucleus = shapely.geometry.shape(feature["nucleusGeometry"])
        assert cell.is_valid and nucleus.is_valid and cell.buffer(1).contains(nucleus)
        m = props["measurements"]
        for name in ("Nucleus: Area µm^2", "Cell: Area µm^2", "Cell: Hematoxylin: Mean",
                     "Nucleus: Eosin: Median", "Nucleus/Cell area ratio", "Detection probability"):
            assert name in m, name
        assert labels_at(cells, nucleus) == int(m["Nucleus id"])
    made = json.loads((out / "summary.json").read_text())["cells"]
    assert made["made_in_tile_tasks"] + made["made_in_phase_1b"] == outcome.nuclei
    assert made["made_in_tile_tasks"] > 0 and made["made_in_phase_1b"] > 0  # both paths ran


@pytest.mark.slow
def test_cells_of_tile_tasks_and_phase_1b_measure_the_same(tmp_path: Path, slide_image) -> None:
    """Small tiles (cells made in the tile tasks where every neighbour is known, the rest in
    phase 1b, the two merged per tile) give every cell the same measurements, in the
    same table row as its nucleus, as one tile holding the whole image (every cell made
    in its tile task). The stain vectors are set: their estimate samples tile centres."""
    from pipeline.writers.cells import CELL_COLUMNS
    from pipeline.writers.table import MEASUREMENT_COLUMNS

    rgb, _ = slide_image
    tables, made = [], []
    for tile in (128, 704):
        out, _ = _run(tmp_path / str(tile), rgb, tile, cell_expansion=2.5, cell_constrain_scale=1.5,
                      stain_vectors="default")
        table = pd.read_parquet(out / "nuclei.parquet")
        tables.append(table.sort_values(["centroid_y_px", "centroid_x_px"]).reset_index(drop=True))
        made.append(json.loads((out / "summary.json").read_text())["cells"])
    assert made[0]["made_in_phase_1b"] > 0 and made[0]["made_in_tile_tasks"] > made[0]["made_in_phase_1b"]
    assert made[1]["made_in_phase_1b"] == 0
    tiled, whole = tables
    assert len(tiled) == len(whole)
    for name in ("centroid_y_px", "centroid_x_px", *MEASUREMENT_COLUMNS, *CELL_COLUMNS):
        np.testing.assert_allclose(tiled[name].to_numpy(), whole[name].to_numpy(), rtol=1e-9,
                                   atol=1e-9, equal_nan=True, err_msg=name)


def labels_at(labels: np.ndarray, polygon) -> int:
    point = polygon.representative_point()
    return int(labels[int(point.y), int(point.x)])
