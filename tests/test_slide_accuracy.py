"""Slide-level accuracy: MoNuSeg test images laid on a pyramidal TIFF at irregular offsets
(OpenSlide opens it as generic-tiff, mpp from its resolution tags), segmented by the whole
pipeline and scored against the assembled truth, must score like tile-level evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from models import checkpoints
from models.evaluate import evaluate_folder
from models.metrics import aji
from pipeline.pyramid_tiff import write_pyramidal_tiff
from pipeline.run import RunConfig, SerialExecutor, process_slide
from pipeline.synthetic import monuseg_mosaic

NAMES = ["TCGA-2Z-A9J9-01A-01-TS1", "TCGA-44-2665-01B-06-BS6", "TCGA-A6-6782-01A-01-BS1"]


@pytest.mark.slow
@pytest.mark.shared_data
def test_slide_aji_matches_tile_level(tmp_path: Path, monuseg: Path) -> None:
    folder = monuseg / "test"
    rgb, truth, placements = monuseg_mosaic(folder, seed=5, canvas=(2300, 2300), names=NAMES)
    assert len(placements) == len(NAMES)
    slide = write_pyramidal_tiff(tmp_path / "mosaic.tif", rgb, mpp=0.25, compression="zlib")
    cfg = RunConfig(model="dense.pt", out=str(tmp_path / "out"), tile_size=1024)
    outcome = process_slide(slide, cfg, SerialExecutor())
    assert outcome.status == "done", outcome.error
    labels = zarr.open_group(str(Path(outcome.out_dir) / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]

    slide_aji = []
    for _name, y, x in placements:
        t = truth[y:y + 1000, x:x + 1000].astype(np.int64)
        slide_aji.append(aji(t, labels[y:y + 1000, x:x + 1000].astype(np.int64)))
    tile_level = evaluate_folder(checkpoints.load("dense.pt"), folder, names=[p[0] for p in placements],
                                 progress=False)
    tile_aji = [row["aji"] for row in tile_level["per_image"]]
    assert abs(np.mean(slide_aji) - np.mean(tile_aji)) <= 0.02, (slide_aji, tile_aji)
