"""End to end: slide → pipeline → outputs, checked by re-reading them with the libraries
users use, and the stitching guarantee with the real network."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely.geometry
import torch
import zarr

from models import checkpoints
from models.inference import predict_image
from models.watershed import postprocess
from pipeline.run import RunConfig, SerialExecutor, process_slide
from pipeline.slide import MemorySlide, register_memory_slide
from pipeline.synthetic import synthetic_he

MODEL = "pruned80.pt"  # the shipped default; exactness does not depend on the weights


@pytest.fixture(scope="module")
def bundle() -> checkpoints.ModelBundle:
    torch.set_num_threads(2)
    return checkpoints.load(MODEL, fold_bn=True)  # the network the pipeline runs


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
        # smoothed sub-pixel outlines: a little smaller than the pixels, over that nucleus
        ratios.append(geometry.area / by_id[nucleus])
        point = geometry.representative_point()
        assert labels[int(point.y), int(point.x)] == nucleus
    assert 0.5 <= min(ratios) and max(ratios) <= 1.0 and np.mean(np.abs(np.subtract(ratios, 1))) < 0.03
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["nuclei"] == outcome.nuclei
    assert (out / "preview.png").exists() and not (out / ".work").exists()


@pytest.mark.slow
def test_rerun_skips_and_resume_reuses_tiles(tmp_path: Path, slide_image) -> None:
    rgb, _ = slide_image
    out, first = _run(tmp_path, rgb, 256)
    before = _labels(out)
    _, again = _run(tmp_path, rgb, 256)
    assert again.skipped

    # an interrupted run: summary missing, some tile results cached
    (out / "summary.json").unlink()
    work = out / ".work"
    work.mkdir()
    path = register_memory_slide(MemorySlide(rgb, mpp=0.25, name="synthetic-256"))
    cfg = RunConfig(model=MODEL, out=str(tmp_path), tile_size=256, chunk=256, tissue_mask=False)
    from pipeline.run import TileJob, infer_tiles, prepare_slide, PrepareJob  # noqa: I001

    plan = prepare_slide(PrepareJob(path, None, MODEL, "cpu", False, 256, cfg.cluster_margin))
    infer_tiles(TileJob(path, None, MODEL, "cpu", plan.plan, plan.tiles[:2], str(work), plan.margin,
                        plan.multiple, 0.25))
    resumed = process_slide(path, cfg, SerialExecutor())
    assert resumed.status == "done" and resumed.counters["tiles_from_cache"] == 2
    assert (_labels(out) == before).all()
