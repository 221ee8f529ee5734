"""Whole-slide overviews (preview, tissue mask) read in bounded chunks, even from a slide
with a single huge level."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline.overview import READ_CHUNK, slide_overview
from pipeline.slide.memory import MemorySlide
from pipeline.slide.open import register_memory_slide, unregister_memory_slide
from pipeline.tissue import full_mask
from pipeline.types import Box


def _single_level_slide(height: int, width: int) -> tuple[MemorySlide, list[Box]]:
    """A procedural slide with only level 0 (like a flat 60k x 80k TIFF) that records reads."""
    reads: list[Box] = []

    def pixels(level: int, box: Box) -> np.ndarray:
        reads.append(box)
        y = np.arange(box.y0, box.y1)[:, None, None]
        x = np.arange(box.x0, box.x1)[None, :, None]
        return np.broadcast_to(((y // 1000 + x // 1000) % 2) * 60 + 150,
                               (box.height, box.width, 3)).astype(np.uint8)

    slide = MemorySlide.procedural(height, width, 0.5, pixels, name=f"flat-{height}x{width}")
    slide.info = dataclasses.replace(slide.info, levels=slide.info.levels[:1])
    return slide, reads


def test_overview_of_a_single_level_slide_reads_in_chunks() -> None:
    slide, reads = _single_level_slide(9000, 12000)
    rgb, per_px = slide_overview(slide, 2048)
    assert max(rgb.shape[:2]) <= 2048 and rgb.dtype == np.uint8
    assert max(b.height * b.width for b in reads) <= READ_CHUNK ** 2
    assert sum(b.height * b.width for b in reads) == 9000 * 12000  # each pixel read once
    # box averaging keeps the checkerboard where it is (1000 level-0 px squares)
    y, x = int(1500 / per_px), int(500 / per_px)
    assert rgb[y, x, 0] == 210 and rgb[int(500 / per_px), x, 0] == 150


@pytest.mark.parametrize("shape", [(700, 900), (300, 5000)])
def test_overview_size(shape: tuple[int, int]) -> None:
    slide, _ = _single_level_slide(*shape)
    rgb, per_px = slide_overview(slide, 512)
    assert max(rgb.shape[:2]) <= 512
    assert rgb.shape[:2] == (-(-shape[0] // int(per_px)), -(-shape[1] // int(per_px)))


def test_preview_of_a_single_level_slide_reads_in_chunks(tmp_path: Path) -> None:
    from pipeline.slide_run.outputs import _write_preview
    from pipeline.writers.labels import create_store

    slide, reads = _single_level_slide(9000, 12000)
    path = register_memory_slide(slide)
    try:
        store = create_store(tmp_path / "n.zarr", (9000, 12000), 1024, 0.5)
        job = SimpleNamespace(path=path, mpp_override=None, store=store,
                              tissue=full_mask(slide.info), out_dir=str(tmp_path))
        _write_preview(job, tmp_path / "preview.png", None)  # no overview yet: read here
    finally:
        unregister_memory_slide(path)
    assert max(b.height * b.width for b in reads) <= READ_CHUNK ** 2
    with Image.open(tmp_path / "preview.png") as im:
        assert max(im.size) <= 2048


@pytest.mark.parametrize("f", [2, 3, 7])
def test_box_mean_averages_each_block_and_partial_edges(f: int) -> None:
    """Every output pixel is the mean of the input pixels of its block, edge blocks with
    fewer pixels included (the strided integer sums must not drop or double a pixel)."""
    from pipeline.overview import box_mean

    rgb = np.random.default_rng(f).integers(0, 256, (5 * f + 2, 4 * f + 1, 3), dtype=np.uint8)
    out = box_mean(rgb, f)
    assert out.shape == (6, 5, 3) and out.dtype == np.float32
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = rgb[i * f:(i + 1) * f, j * f:(j + 1) * f].reshape(-1, 3).astype(np.float64)
            np.testing.assert_allclose(out[i, j], block.mean(axis=0), rtol=1e-6)
