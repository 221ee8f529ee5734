"""The preview PNG at whole-slide scale: density heat map when nuclei are too small to
outline, scale bar, and a full-resolution detail panel of the densest region."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.writers.preview as preview
from pipeline.slide.memory import MemorySlide
from pipeline.tissue import TissueMask
from pipeline.types import Box
from pipeline.writers.colours import NUCLEUS_RGB, TISSUE_RGB
from pipeline.writers.labels import build_pyramid, create_store, write_block
from pipeline.writers.preview import (
    DETAIL_RGB,
    GAP,
    TEXT_RGB,
    TITLE,
    Density,
    Detail,
    densest_window,
    density_map,
    labels_thumbnail,
    make_preview,
    nice_length,
    write_preview,
)
from pipeline.writers.table import instance_measurements, write_table


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _is(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.all(img == rgb, axis=2)


def test_nice_scale_bar_lengths() -> None:
    assert [nice_length(v) for v in (730, 1000, 0.3, 19.9, 5.0)] == [500, 1000, 0.2, 10, 5]
    with pytest.raises(ValueError):
        nice_length(0)


def test_density_cells_follow_the_pixel_index_convention() -> None:
    """Level-0 pixel p spans [p - 0.5, p + 0.5): a cell of 10 px holds centroids in
    [10c - 0.5, 10c + 9.5); centroids off the grid are dropped."""
    xy = np.array([[-0.5, 0.0], [9.49, 0.0], [9.5, 0.0], [25.0, 19.0], [25.0, 19.6], [99.0, 5.0]])
    counts = density_map(xy, (3, 4), 10.0)
    expected = np.zeros((3, 4), int)
    expected[0, 0], expected[0, 1], expected[1, 2], expected[2, 2] = 2, 1, 1, 1
    np.testing.assert_array_equal(counts, expected)


def test_densest_window() -> None:
    counts = np.zeros((20, 30), int)
    counts[2, 3] = 5
    counts[14:17, 25:28] = 2  # 18 in a 3 x 3 window
    assert densest_window(counts, 3) == (14, 25)
    assert densest_window(counts, 1) == (2, 3)
    assert densest_window(counts, 50) == (0, 0)  # larger than the grid: the whole grid


def test_heat_map_inside_tissue_and_scale_bar(tmp_path: Path) -> None:
    thumb = np.full((200, 300, 3), 235, np.uint8)
    tissue = np.zeros((200, 300), bool)
    tissue[20:180, 20:150] = True
    values = np.zeros((10, 15))
    values[2:8, 2:7] = 1000.0
    path = tmp_path / "p.png"
    write_preview(path, thumb, np.zeros((200, 300), np.int32), tissue, um_per_px=2.0,
                  density=Density(values, 20, "nuclei / mm²"))
    img = _png(path)
    assert img.shape == (200, 300, 3)  # no detail panel: the overview's size
    changed = np.any(img != 235, axis=2) & ~_is(img, TISSUE_RGB)
    assert changed[60:140, 60:120].all()  # heat inside the tissue
    assert not changed[20:125, 170:300].any()  # none outside it (the legend is below)
    assert _is(img[130:200, 120:300], TEXT_RGB).any()  # the legend
    assert not _is(img, NUCLEUS_RGB).any()  # no outlines in density mode
    # scale bar: 300 px / 5 * 2 µm = 120 µm -> 100 µm = 50 px, bottom left
    bar = _is(img[150:200, :100], TEXT_RGB)
    rows = np.nonzero(bar.sum(axis=1) == 50)[0]
    assert len(rows) >= 5
    path2 = tmp_path / "q.png"
    write_preview(path2, thumb, np.zeros((200, 300), np.int32), tissue)
    assert not (_is(_png(path2), TEXT_RGB).sum(axis=1) >= 50).any()  # no mpp, no bar


def test_detail_panel_with_outlines_and_box(tmp_path: Path) -> None:
    thumb = np.full((120, 160, 3), 200, np.uint8)
    detail_rgb = np.full((64, 80, 3), 180, np.uint8)
    labels = np.zeros((64, 80), np.int32)
    labels[10:20, 10:20] = 7
    path = tmp_path / "p.png"
    write_preview(path, thumb, np.zeros((120, 160), np.int32), None,
                  detail=Detail(detail_rgb, labels, (30.0, 40.0, 50.0, 70.0), 0.5))
    img = _png(path)
    assert img.shape == (TITLE + 120, 160 + GAP + 80, 3)
    panel = img[TITLE:TITLE + 64, 160 + GAP:]
    assert _is(panel[10:20, 10:20], NUCLEUS_RGB).sum() == 36  # the inner outline of a 10 x 10 box
    assert _is(panel[12:18, 12:18], (180, 180, 180)).all()
    box = _is(img[TITLE:TITLE + 120, :160], DETAIL_RGB)
    ys, xs = np.nonzero(box)
    assert (ys.min(), xs.min(), ys.max(), xs.max()) == (30, 40, 49, 69)


def _disc_slide(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pink slide with dark discs of radius 5 px: sparse everywhere, dense in a corner."""
    rng = np.random.default_rng(0)
    rgb = np.full((side, side, 3), (230, 170, 200), np.uint8)
    labels = np.zeros((side, side), np.int32)
    yy, xx = np.mgrid[:side, :side]
    centres = [tuple(rng.integers(20, side - 20, 2)) for _ in range(15)]
    centres += [(y, x) for y in range(side - 180, side - 20, 14) for x in range(side - 180, side - 20, 14)]
    for i, (y, x) in enumerate(centres, start=1):
        disc = ((yy - y) ** 2 + (xx - x) ** 2 <= 25) & (labels == 0)
        labels[disc] = i
        rgb[disc] = (90, 60, 140)
    return rgb, labels


def test_make_preview_of_a_slide_with_small_nuclei(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nuclei ~10 level-0 px across on a 1024 px slide shown 128 px wide: a density map, and
    a full-resolution detail of the dense corner whose pixels are the slide's."""
    monkeypatch.setattr(preview, "PREVIEW_SIDE", 128)
    monkeypatch.setattr(preview, "DETAIL_SIDE", 128)
    side, mpp = 1024, 0.5
    rgb, labels = _disc_slide(side)
    store = create_store(tmp_path / "nuclei.zarr", (side, side), 256, mpp)
    for box in store.chunk_boxes():
        write_block(store, box, labels[box.slices()])
    table = instance_measurements(labels, np.ones(labels.shape, np.float32), (0, 0), 1.0, mpp)
    write_table(tmp_path, [table], store=store)
    tissue = TissueMask(np.ones((64, 64), bool), 16.0)
    path = tmp_path / "preview.png"
    make_preview(path, MemorySlide(rgb, mpp=mpp), store, tissue, tmp_path / "nuclei.parquet")
    img = _png(path)
    assert img.shape == (TITLE + 128, 128 + GAP + 128, 3)
    overview = img[TITLE:, :128]
    assert not _is(overview, NUCLEUS_RGB).any()  # density, not outlines, at 8 px per pixel
    box = _is(overview, DETAIL_RGB)
    ys, xs = np.nonzero(box)
    assert ys.min() * 8 >= side - 260 and xs.min() * 8 >= side - 260  # the dense corner
    detail = img[TITLE:TITLE + 128, 128 + GAP:]
    plain = ~_is(detail, NUCLEUS_RGB) & ~_is(detail, DETAIL_RGB)
    plain[:3], plain[-3:], plain[:, :3], plain[:, -3:] = False, False, False, False
    plain[-45:, :100] = False  # the scale bar
    assert plain.sum() > 8000
    # the detail is the slide's own pixels (0.5 µm/px is level 0), where the box says
    # (the box is drawn on the overview's 8 px grid, so within 8 px)
    origins = [(y, x) for y in range(ys.min() * 8 - 8, ys.min() * 8 + 9)
               for x in range(xs.min() * 8 - 8, xs.min() * 8 + 9)
               if y + 128 <= side and x + 128 <= side
               and (detail[plain] == rgb[y:y + 128, x:x + 128][plain]).all()]
    assert len(origins) == 1
    assert _is(detail, NUCLEUS_RGB).sum() > 300  # outlines of the dense corner's nuclei


def test_overview_outlines_when_nuclei_are_large_enough(tmp_path: Path) -> None:
    rgb, labels = _disc_slide(256)
    store = create_store(tmp_path / "nuclei.zarr", (256, 256), 256, 0.5)
    write_block(store, Box(0, 0, 256, 256), labels)
    table = instance_measurements(labels, np.ones(labels.shape, np.float32), (0, 0), 1.0, 0.5)
    write_table(tmp_path, [table], store=store)
    path = tmp_path / "preview.png"
    make_preview(path, MemorySlide(rgb, mpp=0.5), store, TissueMask(np.ones((16, 16), bool), 16.0),
                 tmp_path / "nuclei.parquet")
    img = _png(path)
    assert img.shape == (256, 256, 3)  # the overview is the slide itself: no detail panel
    assert _is(img, NUCLEUS_RGB).sum() > 1000


def test_labels_thumbnail_is_strided_sample(tmp_path: Path) -> None:
    """Label values are sampled, never averaged, from a level at least the thumbnail's
    size; at the full size the thumbnail is the label image itself."""
    lab = np.kron(np.arange(12, dtype=np.uint32).reshape(3, 4) + 70_000, np.ones((23, 25), np.uint32))
    lab[5, 7] = 3  # one odd pixel
    spec = create_store(tmp_path / "n.zarr", lab.shape, 16, 0.5)
    write_block(spec, Box(0, 0, *lab.shape), lab)
    build_pyramid(spec)
    thumb = labels_thumbnail(spec, (17, 22))
    assert thumb.shape == (17, 22)
    assert set(np.unique(thumb)) <= set(np.unique(lab))
    np.testing.assert_array_equal(labels_thumbnail(spec, lab.shape), lab)


def test_preview_from_the_image_level_it_would_make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where level 0 of the root image is over PREVIEW_SIDE (at most twice: IMAGE_SIDE),
    the run's preview reads level 1 instead of averaging level 0 by 2: the same PNG."""
    from pipeline.slide_run.outputs import _preview_level
    from pipeline.writers.labels import read_image, write_image

    monkeypatch.setattr(preview, "PREVIEW_SIDE", 128)
    rgb, labels = _disc_slide(256)
    rgb[:, 128:] //= 2  # no uniform 2 x 2 blocks: averaging matters
    store = create_store(tmp_path / "nuclei.zarr", (256, 256), 64, 0.5)
    write_block(store, Box(0, 0, 256, 256), labels)
    build_pyramid(store)
    write_table(tmp_path, [instance_measurements(labels, np.ones(labels.shape, np.float32), (0, 0),
                                                 1.0, 0.5)], store=store)
    tissue = TissueMask(np.ones((16, 16), bool), 16.0)
    write_image(store, rgb[:200, :250], 1.0)
    assert _preview_level(store) == 1
    pngs = []
    for level in (0, 1):
        path = tmp_path / f"preview{level}.png"
        make_preview(path, MemorySlide(rgb, mpp=0.5), store, tissue, tmp_path / "nuclei.parquet",
                     read_image(store, level))
        pngs.append(path.read_bytes())
    assert pngs[0] == pngs[1]
    write_image(store, rgb[:128, :100], 1.0)  # fits the preview as it is
    assert _preview_level(store) == 0
