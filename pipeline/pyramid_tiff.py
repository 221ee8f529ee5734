"""Write tiled pyramidal TIFFs that OpenSlide and QuPath open (test slides, demo, benchmarks).

OpenSlide generic-tiff findings (checked with OpenSlide 4.0.1 and tifffile 2026.3.3 in
``tests/test_synthetic.py``):

* Level 0 must be **tiled**; a stripped TIFF is refused ("Unsupported or missing image
  file"), so the tifffile backend of ``pipeline.slide`` takes it.
* Pyramid levels are further **top-level IFDs** (tiled, each smaller than the previous);
  OpenSlide ignores SubIFDs, so a QuPath/OME-style SubIFD pyramid opens with one level.
  We mark them ``NewSubfileType = 1`` (reduced resolution), as scanners do.
* ``openslide.mpp-x`` / ``-y`` are derived from ``XResolution`` / ``YResolution`` only
  when ``ResolutionUnit`` is CENTIMETER (mpp = 10000 / XResolution) or INCH (25400 /
  XResolution); with unit NONE there is no mpp. We write CENTIMETER.
* Vendor is ``generic-tiff``; BigTIFF is accepted; tifffile writes ``compression="jpeg"``
  RGB as YCbCr JPEG with 2x2 chroma subsampling (Photometric 6), which OpenSlide decodes
  (level 0 within a few grey levels: mean abs error ~4); zlib tiles are lossless.
* An OME-TIFF with a SubIFD pyramid (``write_ome_tiff``) opens in OpenSlide as generic-tiff
  with a single level (SubIFDs ignored) - the pipeline reads OME-TIFF with tifffile.

Writes are atomic (temporary name next to the target, then ``os.replace``), so a slide that
exists is complete, as everywhere in the pipeline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from pipeline.atomic import atomic_path
from pipeline.types import Box

log = logging.getLogger(__name__)

__all__ = ["pyramid_shapes", "write_ome_tiff", "write_pyramidal_tiff", "write_pyramidal_tiff_tiles"]

COARSEST = 1024  # stop adding levels once the longest side is below this


def pyramid_shapes(height: int, width: int, coarsest: int = COARSEST) -> list[tuple[int, int]]:
    """Level shapes: level 0, then halvings (ceil) until the longest side is < ``coarsest``."""
    shapes = [(height, width)]
    while max(shapes[-1]) >= coarsest:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def downsample2(rgb: np.ndarray) -> np.ndarray:
    """2x box (mean) downsample; an odd last row/column is averaged with itself."""
    h, w = rgb.shape[:2]
    if h % 2 or w % 2:
        rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    acc = rgb.reshape(rgb.shape[0] // 2, 2, rgb.shape[1] // 2, 2, -1).astype(np.uint16).sum(axis=(1, 3))
    return ((acc + 2) // 4).astype(np.uint8)


def _codec_kwargs(compression: str, quality: int) -> dict[str, Any]:
    if compression in (None, "none", ""):
        return {"compression": None}
    if compression == "jpeg":
        return {"compression": "jpeg", "compressionargs": {"level": int(quality)}}
    return {"compression": compression}


def _page_kwargs(mpp: float, tile: int, compression: str, quality: int, level: int) -> dict[str, Any]:
    px_per_cm = 1e4 / (mpp * 2**level)  # lower levels: their own (coarser) pixel size
    return {"tile": (tile, tile), "photometric": "rgb", "planarconfig": "contig",
            "resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER",
            "subfiletype": 1 if level else 0, "metadata": None,
            **_codec_kwargs(compression, quality)}


def _check_mpp(mpp: float) -> None:
    if not (mpp > 0 and np.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number, got {mpp}")


def write_pyramidal_tiff(path: str | os.PathLike[str], rgb: np.ndarray, *, mpp: float, tile: int = 256,
                         compression: str = "jpeg", quality: int = 90) -> Path:
    """Write ``rgb`` (uint8 H x W x 3) as a tiled BigTIFF pyramid OpenSlide opens as
    generic-tiff with ``openslide.mpp-x == mpp``. Levels: level 0, then 2x box-downsampled
    top-level IFDs until the longest side is < 1024 px. Returns the path."""
    _check_mpp(mpp)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"need uint8 (H, W, 3) RGB, got {rgb.dtype} {rgb.shape}")
    path = Path(path)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        level = np.ascontiguousarray(rgb)
        for k in range(len(pyramid_shapes(*rgb.shape[:2]))):
            if k:
                level = downsample2(level)
            tw.write(level, **_page_kwargs(mpp, tile, compression, quality, k))
    log.info("wrote %s (%dx%d, %.4g µm/px)", path, rgb.shape[1], rgb.shape[0], mpp)
    return path


def _tiles_from_fn(shape: tuple[int, int], tile: int,
                   fn: Callable[[Box], np.ndarray]) -> Iterator[np.ndarray]:
    """Row-major full-size tiles (edge tiles padded with edge pixels) of an image given by
    ``fn(box)``; this is the order and shape tifffile expects for tiled pages."""
    h, w = shape
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            box = Box(y, x, min(y + tile, h), min(x + tile, w))
            px = np.asarray(fn(box), dtype=np.uint8)
            if px.shape != box.shape + (3,):
                raise ValueError(f"tile_fn({box}) returned shape {px.shape}, expected {box.shape + (3,)}")
            if px.shape[:2] != (tile, tile):
                px = np.pad(px, ((0, tile - px.shape[0]), (0, tile - px.shape[1]), (0, 0)), mode="edge")
            yield px


def write_pyramidal_tiff_tiles(path: str | os.PathLike[str], shape: tuple[int, int],
                               tile_fn: Callable[[Box], np.ndarray], *, mpp: float, tile: int = 256,
                               compression: str = "jpeg", quality: int = 90) -> Path:
    """Write a slide given by ``tile_fn(box) -> RGB`` (level-0 boxes of at most tile x tile)
    as the same pyramid as :func:`write_pyramidal_tiff`, without holding it in memory.

    Level 0 is streamed from ``tile_fn``. Each lower level is streamed from the level just
    written, read back from the (temporary) file by 2x2 tiles through tifffile's zarr store
    and box-downsampled, then appended as the next top-level IFD (``TiffWriter(append=True)``),
    so memory stays at a few tiles whatever the slide size and ``tile_fn`` runs once per
    level-0 pixel. Lower levels of a JPEG slide are made from the decoded JPEG, as scanners do.
    """
    _check_mpp(mpp)
    import zarr

    path = Path(path)
    shapes = pyramid_shapes(*shape)
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
            tw.write(_tiles_from_fn(shapes[0], tile, tile_fn), shape=shapes[0] + (3,), dtype=np.uint8,
                     **_page_kwargs(mpp, tile, compression, quality, 0))
        for k in range(1, len(shapes)):
            with tifffile.TiffFile(tmp) as tf:
                prev = zarr.open(tf.pages[k - 1].aszarr(), mode="r")
                ph, pw = shapes[k - 1]

                def from_prev(box: Box, prev: Any = prev, ph: int = ph, pw: int = pw) -> np.ndarray:
                    src = prev[2 * box.y0:min(2 * box.y1, ph), 2 * box.x0:min(2 * box.x1, pw)]
                    return downsample2(np.asarray(src))[: box.height, : box.width]

                with tifffile.TiffWriter(tmp, append=True) as tw:
                    tw.write(_tiles_from_fn(shapes[k], tile, from_prev), shape=shapes[k] + (3,),
                             dtype=np.uint8, **_page_kwargs(mpp, tile, compression, quality, k))
    log.info("wrote %s (%dx%d, %d levels, %.4g µm/px)", path, shape[1], shape[0], len(shapes), mpp)
    return path


def write_ome_tiff(path: str | os.PathLike[str], rgb: np.ndarray, mpp: float, *, tile: int = 256,
                   compression: str = "zlib") -> Path:
    """Write ``rgb`` as a tiled pyramidal OME-TIFF like QuPath exports: OME-XML with
    ``PhysicalSizeX/Y`` in µm, level 0 as the main IFD and 2x downsampled levels as SubIFDs
    (OpenSlide does not read this layout; tifffile and QuPath do)."""
    _check_mpp(mpp)
    path = Path(path)
    shapes = pyramid_shapes(*rgb.shape[:2])
    opts = {"tile": (tile, tile), "photometric": "rgb", **_codec_kwargs(compression, 90),
            "resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        tw.write(rgb, subifds=len(shapes) - 1,
                 metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                           "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}, **opts)
        level = rgb
        for k in range(1, len(shapes)):
            level = downsample2(level)
            r = 1e4 / (mpp * 2**k)
            tw.write(level, subfiletype=1, metadata=None, **{**opts, "resolution": (r, r)})
    log.info("wrote %s (%dx%d, OME, %.4g µm/px)", path, rgb.shape[1], rgb.shape[0], mpp)
    return path
