"""Slide readers, read plans and model-resolution region reads."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.errors import ConfigError, MissingMppError, SlideReadError
from pipeline.slide.memory import MemorySlide
from pipeline.slide.open import open_slide, register_memory_slide, unregister_memory_slide
from pipeline.slide.openslide_reader import OpenSlideReader, rgba_to_rgb
from pipeline.slide.reader import SlideReader
from pipeline.slide.region import nominal_downsample, plan_read, read_region, reflect_index
from pipeline.slide.tiff_reader import TiffFileReader
from pipeline.types import Box, Level, SlideInfo

# ../shared relative to the repository (as in conftest.py), never copied into it
SLIDES = Path(os.environ.get("WSI_NUCLEI_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data")) / "slides"
FIXTURES = SLIDES / "openslide-fixtures"


@pytest.fixture
def slides_dir() -> Path:
    """The shared real slides; tests using it skip when it is absent."""
    if not (SLIDES / "CMU-1-Small-Region.svs").exists():
        pytest.skip("shared slides not available")
    return SLIDES


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def pattern(level: int, box: Box) -> np.ndarray:
    """Deterministic pixels of a procedural slide (module level: picklable)."""
    y, x = np.mgrid[box.y0:box.y1, box.x0:box.x1]
    out = np.stack([(y * 7 + x * 3 + level) % 256, (x * 5) % 256, (y * 11 + level * 40) % 256],
                   axis=-1)
    return out.astype(np.uint8)


# --------------------------------------------------------------------------- real slides


@pytest.mark.parametrize("name, backend, vendor, size, mpp, n_levels", [
    ("CMU-1-Small-Region.svs", "openslide", "aperio", (2220, 2967), 0.499, 1),
    ("OS-1-detail.ome.tif", "tifffile", "ome-tiff", (1101, 1101), 0.2271, 1),
    ("openslide-fixtures/small.svs", "openslide", "aperio", (16, 16), 0.499, 1),
    ("openslide-fixtures/boxes.tiff", "openslide", "generic-tiff", (300, 250), 352.78, 4),
    ("openslide-fixtures/boxes_0.dcm", "openslide", "dicom", (16, 16), 0.499, 1),
])
def test_real_slides_open(slides_dir: Path, name: str, backend: str, vendor: str,
                          size: tuple[int, int], mpp: float, n_levels: int) -> None:
    with open_slide(slides_dir / name) as reader:
        info = reader.info
        assert info.backend == backend and info.vendor == vendor
        assert (info.width, info.height) == size
        assert info.mpp == pytest.approx(mpp, abs=5e-3)
        assert len(info.levels) == n_levels
        assert info.levels[0] == Level(size[0], size[1], 1.0)
        lv = info.levels[-1]
        h, w = min(lv.height, 8), min(lv.width, 8)
        patch = reader.read_level(len(info.levels) - 1, Box(lv.height - h, lv.width - w,
                                                            lv.height, lv.width))
        assert patch.shape == (h, w, 3) and patch.dtype == np.uint8
        assert info.bounds_xy == (0, 0)
        assert info.slide_id == Path(name).name.split(".")[0]


def test_boxes_levels(slides_dir: Path) -> None:
    info = open_slide(FIXTURES / "boxes.tiff").info
    assert [lv.downsample for lv in info.levels] == pytest.approx([1, 2, 4.016, 8.086], abs=1e-3)


def test_unreadable_and_unopenable(slides_dir: Path, tmp_path: Path) -> None:
    reader = open_slide(FIXTURES / "unreadable.svs")
    # a damaged region reads as glass and is recorded (the run decides: a slide with no
    # readable region fails, one with some is partial; tests/test_damaged.py)
    pixels = reader.read_level(0, Box(0, 0, 16, 16))
    assert (pixels == 255).all() and reader.reads_ok == 0
    assert reader.damaged and all("unreadable.svs" in e for e in reader.damaged.values())
    with pytest.raises(SlideReadError, match="unopenable.tiff") as err:
        open_slide(FIXTURES / "unopenable.tiff")
    message = str(err.value)
    assert "\n" not in message
    # OpenSlide's cause and the tifffile fallback's cause (it cannot decode a pixel)
    assert "Unsupported TIFF compression: 52479" in message and "tifffile: " in message
    with pytest.raises(SlideReadError, match="not found"):
        open_slide(tmp_path / "missing.svs")
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all")
    with pytest.raises(SlideReadError, match="junk.svs"):
        open_slide(junk)


def test_ome_tiff_region_matches_tifffile(slides_dir: Path) -> None:
    path = SLIDES / "OS-1-detail.ome.tif"
    full = tifffile.imread(path)
    reader = open_slide(path)
    assert isinstance(reader, TiffFileReader)
    for box in (Box(0, 0, 1101, 1101), Box(100, 450, 700, 1101), Box(511, 511, 513, 514)):
        np.testing.assert_array_equal(reader.read_level(0, box), full[box.slices()])
    with pytest.raises(ValueError):
        reader.read_level(0, Box(0, 0, 1102, 10))


def test_openslide_rgba_composited_on_white(slides_dir: Path) -> None:
    # boxes.tiff level 2 is narrower than 300/4.016: reads stay inside, RGB only
    reader = open_slide(FIXTURES / "boxes.tiff")
    lv = reader.info.levels[2]
    rgb = reader.read_level(2, Box(0, 0, lv.height, lv.width))
    assert rgb.shape == (lv.height, lv.width, 3)
    # what OpenSlide returns outside the scanned area (alpha 0) becomes white
    import openslide

    with openslide.OpenSlide(FIXTURES / "boxes.tiff") as raw:
        rgba = np.asarray(raw.read_region((250, 200), 0, (80, 80)))
    assert (rgba[-10:, -10:, 3] == 0).all() and (rgba[:10, :10, 3] == 255).all()
    out = rgba_to_rgb(rgba)
    assert (out[-10:, -10:] == 255).all()
    np.testing.assert_array_equal(out[:10, :10], rgba[:10, :10, :3])


def test_rgba_to_rgb_values() -> None:
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 100, 200, 128]]], np.uint8)
    out = rgba_to_rgb(rgba)
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 2], [127, 177, 227])  # c*a + 255*(1-a), a = 128/255


# --------------------------------------------------------------------------- generic TIFF


def write_pyramid_tiff(path: Path, image: np.ndarray, mpp: float | None, unit: str = "CENTIMETER",
                       tile: tuple[int, int] | None = (64, 64), compression: str = "zlib",
                       reduced_flag: bool = True) -> None:
    """Tiled pyramid as top-level IFDs (what OpenSlide generic-tiff reads)."""
    with tifffile.TiffWriter(path) as tw:
        level = image
        for i in range(3):
            kw: dict = {"photometric": "rgb", "compression": compression}
            if tile:
                kw["tile"] = tile
            if mpp is not None:
                per_unit = (1e4 if unit == "CENTIMETER" else 25400.0) / (mpp * 2 ** i)
                kw["resolution"] = (per_unit, per_unit)
                kw["resolutionunit"] = unit
            tw.write(level, subfiletype=1 if i and reduced_flag else 0, **kw)
            level = level[::2, ::2]


@pytest.mark.parametrize("unit", ["CENTIMETER", "INCH"])
def test_generic_tiff_pyramid_opens_with_openslide_mpp(tmp_path: Path, unit: str) -> None:
    image = noise_image(256, 320)
    path = tmp_path / "pyr.tiff"
    write_pyramid_tiff(path, image, 0.25, unit)
    with open_slide(path) as reader:
        assert isinstance(reader, OpenSlideReader)
        assert reader.info.vendor == "generic-tiff"
        assert reader.info.mpp == pytest.approx(0.25)
        assert [lv.downsample for lv in reader.info.levels] == [1, 2, 4]
        np.testing.assert_array_equal(reader.read_level(0, Box(10, 20, 100, 300)),
                                      image[10:100, 20:300])
        np.testing.assert_array_equal(reader.read_level(1, Box(5, 7, 40, 90)),
                                      image[::2, ::2][5:40, 7:90])


def test_generic_tiff_jpeg_pyramid_equals_tifffile_decode(tmp_path: Path) -> None:
    y, x = np.mgrid[:256, :320]
    image = np.stack([(y + x) % 200 + 20, (2 * y) % 180 + 40, (3 * x) % 150 + 60], -1)
    path = tmp_path / "jpeg.tiff"
    write_pyramid_tiff(path, image.astype(np.uint8), 0.5, compression="jpeg")
    with open_slide(path) as reader:
        assert reader.info.backend == "openslide" and reader.info.mpp == pytest.approx(0.5)
        assert len(reader.info.levels) == 3
        decoded = tifffile.imread(path)  # the same JPEG tiles decoded by imagecodecs
        box = Box(30, 50, 200, 300)
        np.testing.assert_array_equal(reader.read_level(0, box), decoded[box.slices()])


def test_generic_tiff_levels_need_the_reduced_image_flag(tmp_path: Path) -> None:
    """Findings behind the module docstring: levels without NewSubfileType=1 or in SubIFDs
    are not levels for OpenSlide; tifffile's default resolution unit is INCH."""
    image = noise_image(128, 160)
    flat = tmp_path / "flat.tiff"
    write_pyramid_tiff(flat, image, 0.25, reduced_flag=False)
    assert len(open_slide(flat).info.levels) == 1
    sub = tmp_path / "subifds.tiff"
    with tifffile.TiffWriter(sub) as tw:
        kw = {"photometric": "rgb", "tile": (64, 64), "resolution": (4e4, 4e4),
              "resolutionunit": "CENTIMETER"}
        tw.write(image, subifds=1, **kw)
        tw.write(image[::2, ::2], subfiletype=1, **kw)
    info = open_slide(sub).info
    assert info.backend == "openslide" and len(info.levels) == 1 and info.mpp == pytest.approx(0.25)
    default = tmp_path / "default-unit.tiff"  # 40000 px per centimetre was meant ...
    tifffile.imwrite(default, image, photometric="rgb", tile=(64, 64), resolution=(4e4, 4e4))
    assert open_slide(default).info.mpp == pytest.approx(25400 / 40000)  # ... but it is inch


@pytest.mark.parametrize("compression", ["jpegxl", "webp"])
def test_tiff_openslide_cannot_decode_falls_back_to_tifffile(tmp_path: Path, compression: str,
                                                            caplog: pytest.LogCaptureFixture,
                                                            ) -> None:
    """OpenSlide recognises the TIFF but fails on the codec: tifffile reads the pyramid."""
    import imagecodecs

    if not getattr(imagecodecs, compression.upper()).available:
        pytest.skip(f"imagecodecs without {compression}")
    image = noise_image(256, 192)
    path = tmp_path / f"{compression}.tiff"
    write_pyramid_tiff(path, image, 0.5, compression=compression)
    with caplog.at_level(logging.INFO, logger="pipeline.slide"):
        reader = open_slide(path)
    assert "Unsupported TIFF compression" in caplog.text
    assert isinstance(reader, TiffFileReader)
    assert reader.info.mpp == pytest.approx(0.5)
    assert [(lv.height, lv.width) for lv in reader.info.levels] == [(256, 192), (128, 96), (64, 48)]
    expected = tifffile.imread(path, level=1)
    np.testing.assert_array_equal(reader.read_level(1, Box(7, 9, 128, 90)), expected[7:128, 9:90])


def test_generic_tiff_without_unit_has_no_mpp(tmp_path: Path) -> None:
    path = tmp_path / "nounit.tiff"
    write_pyramid_tiff(path, noise_image(128, 128), None)
    reader = open_slide(path)
    assert reader.info.backend == "openslide" and reader.info.mpp is None
    with pytest.raises(MissingMppError, match="--mpp"):
        plan_read(reader.info, 0.5)
    assert open_slide(path, mpp_override=0.3).info.mpp == 0.3
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="mpp"):
            open_slide(path, mpp_override=bad)


def test_stripped_tiff_falls_back_to_tifffile(tmp_path: Path) -> None:
    """OpenSlide refuses a stripped TIFF; tifffile reads it with mpp from the tags."""
    image = noise_image(100, 90)
    path = tmp_path / "strips.tif"
    write_pyramid_tiff(path, image, 0.5, tile=None)
    reader = open_slide(path)
    assert isinstance(reader, TiffFileReader)
    assert reader.info.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(reader.read_level(0, Box(3, 4, 90, 80)), image[3:90, 4:80])


def test_ome_tiff_written_with_pyramid(tmp_path: Path) -> None:
    image = noise_image(300, 260)
    path = tmp_path / "x.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm",
                "PhysicalSizeY": 250.0, "PhysicalSizeYUnit": "nm"}
        tw.write(image, subifds=1, tile=(64, 64), photometric="rgb", metadata=meta)
        tw.write(image[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb")
    reader = open_slide(path)
    assert reader.info.backend == "tifffile" and reader.info.slide_id == "x"
    assert reader.info.mpp == pytest.approx(0.25)
    assert [(lv.width, lv.height) for lv in reader.info.levels] == [(260, 300), (130, 150)]
    np.testing.assert_array_equal(reader.read_level(1, Box(10, 20, 150, 130)),
                                  image[::2, ::2][10:150, 20:130])


# --------------------------------------------------------------------------- plan


def test_plan_read_levels_on_memory_slide() -> None:
    slide = MemorySlide.procedural(5000, 3000, 0.25, pattern)
    assert [lv.downsample for lv in slide.info.levels] == [1, 2, 4, 8]
    assert [(lv.height, lv.width) for lv in slide.info.levels][-1] == (625, 375)
    cases = {0.25: (0, 1.0), 0.5: (1, 2.0), 0.375: (0, 1.5), 0.9: (1, 3.6), 1.0: (2, 4.0),
             0.25 * 4.003: (2, 4.003), 0.25 * 3.99: (1, 3.99), 10.0: (3, 40.0), 0.1: (0, 0.4)}
    for model_mpp, (level, scale) in cases.items():
        plan = plan_read(slide.info, model_mpp)
        assert plan.level == level, model_mpp
        assert plan.scale == pytest.approx(scale)
        assert plan.level_downsample == 2 ** level
        assert plan.mpp == model_mpp
        assert plan.shape == (int(np.ceil(5000 / scale - 1e-9)), int(np.ceil(3000 / scale - 1e-9)))


def test_plan_read_boxes(slides_dir: Path) -> None:
    info = open_slide(FIXTURES / "boxes.tiff").info
    mpp = info.mpp
    # OpenSlide reports 4.016 and 8.086 (mean of the width and height ratios) for levels
    # of 75 x 62 and 37 x 31 px: floor(300 / k) x floor(250 / k), i.e. downsamples 4 and 8
    assert [nominal_downsample(info, i) for i in range(4)] == [1, 2, 4, 8]
    assert plan_read(info, mpp * 4.0).level == 2
    assert plan_read(info, mpp * 3.99).level == 1
    assert plan_read(info, mpp * 100).level == 3
    assert plan_read(info, mpp * 1.5).level == 0
    plan = plan_read(info, mpp * 2)
    assert plan.shape == (125, 150) and plan.level_downsample == 2.0


@pytest.mark.parametrize("level", [2, 3])
def test_openslide_non_integer_downsample_reads_are_box_invariant(slides_dir: Path,
                                                                  level: int) -> None:
    """OpenSlide paints such levels with a start-dependent sub-pixel shift; anchored
    reads make every pixel independent of the box."""
    reader = open_slide(FIXTURES / "boxes.tiff")
    lv = reader.info.levels[level]
    full = reader.read_level(level, Box(0, 0, lv.height, lv.width))
    for y in range(0, lv.height - 5, 4):
        for x in range(0, lv.width - 5, 3):
            box = Box(y, x, y + 5, x + 5)
            np.testing.assert_array_equal(reader.read_level(level, box), full[box.slices()])


@pytest.mark.parametrize("factor", [1.0, 2.0, 3.0, 4.0, 5.0])
def test_read_region_invariant_on_openslide_pyramid(slides_dir: Path, factor: float) -> None:
    reader = open_slide(FIXTURES / "boxes.tiff")
    plan = plan_read(reader.info, reader.info.mpp * factor)
    H, W = plan.shape
    boxes = random_boxes(np.random.default_rng(int(factor)), (H, W), 15)
    outer = Box(min(b.y0 for b in boxes), min(b.x0 for b in boxes),
                max(b.y1 for b in boxes), max(b.x1 for b in boxes))
    big = read_region(reader, plan, outer)
    for box in boxes:
        np.testing.assert_array_equal(read_region(reader, plan, box),
                                      big[box.slices((outer.y0, outer.x0))], err_msg=str(box))


def test_missing_mpp_names_flag() -> None:
    slide = MemorySlide(noise_image(20, 20), None)
    with pytest.raises(MissingMppError, match="--mpp"):
        plan_read(slide.info, 0.5)
    info = SlideInfo("x", "x", 10, 10, None, (Level(10, 10, 1.0),), "memory")
    with pytest.raises(MissingMppError):
        plan_read(info, 0.5)


@pytest.mark.parametrize("mpp,model_mpp,ok", [(2.0, 0.5, True), (1.0, 0.25, True), (2.01, 0.5, False),
                                             (25400 / 72, 0.5, False), (25400 / 96, 0.25, False)])
def test_slide_far_coarser_than_the_model_is_refused(mpp: float, model_mpp: float, ok: bool) -> None:
    """A 300 x 250 TIFF with a 72-dpi tag (352.8 µm/px) once planned 13,669 tiles of a
    0.5 µm/px model (1.5 hours of glass); at most MAX_UPSAMPLE = 4x coarser is segmented."""
    info = SlideInfo("x.tif", "x", 300, 250, mpp, (Level(300, 250, 1.0),), "openslide")
    if ok:
        assert plan_read(info, model_mpp).scale == pytest.approx(model_mpp / mpp)
        return
    with pytest.raises(MissingMppError, match="coarser than the model.*--mpp") as caught:
        plan_read(info, model_mpp)
    assert ("dpi" in str(caught.value)) == (mpp > 100)


# --------------------------------------------------------------------------- read_region


def test_reflect_index_matches_numpy_pad() -> None:
    for n in (1, 2, 5, 17):
        pad = 3 * n + 4
        expected = np.pad(np.arange(n), pad, mode="reflect") if n > 1 else np.zeros(n + 2 * pad)
        np.testing.assert_array_equal(reflect_index(np.arange(-pad, n + pad), n), expected)


def test_mirror_equals_numpy_reflect_for_r1() -> None:
    image = noise_image(37, 29, seed=3)
    slide = MemorySlide(image, 0.5)
    plan = plan_read(slide.info, 0.5)
    assert plan.scale == 1 and plan.shape == (37, 29)
    padded = np.pad(image, ((50, 50), (40, 40), (0, 0)), mode="reflect")
    got = read_region(slide, plan, Box(-50, -40, 87, 69))
    np.testing.assert_array_equal(got, padded)
    # a box entirely outside, and a narrow one straddling a corner
    box = Box(-45, 35, -30, 60)
    np.testing.assert_array_equal(read_region(slide, plan, box), padded[box.shift(50, 40).slices()])
    box = Box(36, 28, 40, 31)
    np.testing.assert_array_equal(read_region(slide, plan, box), padded[box.shift(50, 40).slices()])


def random_boxes(rng: np.random.Generator, shape: tuple[int, int], n: int) -> list[Box]:
    """Boxes inside, crossing each of the four edges, and crossing all four at once."""
    H, W = shape
    boxes = [Box(-7, -5, H + 6, W + 9)]
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(1, max(2, min(H, W)), 2))
        y0 = int(rng.integers(-h + 1, H))
        x0 = int(rng.integers(-w + 1, W))
        boxes.append(Box(y0, x0, y0 + h, x0 + w))
    boxes += [Box(-3, 2, 5, 9), Box(2, -4, 9, 3), Box(H - 4, 1, H + 3, 8), Box(1, W - 2, 6, W + 5)]
    return boxes


@pytest.mark.parametrize("size, slide_mpp, model_mpp, level, residual", [
    ((61, 53), 0.5, 0.5, 0, 1.0),  # single level, direct
    ((61, 53), 0.25, 0.5, 0, 2.0),  # single level, 2x2 average
    ((61, 53), 0.25, 0.375, 0, 1.5),  # bilinear
    ((61, 53), 0.2, 0.5, 0, 2.5),  # bilinear, decimating
    ((1100, 1030), 0.25, 0.5, 1, 1.0),  # level 1 exact
    ((1100, 1030), 0.25, 0.75, 1, 1.5),  # level 1 inexact
    ((2100, 1301), 0.125, 1.0, 2, 2.0),  # level 2, integer residual, odd level sizes
])
def test_read_region_is_box_invariant(size: tuple[int, int], slide_mpp: float, model_mpp: float,
                                      level: int, residual: float) -> None:
    slide = MemorySlide.procedural(*size, slide_mpp, pattern) if max(size) > 1024 else \
        MemorySlide(noise_image(*size, seed=1), slide_mpp)
    plan = plan_read(slide.info, model_mpp)
    assert plan.level == level
    assert plan.scale / plan.level_downsample == pytest.approx(residual)
    H, W = plan.shape
    rng = np.random.default_rng(7)
    boxes = random_boxes(rng, (min(H, 160), min(W, 160)), 12)
    if H > 160:  # also probe the far edges of larger images
        boxes += [b.shift(H - 160, W - 160) for b in random_boxes(rng, (160, 160), 6)]
    outer = Box(min(b.y0 for b in boxes), min(b.x0 for b in boxes),
                max(b.y1 for b in boxes), max(b.x1 for b in boxes))
    big = read_region(slide, plan, outer)
    assert big.shape == (outer.height, outer.width, 3) and big.dtype == np.uint8
    for box in boxes:
        part = read_region(slide, plan, box)
        np.testing.assert_array_equal(part, big[box.slices((outer.y0, outer.x0))], err_msg=str(box))
    # mirrored semantics hold at model resolution too (numpy reflects repeatedly when the
    # padding is wider than the image, which is what reflect_index does)
    if H * W < 400_000:
        inside = read_region(slide, plan, Box(0, 0, H, W))
        pad = ((-outer.y0, outer.y1 - H), (-outer.x0, outer.x1 - W), (0, 0))
        np.testing.assert_array_equal(np.pad(inside, pad, mode="reflect"), big)


def test_read_region_values() -> None:
    """Integer residual averages, r = 1 copies, bilinear interpolates between neighbours."""
    image = noise_image(40, 36, seed=5)
    slide = MemorySlide(image, 0.25)
    two = read_region(slide, plan_read(slide.info, 0.5), Box(0, 0, 20, 18))
    expected = (image.reshape(20, 2, 18, 2, 3).astype(int).sum(axis=(1, 3)) + 2) // 4
    np.testing.assert_array_equal(two, expected)
    ramp = np.zeros((40, 36, 3), np.uint8)
    ramp[:] = (np.arange(36) * 6)[None, :, None]
    plan = plan_read(MemorySlide(ramp, 0.25).info, 0.375)
    out = read_region(MemorySlide(ramp, 0.25), plan, Box(0, 0, 10, 20)).astype(float)
    x = np.clip((np.arange(20) + 0.5) * 1.5 - 0.5, 0, 35)
    np.testing.assert_allclose(out[0, :, 0], np.rint(x * 6), atol=0)


def test_read_region_direct_on_real_slide(slides_dir: Path) -> None:
    reader = open_slide(SLIDES / "CMU-1-Small-Region.svs")
    plan = plan_read(reader.info, reader.info.mpp)
    box = Box(100, 200, 356, 456)
    np.testing.assert_array_equal(read_region(reader, plan, box), reader.read_level(0, box))
    H, W = plan.shape
    edge = read_region(reader, plan, Box(H - 20, W - 20, H + 20, W + 20))
    np.testing.assert_array_equal(edge[20:39], edge[18::-1])  # row H+j = row H-2-j
    np.testing.assert_array_equal(edge[:, 20:39], edge[:, 18::-1])


# --------------------------------------------------------------------------- pickling + memory


def _read_in_child(reader: SlideReader, box: Box) -> np.ndarray:
    with reader:
        return reader.read_level(0, box)


def test_pickle_round_trip_and_spawn(tmp_path: Path) -> None:
    image = noise_image(64, 80)
    path = tmp_path / "pyr.tiff"
    write_pyramid_tiff(path, image, 0.5)
    ome = tmp_path / "plain.tif"
    tifffile.imwrite(ome, image, photometric="rgb")
    readers = [open_slide(path), open_slide(ome, mpp_override=0.4), MemorySlide(image, 0.5),
               MemorySlide.procedural(64, 80, 0.5, pattern)]
    box = Box(3, 5, 40, 70)
    for reader in readers:
        before = reader.read_level(0, box)
        clone = pickle.loads(pickle.dumps(reader))
        assert clone.info == reader.info
        np.testing.assert_array_equal(clone.read_level(0, box), before)
        reader.close()
        np.testing.assert_array_equal(reader.read_level(0, box), before)  # reopens lazily
    assert readers[1].info.mpp == 0.4
    # one spawned process for two readers keeps the test fast on a busy machine
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        for reader in (readers[0], readers[1], readers[3]):
            got = pool.apply(_read_in_child, (reader, box))
            np.testing.assert_array_equal(got, reader.read_level(0, box))


def test_memory_slide_pyramid_and_registry() -> None:
    image = noise_image(2100, 1030)
    slide = MemorySlide(image, 0.25, name="blob")
    assert slide.info.path == "memory://blob" and slide.info.slide_id == "blob"
    assert [(lv.height, lv.width, lv.downsample) for lv in slide.info.levels] == [
        (2100, 1030, 1), (1050, 515, 2), (525, 258, 4)]
    lv2 = slide.read_level(2, Box(0, 0, 525, 258))
    half = (image.reshape(1050, 2, 515, 2, 3).astype(int).sum(axis=(1, 3)) + 2) // 4
    np.testing.assert_array_equal(slide.read_level(1, Box(0, 0, 1050, 515)), half)
    assert lv2.shape == (525, 258, 3)
    path = register_memory_slide(slide)
    try:
        assert open_slide(path) is slide
        assert open_slide(slide) is slide
        other = open_slide(path, mpp_override=0.3)
        assert other.info.mpp == 0.3 and slide.info.mpp == 0.25
    finally:
        unregister_memory_slide(path)
    with pytest.raises(SlideReadError, match="serial executor"):
        open_slide(path)
    with pytest.raises(ValueError):
        slide.read_level(0, Box(-1, 0, 5, 5))
    with pytest.raises(ValueError):
        slide.read_level(3, Box(0, 0, 5, 5))


def test_concurrent_reads_from_threads(slides_dir: Path) -> None:
    """Dask workers read one handle from several threads."""
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    rng = np.random.default_rng(0)
    for path in (SLIDES / "OS-1-detail.ome.tif", SLIDES / "CMU-1-Small-Region.svs"):
        reader = open_slide(path)
        lv = reader.info.levels[0]
        boxes = []
        for _ in range(16):
            y, x = int(rng.integers(0, lv.height - 200)), int(rng.integers(0, lv.width - 200))
            boxes.append(Box(y, x, y + 200, x + 200))
        expected = [reader.read_level(0, b) for b in boxes]
        reader.close()
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(partial(reader.read_level, 0), boxes))
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)


def test_a_72_dpi_tiff_fails_at_once_with_what_to_do(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """The whole run, on the OpenSlide fixture whose TIFF tag says 72 dpi: the slide fails
    in planning (no tile is made), its summary says why and names --mpp."""
    from conftest import SHARED_DATA

    from pipeline.run import process_slide
    from pipeline.slide_run.config import RunConfig
    from pipeline.slide_run.executors import SerialExecutor

    boxes = SHARED_DATA / "slides" / "openslide-fixtures" / "boxes.tiff"
    if not boxes.is_file():
        pytest.skip(f"needs {boxes}")
    outcome = process_slide(boxes, RunConfig(model=str(tiny_checkpoint), out=str(tmp_path), device="cpu"),
                            SerialExecutor())
    assert outcome.status == "failed" and "72 dpi" in outcome.error and "--mpp" in outcome.error
    assert not list(tmp_path.glob("*/.work/tile-*.npz"))
