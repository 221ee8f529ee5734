"""Synthetic H&E (truth consistency, box invariance), pyramidal TIFF writers (OpenSlide
generic-tiff with mpp, streamed tiles, OME-TIFF) and the MoNuSeg mosaic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage

import pipeline.synthetic as synthetic
from pipeline.pyramid_tiff import (
    downsample2,
    pyramid_shapes,
    write_ome_tiff,
    write_pyramidal_tiff,
    write_pyramidal_tiff_tiles,
)
from pipeline.slide.tiff_reader import ome_mpp
from pipeline.synthetic import (
    H_STAIN,
    monuseg_mosaic,
    synthetic_he,
    synthetic_region,
    synthetic_region_labels,
    synthetic_region_with_labels,
)
from pipeline.types import Box


def _tissue_share(rgb: np.ndarray) -> float:
    """Share of pixels darker than glass (summed optical density > 0.25)."""
    od = -np.log10(np.maximum(rgb.astype(np.float64), 1) / 255)
    return float((od.sum(axis=2) > 0.25).mean())


@pytest.fixture(scope="module")
def image() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_he(640, 768, seed=11)


def test_synthetic_he_is_deterministic_and_typed(image: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, labels = image
    assert rgb.shape == (640, 768, 3) and rgb.dtype == np.uint8
    assert labels.shape == (640, 768) and labels.dtype == np.uint32
    rgb2, labels2 = synthetic_he(640, 768, seed=11)
    assert np.array_equal(rgb, rgb2) and np.array_equal(labels, labels2)
    rgb3, _ = synthetic_he(640, 768, seed=12)
    assert not np.array_equal(rgb, rgb3)
    # consecutive ids 1..n
    ids = np.unique(labels)
    assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, len(ids)))


def test_nuclei_are_darker_and_more_haematoxylin(image: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, labels = image
    od = -np.log10(np.maximum(rgb.astype(np.float64), 1) / 255)
    nuc = labels > 0
    tissue = (~nuc) & (od.sum(axis=2) > 0.3)  # stroma, not glass
    assert nuc.mean() > 0.1 and tissue.mean() > 0.3
    assert rgb[nuc].mean() < rgb[tissue].mean() - 40
    h = od @ H_STAIN
    assert h[nuc].mean() > 1.5 * h[tissue].mean()
    # haematoxylin is blue-purple: blue channel brighter than green in nuclei
    assert rgb[nuc][:, 2].mean() > rgb[nuc][:, 1].mean()
    # white background outside the tissue exists (corners), but tissue covers most
    background = od.sum(axis=2) < 0.2
    assert 0.01 < background.mean() < 0.4


def test_nucleus_sizes_are_in_the_monuseg_range(image: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = image
    areas = np.bincount(labels.ravel())[1:]
    radius_um = np.sqrt(areas / np.pi) * 0.25
    assert 2.3 < np.median(radius_um) < 4.5
    assert radius_um.max() < 6.0 * np.sqrt(3) + 0.5


def test_touching_nuclei_and_border_nuclei(image: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = image
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        touch = (a > 0) & (b > 0) & (a != b)
        pairs |= {tuple(sorted(p)) for p in zip(a[touch].tolist(), b[touch].tolist())}
    assert len(pairs) >= 10
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    assert len(np.unique(border[border > 0])) >= 3


def test_every_nucleus_is_substantially_visible_and_connected() -> None:
    # box invariance means visibility is judged on whole ellipses; inside the image no
    # truth nucleus may be a sliver (30 % of an ellipse of radius >= 2.3 µm ~ 80 px)
    _, labels = synthetic_he(512, 512, seed=5)
    areas = np.bincount(labels.ravel())[1:]
    interior = np.unique(labels[40:-40, 40:-40])
    interior = interior[interior > 0]
    assert areas[interior - 1].min() >= 0.3 * np.pi * (2.3 / 0.25 / np.sqrt(3)) ** 2 * 0.9
    # each truth nucleus is one 4-connected region (slivers under a top nucleus dropped)
    for i, sl in enumerate(ndimage.find_objects(labels)):
        if sl is not None:
            assert ndimage.label(labels[sl] == i + 1)[1] == 1


def test_strip_rendering_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # synthetic_he renders per-pixel fields in row strips for speed; any strip height must
    # give the same image as one strip (all fields are functions of absolute coordinates)
    rgb, labels = synthetic_he(300, 260, seed=8)
    monkeypatch.setattr(synthetic, "STRIP_ROWS", 10_000)
    rgb1, labels1 = synthetic_he(300, 260, seed=8)
    monkeypatch.setattr(synthetic, "STRIP_ROWS", 7)
    rgb7, labels7 = synthetic_he(300, 260, seed=8)
    assert np.array_equal(rgb, rgb1) and np.array_equal(rgb, rgb7)
    assert np.array_equal(labels, labels1) and np.array_equal(labels, labels7)


def test_density_scales_the_number_of_nuclei() -> None:
    counts = {d: int(synthetic_he(384, 384, seed=6, density=d)[1].max()) for d in (0.0, 0.5, 1.0, 2.0)}
    assert counts[0.0] == 0
    assert counts[0.5] < 0.75 * counts[1.0] and counts[2.0] > 1.4 * counts[1.0]
    # the default is density 1.0, draw for draw
    assert np.array_equal(synthetic_he(128, 128, seed=6)[0], synthetic_he(128, 128, seed=6, density=1.0)[0])
    with pytest.raises(ValueError):
        synthetic_he(64, 64, seed=6, density=-1)
    with pytest.raises(ValueError):
        synthetic_he(64, 64, seed=6, tissue_fraction=1.5)


@pytest.mark.parametrize("fraction", [0.3, 0.75])
def test_tissue_fraction_is_honoured(fraction: float) -> None:
    rgb, labels = synthetic_he(384, 512, seed=2, tissue_fraction=fraction)
    assert abs(_tissue_share(rgb) - fraction) < 0.04
    od = -np.log10(np.maximum(rgb.astype(np.float64), 1) / 255).sum(axis=2)
    assert not labels[od < 0.2].any()  # no nuclei on glass


def test_tissue_fraction_extremes() -> None:
    rgb, labels = synthetic_he(256, 256, seed=2, tissue_fraction=0.0)
    assert labels.max() == 0 and _tissue_share(rgb) < 0.03 and rgb.mean() > 215
    rgb, labels = synthetic_he(256, 256, seed=2, tissue_fraction=1.0)
    assert labels.max() > 20 and _tissue_share(rgb) > 0.99


def test_region_knobs_keep_box_invariance() -> None:
    a, b = Box(-200, 300, 100, 600), Box(-50, 450, 250, 800)
    ov = a.intersect(b)
    kw = {"seed": 3, "density": 2.0, "tissue_fraction": 0.5}
    ra, la = synthetic_region_with_labels(a, **kw)
    rb, lb = synthetic_region_with_labels(b, **kw)
    assert np.array_equal(ra[ov.slices((a.y0, a.x0))], rb[ov.slices((b.y0, b.x0))])
    assert np.array_equal(la[ov.slices((a.y0, a.x0))], lb[ov.slices((b.y0, b.x0))])
    assert np.array_equal(ra, synthetic_region(a, **kw))
    assert np.array_equal(la, synthetic_region_labels(a, **kw))
    # tissue_fraction of the infinite slide: measured on a coarse sample of a large area
    ys = np.arange(0, 40_000, 5003)
    share = np.mean([_tissue_share(synthetic_region(Box(y, x, y + 32, x + 32), seed=3, tissue_fraction=0.3))
                     for y in ys for x in ys])
    assert abs(share - 0.3) < 0.2


def test_synthetic_region_is_box_invariant() -> None:
    a, b = Box(900, -150, 1250, 260), Box(1100, 40, 1500, 520)
    ov = a.intersect(b)
    ra, rb = synthetic_region(a, seed=4), synthetic_region(b, seed=4)
    la, lb = synthetic_region_labels(a, seed=4), synthetic_region_labels(b, seed=4)
    assert ra.shape == a.shape + (3,) and la.shape == a.shape and la.dtype == np.uint32
    assert np.array_equal(ra[ov.slices((a.y0, a.x0))], rb[ov.slices((b.y0, b.x0))])
    assert np.array_equal(la[ov.slices((a.y0, a.x0))], lb[ov.slices((b.y0, b.x0))])
    assert len(np.unique(la)) > 10  # seed 4 has tissue here (~78 % of the slide is tissue)
    # a tiny box agrees with a big one too
    small = Box(1180, 100, 1190, 113)
    assert np.array_equal(synthetic_region(small, seed=4), ra[small.slices((a.y0, a.x0))])
    assert not np.array_equal(synthetic_region(a, seed=5), ra)


def test_pyramid_shapes() -> None:
    assert pyramid_shapes(500, 700) == [(500, 700)]
    assert pyramid_shapes(3000, 2049) == [(3000, 2049), (1500, 1025), (750, 513)]
    assert pyramid_shapes(500, 700, levels=3) == [(500, 700), (250, 350), (125, 175)]
    assert pyramid_shapes(3000, 2049, levels=1) == [(3000, 2049)]
    assert len(pyramid_shapes(5, 3, levels=4)) == 4  # 5x3, 3x2, 2x1, 1x1
    with pytest.raises(ValueError):
        pyramid_shapes(5, 3, levels=5)
    with pytest.raises(ValueError):
        pyramid_shapes(5, 3, levels=0)


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_pyramidal_tiff_opens_in_openslide_with_mpp(tmp_path: Path, compression: str,
                                                    image: tuple[np.ndarray, np.ndarray]) -> None:
    rgb = np.concatenate([image[0], image[0][:, :500]], axis=1)  # 640 x 1268: two levels
    path = write_pyramidal_tiff(tmp_path / "s.tiff", rgb, mpp=0.25, compression=compression)
    assert [p.name for p in tmp_path.iterdir()] == ["s.tiff"]  # no temporary left
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count > 1
        assert slide.level_dimensions[1] == (634, 320)
        assert abs(float(slide.properties["openslide.mpp-x"]) - 0.25) < 1e-3
        assert abs(float(slide.properties["openslide.mpp-y"]) - 0.25) < 1e-3
        got = np.asarray(slide.read_region((0, 0), 0, (rgb.shape[1], rgb.shape[0])).convert("RGB"))
    diff = np.abs(got.astype(int) - rgb)
    if compression == "zlib":
        assert diff.max() == 0
    else:
        assert 0 < diff.mean() < 8
    # the layout OpenSlide needs: tiled top-level pages, lower ones flagged reduced-resolution
    with tifffile.TiffFile(path) as tf:
        assert tf.is_bigtiff and all(p.is_tiled for p in tf.pages)
        assert [p.subfiletype for p in tf.pages] == [0, 1]
        assert tf.pages[0].tags["ResolutionUnit"].value == 3  # centimetre


def test_openslide_needs_the_reduced_resolution_bit(tmp_path: Path) -> None:
    # pins the finding the writer relies on: without NewSubfileType=1 OpenSlide's
    # generic-tiff driver ignores the lower pages (and SubIFDs), with it they are levels
    rgb = np.random.default_rng(0).integers(0, 255, (512, 384, 3), dtype=np.uint8)
    for flag, expected in ((0, 1), (1, 2)):
        path = tmp_path / f"flag{flag}.tif"
        with tifffile.TiffWriter(path) as tw:
            tw.write(rgb, photometric="rgb", tile=(128, 128))
            tw.write(downsample2(rgb), photometric="rgb", tile=(128, 128), subfiletype=flag)
        with openslide.OpenSlide(path) as slide:
            assert slide.level_count == expected
    path = tmp_path / "subifd.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, photometric="rgb", tile=(128, 128), subifds=1)
        tw.write(downsample2(rgb), photometric="rgb", tile=(128, 128), subfiletype=1)
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == 1


def test_explicit_level_count(tmp_path: Path, image: tuple[np.ndarray, np.ndarray]) -> None:
    rgb = image[0]
    path = write_pyramidal_tiff(tmp_path / "l.tiff", rgb, mpp=0.5, levels=3, compression="zlib", tile=128)
    with openslide.OpenSlide(path) as slide:
        assert slide.level_dimensions == ((768, 640), (384, 320), (192, 160))
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert abs(float(slide.properties["openslide.mpp-y"]) - 0.5) < 1e-3
        lvl2 = np.asarray(slide.read_region((0, 0), 2, (192, 160)).convert("RGB"))
    assert np.array_equal(lvl2, downsample2(downsample2(rgb)))


def test_tiles_writer_streams_the_same_pyramid(tmp_path: Path) -> None:
    shape = (1100, 1300)
    calls: list[Box] = []

    def tile_fn(box: Box) -> np.ndarray:
        calls.append(box)
        return synthetic_region(box, seed=9)

    path = write_pyramidal_tiff_tiles(tmp_path / "t.tiff", shape, tile_fn, mpp=0.5, tile=256,
                                      compression="zlib")
    assert max(b.height * b.width for b in calls) <= 256 * 256
    assert sum(b.height * b.width for b in calls) == shape[0] * shape[1]  # once per pixel
    full = synthetic_region(Box(0, 0, *shape), seed=9)
    with openslide.OpenSlide(path) as slide:
        assert slide.level_dimensions == ((1300, 1100), (650, 550))
        assert abs(float(slide.properties["openslide.mpp-x"]) - 0.5) < 1e-3
        lvl0 = np.asarray(slide.read_region((0, 0), 0, (1300, 1100)).convert("RGB"))
        lvl1 = np.asarray(slide.read_region((0, 0), 1, (650, 550)).convert("RGB"))
    assert np.array_equal(lvl0, full)
    assert np.array_equal(lvl1, downsample2(full))


def test_tiles_writer_takes_an_iterable(tmp_path: Path, image: tuple[np.ndarray, np.ndarray]) -> None:
    rgb = image[0][:600, :700]
    boxes = [Box(y, x, min(y + 256, 600), min(x + 256, 700))
             for y in range(0, 600, 256) for x in range(0, 700, 256)]
    path = write_pyramidal_tiff_tiles(tmp_path / "i.tiff", (600, 700), (rgb[b.slices()] for b in boxes),
                                      mpp=0.25, levels=2, compression="zlib")
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == 2
        got = np.asarray(slide.read_region((0, 0), 0, (700, 600)).convert("RGB"))
    assert np.array_equal(got, rgb)
    # a short or overlong iterator fails, and leaves no (partial) file behind
    for tiles in (boxes[:-1], boxes + boxes[:1]):
        with pytest.raises(ValueError, match="tile"):
            write_pyramidal_tiff_tiles(tmp_path / "bad.tiff", (600, 700), (rgb[b.slices()] for b in tiles),
                                       mpp=0.25, compression="zlib")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.tiff"]


def test_ome_tiff_round_trip(tmp_path: Path, image: tuple[np.ndarray, np.ndarray]) -> None:
    rgb = np.concatenate([image[0]] * 2, axis=0)  # 1280 x 768: one SubIFD level
    path = write_ome_tiff(tmp_path / "s.ome.tif", rgb, 0.2271)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        series = tf.series[0]
        assert series.axes == "YXS" and series.shape == rgb.shape
        assert len(series.levels) == 2 and series.levels[1].shape == (640, 384, 3)
        assert tf.pages[0].is_tiled
        assert abs(ome_mpp(tf.ome_metadata) - 0.2271) < 1e-6
        assert np.array_equal(series.asarray(), rgb)


@pytest.mark.shared_data
def test_monuseg_mosaic(monuseg: Path) -> None:
    folder = monuseg / "test"
    names = sorted(p.stem for p in (folder / "images").glob("*.png"))[:5]
    rgb, labels, placements = monuseg_mosaic(folder, seed=0, canvas=(2600, 3400), names=names)
    assert rgb.shape == (2600, 3400, 3) and labels.shape == (2600, 3400)
    assert [p[0] for p in placements] == names
    boxes = [Box(y, x, y + 1000, x + 1000) for _, y, x in placements]
    for i, a in enumerate(boxes):
        assert a.y0 >= 0 and a.x0 >= 0 and a.y1 <= 2600 and a.x1 <= 3400
        for b in boxes[i + 1:]:
            assert a.intersect(b).is_empty()
    # ids globally unique: each tile's instances keep their count, none shared across tiles
    total = 0
    seen: set[int] = set()
    for (name, _, _), box in zip(placements, boxes):
        truth = tifffile.imread(folder / "labels" / f"{name}.tif")
        ids = set(np.unique(labels[box.slices()]).tolist()) - {0}
        assert len(ids) == len(set(np.unique(truth).tolist()) - {0})
        assert not ids & seen
        seen |= ids
        total += len(ids)
        assert np.array_equal(labels[box.slices()] > 0, truth > 0)
    assert len(np.unique(labels)) - 1 == total
    # the pale background everywhere outside the tiles, the tiles' pixels inside
    outside = np.ones(labels.shape, bool)
    for box in boxes:
        outside[box.slices()] = False
    assert (rgb[outside] == (236, 230, 236)).all() and not labels[outside].any()
