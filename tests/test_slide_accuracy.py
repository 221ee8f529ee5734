"""Slide-level accuracy: MoNuSeg test images laid on a pyramidal TIFF at irregular offsets
(OpenSlide opens it as generic-tiff, mpp from its resolution tags), segmented by the whole
pipeline and scored against the assembled truth, must score like tile-level evaluation.

Two slides: the mosaic at 40x (0.25 um/px) segmented by the 40x model, and the same
mosaic box-downsampled to 20x (0.5 um/px, what a 20x scan of the same tissue holds)
segmented by the 20x model. Tile-level evaluation of the 20x model downsamples each tile
the same way, so both sides see the same pixels up to the box grid's phase; labels are
scored at native (40x) resolution on both sides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from models import checkpoints
from models.data import downsample_image
from models.evaluate import evaluate_folder, upsample_labels
from models.metrics import aji
from pipeline.pyramid_tiff import write_pyramidal_tiff
from pipeline.run import process_slide
from pipeline.slide_run.config import RunConfig
from pipeline.slide_run.executors import SerialExecutor
from pipeline.synthetic import monuseg_mosaic

NAMES = ["TCGA-2Z-A9J9-01A-01-TS1", "TCGA-44-2665-01B-06-BS6", "TCGA-A6-6782-01A-01-BS1"]
TILE = 1000  # MoNuSeg tiles are 1000 x 1000 px at 40x


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize(("model", "factor"), [("dense.pt", 1), ("dense20x.pt", 2)],
                         ids=["40x", "20x"])
def test_slide_aji_matches_tile_level(tmp_path: Path, monuseg: Path, model: str, factor: int) -> None:
    folder = monuseg / "test"
    bundle = checkpoints.load(model)
    assert bundle.mpp == pytest.approx(0.25 * factor)
    rgb, truth, placements = monuseg_mosaic(folder, seed=5, canvas=(2300, 2300), names=NAMES)
    assert len(placements) == len(NAMES)
    slide = write_pyramidal_tiff(tmp_path / "mosaic.tif", downsample_image(rgb, factor),
                                 mpp=0.25 * factor, compression="zlib")
    cfg = RunConfig(model=model, out=str(tmp_path / "out"), tile_size=1024)
    outcome = process_slide(slide, cfg, SerialExecutor())
    assert outcome.status == "done", outcome.error
    store = zarr.open_group(str(Path(outcome.out_dir) / "nuclei.zarr"), mode="r")
    labels = upsample_labels(store["labels/nuclei/s0"][...], factor, truth.shape)

    slide_aji = []
    for _name, y, x in placements:
        t = truth[y:y + TILE, x:x + TILE].astype(np.int64)
        slide_aji.append(aji(t, labels[y:y + TILE, x:x + TILE].astype(np.int64)))
    tile_level = evaluate_folder(bundle, folder, names=[p[0] for p in placements], progress=False)
    by_name = {row["name"]: row["aji"] for row in tile_level["per_image"]}
    tile_aji = [by_name[name] for name, _, _ in placements]
    assert abs(np.mean(slide_aji) - np.mean(tile_aji)) <= 0.02, (slide_aji, tile_aji)
