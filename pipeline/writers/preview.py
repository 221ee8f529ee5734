"""Quick-look PNG: the whole slide with its tissue contour and either nucleus outlines or a
nucleus-density heat map, a scale bar, and a full-resolution detail of the densest region.

Why: a pathologist (or a failing-run post-mortem) should see in one glance whether the
segmentation covers the tissue, without opening QuPath or napari. At whole-slide scale a
nucleus is a pixel or less, so outlines would be noise: the overview then shows nuclei per
mm² (from the table's centroids), and the detail panel, read from the slide at about
``DETAIL_MPP``, shows the outlines where there are most nuclei; a box on the overview says
where. Label thumbnails are made by *striding* (nearest), never by averaging, so each
pixel is a real label value. Memory is bounded: one overview, one detail window, the
centroids read one Parquet row group at a time.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from pipeline.atomic import atomic_path
from pipeline.types import Box
from pipeline.writers.colours import NUCLEUS_RGB, TISSUE_RGB

log = logging.getLogger(__name__)

__all__ = [
    "DETAIL_MPP",
    "DETAIL_SIDE",
    "PREVIEW_SIDE",
    "Density",
    "Detail",
    "densest_window",
    "labels_thumbnail",
    "density_map",
    "make_preview",
    "nice_length",
    "write_preview",
]

PREVIEW_SIDE = 2048  # px, the overview panel's long side (at most)
DETAIL_SIDE = 768  # px, the detail panel's side (at most)
DETAIL_MPP = 0.5  # µm per detail pixel wanted (20x): a nucleus is ~10-20 px across
DENSITY_BIN_UM = 50.0  # side of a density cell (about a high-power field's grain)
MIN_OUTLINE_PX = 5.0  # median nucleus diameter (overview px) below which a heat map replaces outlines
DENSITY_CMAP = "magma"
DENSITY_ALPHA = 0.65  # heat map opacity over the slide

DETAIL_RGB = (255, 200, 0)  # amber box: where the detail panel is
TEXT_RGB = (20, 20, 20)
GAP = 16  # px between panels
TITLE = 28  # px of the title strip above the panels (only with a detail panel)
# zlib level of the PNG: 1 encodes a 1934 x 1178 preview in 0.17 s instead of 0.26 s (Pillow's
# default 6) for a file 2 % larger (3.44 vs 3.38 MB): a slide pays it whatever its size
PNG_LEVEL = 1


@dataclass(frozen=True)
class Density:
    """Nuclei per area on a grid of ``bin_px`` x ``bin_px`` overview pixels."""

    values: np.ndarray  # (rows, cols), in ``unit``
    bin_px: float
    unit: str  # e.g. "nuclei / mm²"


@dataclass(frozen=True)
class Detail:
    """A region of the slide at detail resolution, its labels, and where it lies."""

    rgb: np.ndarray  # (h, w, 3) uint8
    labels: np.ndarray  # (h, w), the nucleus label at each detail pixel
    box: tuple[float, float, float, float]  # (y0, x0, y1, x1) in overview pixels
    um_per_px: float


def _fit(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to ``shape`` (labels stay labels)."""
    if image.shape == shape:
        return image
    log.debug("preview: resampling %s to %s", image.shape, shape)
    iy = np.minimum(((np.arange(shape[0]) + 0.5) * image.shape[0] / shape[0]).astype(int), image.shape[0] - 1)
    ix = np.minimum(((np.arange(shape[1]) + 0.5) * image.shape[1] / shape[1]).astype(int), image.shape[1] - 1)
    return image[np.ix_(iy, ix)]


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib): Pillow's default font has no µ or ². The
    file is found without importing matplotlib (0.3 s per slide otherwise)."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    folders = list(spec.submodule_search_locations or []) if spec else []
    try:
        return ImageFont.truetype(str(Path(folders[0]) / "mpl-data/fonts/ttf/DejaVuSans.ttf"), size)
    except (OSError, IndexError):  # pragma: no cover - a matplotlib without its fonts
        return ImageFont.load_default(size=size)


def nice_length(max_length: float) -> float:
    """The largest 1, 2 or 5 x 10^k not above ``max_length`` (a scale bar's length)."""
    if not max_length > 0:
        raise ValueError(f"need a positive length, got {max_length}")
    k = 10.0 ** math.floor(math.log10(max_length))
    return max(m * k for m in (1, 2, 5) if m * k <= max_length * (1 + 1e-9))


def _length_text(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def _scale_bar(draw: ImageDraw.ImageDraw, origin: tuple[int, int], width: int, um_per_px: float) -> None:
    """A bar of a round length (about a fifth of the panel) with its label, bottom left."""
    um = nice_length(width / 5 * um_per_px)
    px = max(1, round(um / um_per_px))
    font = _font(14)
    text = _length_text(um)
    x0, y1 = origin[0] + 10, origin[1] - 10
    tw = int(draw.textlength(text, font=font))
    draw.rectangle((x0 - 6, y1 - 30, x0 + max(px, tw) + 6, y1 + 4), fill=(255, 255, 255))
    draw.rectangle((x0, y1 - 6, x0 + px - 1, y1), fill=TEXT_RGB)
    draw.text((x0, y1 - 28), text, fill=TEXT_RGB, font=font)


def _colormap(values: np.ndarray) -> np.ndarray:
    """uint8 RGB of values in [0, 1] through ``DENSITY_CMAP``."""
    import matplotlib

    lut = (np.asarray(matplotlib.colormaps[DENSITY_CMAP](np.linspace(0, 1, 256)))[:, :3] * 255).round()
    return lut.astype(np.uint8)[np.clip(np.rint(values * 255), 0, 255).astype(np.intp)]


def _density_top(density: Density) -> float:
    """The heat map's upper end: the 99th percentile of the cells holding nuclei."""
    full = density.values[density.values > 0]
    return float(np.percentile(full, 99)) if full.size else 1.0


def _heat(out: np.ndarray, tissue: np.ndarray | None, density: Density) -> None:
    """Blend the density (bilinear to the panel) over ``out`` inside the tissue."""
    h, w = out.shape[:2]
    top = _density_top(density)
    values = density.values / top
    zoomed = ndi.zoom(values, density.bin_px, order=1, grid_mode=True, mode="nearest")
    grid = np.zeros((h, w), np.float64)
    grid[:min(h, zoomed.shape[0]), :min(w, zoomed.shape[1])] = zoomed[:h, :w]
    where = tissue if tissue is not None else np.ones((h, w), bool)
    colour = _colormap(np.clip(grid, 0, 1))
    out[where] = np.rint(out[where] * (1 - DENSITY_ALPHA) + colour[where] * DENSITY_ALPHA).astype(np.uint8)


def _legend(draw: ImageDraw.ImageDraw, corner: tuple[int, int], density: Density) -> None:
    """A colour bar with its range and unit, bottom right."""
    top = _density_top(density)
    bar_w, bar_h = 160, 12
    x1, y1 = corner[0] - 10, corner[1] - 10
    x0 = x1 - bar_w
    font = _font(14)
    draw.rectangle((x0 - 8, y1 - bar_h - 44, x1 + 8, y1 + 4), fill=(255, 255, 255))
    bar = _colormap(np.linspace(0, 1, bar_w))
    for i, rgb in enumerate(bar):
        draw.line((x0 + i, y1 - bar_h, x0 + i, y1), fill=tuple(int(v) for v in rgb))
    draw.text((x0, y1 - bar_h - 40), density.unit, fill=TEXT_RGB, font=font)
    draw.text((x0, y1 - bar_h - 20), "0", fill=TEXT_RGB, font=font)
    label = f"{top:,.0f}"
    draw.text((x1 - int(draw.textlength(label, font=font)), y1 - bar_h - 20), label, fill=TEXT_RGB, font=font)


def _overview_panel(rgb: np.ndarray, labels_thumb: np.ndarray, tissue_mask_thumb: np.ndarray | None,
                    density: Density | None) -> np.ndarray:
    out = np.ascontiguousarray(rgb[..., :3]).astype(np.uint8, copy=True)
    shape = out.shape[:2]
    tissue = None if tissue_mask_thumb is None else _fit(np.asarray(tissue_mask_thumb) != 0, shape)
    if density is not None:
        _heat(out, tissue, density)
    if tissue is not None:
        edge = find_boundaries(tissue, mode="inner")
        out[ndi.binary_dilation(edge) & tissue] = TISSUE_RGB
    if density is None:  # outlines over the contour: nuclei at the tissue's edge stay whole
        labels = _fit(np.asarray(labels_thumb), shape)
        out[find_boundaries(labels, mode="inner")] = NUCLEUS_RGB
    return out


def write_preview(
    path: str | os.PathLike[str],
    thumbnail_rgb: np.ndarray,
    labels_thumb: np.ndarray,
    tissue_mask_thumb: np.ndarray | None,
    *,
    um_per_px: float | None = None,
    density: Density | None = None,
    detail: Detail | None = None,
) -> None:
    """Write ``path`` (PNG, atomic).

    The overview panel is ``thumbnail_rgb`` with the tissue contour (two pixels wide) and
    nucleus outlines (``find_boundaries(mode="inner")``, on the nucleus pixels), or, given
    ``density``, a heat map inside the tissue with its colour bar. ``labels_thumb`` and
    ``tissue_mask_thumb`` are resampled (nearest) to the thumbnail size if they differ by
    rounding. ``um_per_px`` (overview µm per pixel) adds a scale bar. ``detail`` adds a
    second panel with outlines, its own scale bar, and its box drawn on the overview.
    Without ``detail`` the PNG is exactly the overview's size.
    """
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"thumbnail must be (H, W, 3|4), got {rgb.shape}")
    overview = _overview_panel(rgb, labels_thumb, tissue_mask_thumb, density)
    oh, ow = overview.shape[:2]
    top = TITLE if detail is not None else 0
    dh, dw = detail.rgb.shape[:2] if detail is not None else (0, 0)
    canvas = Image.new("RGB", (ow + (GAP + dw if detail is not None else 0), top + max(oh, dh)),
                       (255, 255, 255))
    canvas.paste(Image.fromarray(overview), (0, top))
    draw = ImageDraw.Draw(canvas)
    if um_per_px is not None:
        _scale_bar(draw, (0, top + oh), ow, um_per_px)
    if density is not None:
        _legend(draw, (ow, top + oh), density)
    if detail is not None:
        panel = np.ascontiguousarray(detail.rgb[..., :3]).astype(np.uint8, copy=True)
        panel[find_boundaries(_fit(np.asarray(detail.labels), (dh, dw)), mode="inner")] = NUCLEUS_RGB
        x = ow + GAP
        canvas.paste(Image.fromarray(panel), (x, top))
        y0, x0, y1, x1 = detail.box
        draw.rectangle((round(x0), top + round(y0), max(round(x0), round(x1) - 1),
                        top + max(round(y0), round(y1) - 1)), outline=DETAIL_RGB, width=2)
        draw.rectangle((x, top, x + dw - 1, top + dh - 1), outline=DETAIL_RGB, width=2)
        _scale_bar(draw, (x, top + dh), dw, detail.um_per_px)
        font = _font(16)
        what = "nuclei per area" if density is not None else "nucleus outlines"
        draw.text((4, 4), f"whole slide: tissue contour, {what}", fill=TEXT_RGB, font=font)
        draw.text((x + 4, 4), "densest region (amber box): nucleus outlines", fill=TEXT_RGB, font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=PNG_LEVEL)
    log.info("preview %s (%dx%d)", path, canvas.width, canvas.height)


# --------------------------------------------------------------------------- from a run


def density_map(xy_px: np.ndarray, shape: tuple[int, int], level0_per_bin: float) -> np.ndarray:
    """Counts of level-0 centroids ``(x, y)`` (index convention: pixel p spans [p - 0.5,
    p + 0.5)) in square cells of ``level0_per_bin`` level-0 pixels, on a ``shape`` grid."""
    xy = np.asarray(xy_px, np.float64).reshape(-1, 2)
    col = np.floor((xy[:, 0] + 0.5) / level0_per_bin).astype(np.int64)
    row = np.floor((xy[:, 1] + 0.5) / level0_per_bin).astype(np.int64)
    keep = (row >= 0) & (row < shape[0]) & (col >= 0) & (col < shape[1])
    counts = np.zeros(shape, np.int64)
    np.add.at(counts, (row[keep], col[keep]), 1)
    return counts


def densest_window(counts: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left (row, col) of the ``size`` x ``size`` window of ``counts`` (clipped to the
    grid) holding the most; the first in raster order on ties."""
    h, w = counts.shape
    sy, sx = min(size, h), min(size, w)
    table = np.zeros((h + 1, w + 1), np.int64)
    table[1:, 1:] = counts.cumsum(0).cumsum(1)
    sums = table[sy:, sx:] - table[:-sy, sx:] - table[sy:, :-sx] + table[:-sy, :-sx]
    r, c = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(r), int(c)


def labels_thumbnail(spec: Any, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour (strided) label image of about ``shape`` for previews.

    Reads the coarsest pyramid level that is still at least ``shape``, so memory stays
    near the thumbnail size; level 0 is never loaded unless the thumbnail is that large.
    Pixel (i, j) is the label at the centre of the matching level-0 area.
    """
    th, tw = int(shape[0]), int(shape[1])
    level = 0
    for k, (h, w) in enumerate(spec.level_shapes):
        if h >= th and w >= tw:
            level = k
    import zarr

    arr = zarr.open_array(store=spec.path, path=spec.level_path(level), mode="r")
    h, w = spec.level_shapes[level]
    iy = np.minimum(((np.arange(th) + 0.5) * h / th).astype(np.int64), h - 1)
    ix = np.minimum(((np.arange(tw) + 0.5) * w / tw).astype(np.int64), w - 1)
    block = arr[int(iy[0]):int(iy[-1]) + 1, int(ix[0]):int(ix[-1]) + 1]
    return block[np.ix_(iy - iy[0], ix - ix[0])]


def _centroids(table_path: Path) -> tuple[np.ndarray, float | None]:
    """All level-0 centroids (x, y) and the median nucleus area (level-0 px²), read one
    row group at a time."""
    import pyarrow.parquet as pq

    if not table_path.exists():
        return np.zeros((0, 2)), None
    parts, areas = [], []
    with pq.ParquetFile(table_path) as f:
        for batch in f.iter_batches(columns=["centroid_x_px", "centroid_y_px", "area_px"]):
            cols = batch.to_pydict()
            parts.append(np.column_stack([cols["centroid_x_px"], cols["centroid_y_px"]]))
            areas.append(np.asarray(cols["area_px"], np.float64))
    if not parts:
        return np.zeros((0, 2)), None
    area = np.concatenate(areas)
    return np.concatenate(parts), float(np.median(area)) if area.size else None


def _read_detail(reader: Any, box: Box, step: float) -> tuple[np.ndarray, float]:
    """The level-0 ``box`` at about ``step`` level-0 px per pixel: the finest pyramid
    level not finer than needed, box-averaged by an integer factor. Returns the pixels and
    the exact level-0 px per pixel."""
    from pipeline.overview import box_mean
    from pipeline.slide.region import nominal_downsample

    info = reader.info
    ds = [nominal_downsample(info, i) for i in range(len(info.levels))]
    level = max((i for i in range(len(ds)) if ds[i] <= step * (1 + 1e-3)), key=lambda i: ds[i], default=0)
    f = max(1, round(step / ds[level]))
    lv = info.levels[level]
    d = ds[level]
    sub = Box(int(box.y0 // d), int(box.x0 // d), min(lv.height, math.ceil(box.y1 / d)),
              min(lv.width, math.ceil(box.x1 / d)))
    rgb = box_mean(reader.read_level(level, sub), f)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), d * f


def make_preview(path: str | os.PathLike[str], reader: Any, store: Any, tissue: Any,
                 table_path: str | os.PathLike[str],
                 overview: tuple[np.ndarray, float] | None = None) -> None:
    """The preview of a finished run: ``reader`` the slide, ``store`` its label store
    (``LabelStoreSpec``), ``tissue`` its ``TissueMask``, ``table_path`` its Parquet table;
    ``overview`` a ``slide_overview`` already read (its long side may exceed
    ``PREVIEW_SIDE``: it is box-averaged down), else one is read."""
    import zarr

    from pipeline.overview import box_reduce, slide_overview

    if overview is None:
        overview = slide_overview(reader, PREVIEW_SIDE)  # chunked: memory stays bounded
    thumb, per_px = overview
    f = math.ceil(max(thumb.shape[:2]) / PREVIEW_SIDE)
    if f > 1:
        thumb = box_reduce(thumb, f)
        per_px *= f
    shape = thumb.shape[:2]
    mpp = reader.info.mpp
    # tissue: the mask pixel under each thumbnail pixel's centre (level-0 coordinates)
    s = tissue.level0_per_pixel
    ty = np.minimum(((np.arange(shape[0]) + 0.5) * per_px / s).astype(np.intp), tissue.mask.shape[0] - 1)
    tx = np.minimum(((np.arange(shape[1]) + 0.5) * per_px / s).astype(np.intp), tissue.mask.shape[1] - 1)
    tissue_thumb = tissue.mask[np.ix_(ty, tx)]
    labels_thumb = labels_thumbnail(store, shape)

    xy, median_area = _centroids(Path(table_path))
    bin_px = max(1, round(DENSITY_BIN_UM / (per_px * mpp)))
    bins = (-(-shape[0] // bin_px), -(-shape[1] // bin_px))
    counts = density_map(xy, bins, bin_px * per_px)
    density = None
    diameter = 2 * math.sqrt(median_area / math.pi) / per_px if median_area is not None else math.inf
    if diameter < MIN_OUTLINE_PX:
        cell_um2 = (bin_px * per_px * mpp) ** 2
        density = Density(counts * (1e6 / cell_um2), bin_px, "nuclei / mm²")

    detail = None
    step = max(1.0, DETAIL_MPP / mpp)
    if len(xy) and per_px > step * 1.5:  # else the overview already is as sharp as a detail
        side0 = DETAIL_SIDE * step  # level-0 px
        r, c = densest_window(counts, max(1, round(side0 / (bin_px * per_px))))
        cy = min(max((r * bin_px * per_px + side0 / 2), side0 / 2), reader.info.height - side0 / 2)
        cx = min(max((c * bin_px * per_px + side0 / 2), side0 / 2), reader.info.width - side0 / 2)
        box = Box(max(0, int(cy - side0 / 2)), max(0, int(cx - side0 / 2)),
                  min(reader.info.height, int(cy + side0 / 2)), min(reader.info.width, int(cx + side0 / 2)))
        rgb, d = _read_detail(reader, box, step)
        k = max(1, int(round(d)))
        labels0 = zarr.open_array(store=store.path, path=store.level_path(0), mode="r")
        labels = labels0[box.y0 + k // 2:box.y1:k, box.x0 + k // 2:box.x1:k]
        h, w = min(rgb.shape[0], labels.shape[0]), min(rgb.shape[1], labels.shape[1])
        detail = Detail(rgb[:h, :w], labels[:h, :w],
                        (box.y0 / per_px, box.x0 / per_px, box.y1 / per_px, box.x1 / per_px),
                        d * mpp)
    write_preview(path, thumb, labels_thumb, tissue_thumb,
                  um_per_px=per_px * mpp, density=density, detail=detail)
