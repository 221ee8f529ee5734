"""Nuclei only where tissue is: nuclei centred off the tissue mask (debris on the glass)
are dropped by default, counted, kept with ``keep_outside_tissue``; tiling stays exact."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from pipeline.run import process_slide
from pipeline.slide.memory import MemorySlide
from pipeline.slide.open import register_memory_slide
from pipeline.slide_run.config import RunConfig
from pipeline.slide_run.executors import SerialExecutor
from pipeline.synthetic import synthetic_he
from pipeline.tissue import TissueMask, keep_in_tissue
from pipeline.types import Box

MODEL = "pruned80.pt"


def test_keep_in_tissue_drops_and_renumbers() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, :4] = True  # tissue on the left; 8 level-0 px per mask px
    tissue = TissueMask(mask, 8.0)
    labels = np.zeros((40, 80), np.int32)
    labels[2:6, 2:6] = 1  # left: kept
    labels[2:6, 60:64] = 2  # right, off the tissue (and its dilation): dropped
    labels[20:24, 30:34] = 3  # centre x ~ 31.5 level px at scale 1: mask px 3 -> kept
    out, dropped = keep_in_tissue(labels, (0, 0), 1.0, tissue)
    assert dropped == 1
    assert out[3, 3] == 1 and out[3, 61] == 0 and out[21, 31] == 2
    assert int(out.max()) == 2
    # the offset and scale place the crop: shifted right by 40 px everything is off tissue
    assert keep_in_tissue(labels, (0, 40), 1.0, tissue)[1] == 3


def test_cropped_mask_answers_like_the_whole_mask() -> None:
    rng = np.random.default_rng(0)
    tissue = TissueMask(rng.random((60, 80)) < 0.3, 16.0)
    box = Box(200, 300, 700, 900)
    part = pickle.loads(pickle.dumps(tissue.crop(box)))
    assert part.mask.shape == (36, 43)  # the box (32 x 38 mask px) and 2 px around it
    y = rng.uniform(box.y0, box.y1, 2000)
    x = rng.uniform(box.x0, box.x1, 2000)
    assert (part.contains(y, x) == tissue.contains(y, x)).all()
    assert part.covers(Box(300, 400, 340, 440)) == tissue.covers(Box(300, 400, 340, 440))


def _debris_slide() -> np.ndarray:
    """Tissue on the left; on the right, bare glass with a few isolated dark blobs
    (nucleus-sized debris, far too small to count as tissue)."""
    rgb, _ = synthetic_he(512, 512, seed=4, mpp=0.25, tissue_fraction=1.0)
    image = np.full((512, 1024, 3), 243, np.uint8)
    image[:, :512] = rgb
    yy, xx = np.mgrid[:512, :1024]
    for cy, cx in ((100, 800), (260, 700), (400, 900), (150, 950), (380, 650), (60, 620),
                   (470, 760), (250, 860), (320, 980)):
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9 ** 2
        image[blob] = (120, 60, 150)
    return image


@pytest.mark.slow
def test_debris_off_tissue_is_dropped_and_counted(tmp_path: Path) -> None:
    path = register_memory_slide(MemorySlide(_debris_slide(), mpp=0.25, name="debris"))

    def run(out: str, tile: int, **kw) -> tuple[dict, np.ndarray, pd.DataFrame]:
        cfg = RunConfig(model=MODEL, out=str(tmp_path / out), tile_size=tile, chunk=256, **kw)
        outcome = process_slide(path, cfg, SerialExecutor())
        assert outcome.status == "done", outcome.error
        folder = Path(outcome.out_dir)
        labels = zarr.open_group(str(folder / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]
        return (json.loads((folder / "summary.json").read_text()), labels,
                pd.read_parquet(folder / "nuclei.parquet"))

    kept, kept_labels, kept_table = run("all", 256, keep_outside_tissue=True)
    on_glass = (kept_table["centroid_x_px"] > 560).sum()
    assert on_glass >= 3, "the model should find the debris blobs (the test needs them)"
    assert kept["nuclei_outside_tissue_dropped"] == 0

    dropped, labels, table = run("tissue", 256)
    assert dropped["nuclei_outside_tissue_dropped"] >= on_glass
    assert dropped["nuclei"] == kept["nuclei"] - dropped["nuclei_outside_tissue_dropped"]
    assert (table["centroid_x_px"] > 560).sum() == 0
    assert dropped["label_pixel_collisions"] == 0 and dropped["giant_clusters"] == []
    assert len(np.unique(labels[labels > 0])) == dropped["nuclei"] == len(table)
    assert sorted(table["id"]) == list(range(1, len(table) + 1))

    other, other_labels, _ = run("tissue-128", 128)  # the filter does not depend on tiling
    assert other["nuclei"] == dropped["nuclei"]
    assert ((other_labels > 0) == (labels > 0)).all()
