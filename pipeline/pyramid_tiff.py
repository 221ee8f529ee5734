"""Write tiled pyramidal TIFFs that OpenSlide and QuPath open (test slides, demo, benchmarks).

OpenSlide generic-tiff findings (probed with OpenSlide 4.0.1, openslide-python 1.4.7 and
tifffile 2026.3.3; the layout we rely on is asserted in ``tests/test_synthetic.py``):

* Level 0 (the first IFD) must be **tiled**; a stripped TIFF is refused ("Unsupported or
  missing image file"), so the tifffile backend of ``pipeline.slide`` takes it. Tile
  shapes need not be square (128 x 192 opens).
* Pyramid levels are further **top-level IFDs** (successive pages), tiled, with
  ``NewSubfileType = 1`` (the "reduced resolution" bit). That bit is *required*: tiled
  pages without it are ignored (the slide opens with one level), and so are stripped
  pages and **SubIFDs** (a QuPath/OME-style SubIFD pyramid opens with one level). This is
  OpenSlide's documented rule (openslide.org/formats/generic-tiff: "any other tiled
  images ... with the reduced resolution bit set"). Downsamples need not be 2 (a 3x page
  is accepted, reported with its measured downsample).
* ``openslide.mpp-x`` / ``-y`` come from ``XResolution`` / ``YResolution`` when
  ``ResolutionUnit`` is CENTIMETER (mpp = 10000 / XResolution) or INCH (25400 /
  XResolution); with unit NONE, or tifffile's default resolution tags, there is no mpp.
  We write CENTIMETER (each lower level with its own, coarser resolution).
* Vendor is ``generic-tiff``; BigTIFF is accepted; tifffile writes ``compression="jpeg"``
  RGB as YCbCr JPEG with 2x2 chroma subsampling (Photometric 6), which OpenSlide decodes
  (level 0 within a few grey levels: mean abs error ~4 at quality 90); zlib tiles are
  lossless.
* An OME-TIFF with a SubIFD pyramid (``write_ome_tiff``) opens in OpenSlide as generic-tiff
  with a single level (SubIFDs ignored) - the pipeline reads OME-TIFF with tifffile.

Writes are atomic (temporary name next to the target, then ``os.replace``), so a slide that
exists is complete, as everywhere in the pipeline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from pipeline.atomic import atomic_path
from pipeline.types import Box

log = logging.getLogger(__name__)

__all__ = ["downsample2", "pyramid_shapes", "write_ome_tiff", "write_pyramidal_tiff",
           "write_pyramidal_tiff_tiles"]

COARSEST = 1024  # stop adding levels once the longest side is below this

TileSource = Callable[[Box], np.ndarray] | Iterable[np.ndarray]


def pyramid_shapes(height: int, width: int, coarsest: int = COARSEST,
                   levels: int | None = None) -> list[tuple[int, int]]:
    """Level shapes: level 0, then halvings (ceil) until the longest side is < ``coarsest``
    (``levels=None``), or exactly ``levels`` levels (level 0 included; at most until both
    sides are 1 px)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    shapes = [(height, width)]
    if levels is None:
        while max(shapes[-1]) >= coarsest:
            h, w = shapes[-1]
            shapes.append((-(-h // 2), -(-w // 2)))
        return shapes
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    while len(shapes) < levels:
        h, w = shapes[-1]
        if (h, w) == (1, 1):
            raise ValueError(f"{height}x{width} has at most {len(shapes)} levels, asked for {levels}")
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
                         levels: int | None = None, compression: str = "jpeg", quality: int = 90) -> Path:
    """Write ``rgb`` (uint8 H x W x 3) as a tiled BigTIFF pyramid OpenSlide opens as
    generic-tiff with ``openslide.mpp-x == mpp`` (layout: see the module docstring).
    Levels: level 0, then 2x box-downsampled top-level IFDs until the longest side is
    < 1024 px, or ``levels`` levels in all. ``compression``: "jpeg" (``quality``), "zlib"
    (lossless), "none", or another tifffile codec. Atomic. Returns the path.
    For slides bigger than memory use :func:`write_pyramidal_tiff_tiles`."""
    _check_mpp(mpp)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"need uint8 (H, W, 3) RGB, got {rgb.dtype} {rgb.shape}")
    path = Path(path)
    shapes = pyramid_shapes(*rgb.shape[:2], levels=levels)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        level = np.ascontiguousarray(rgb)
        for k in range(len(shapes)):
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


def _tiles_from_iter(shape: tuple[int, int], tile: int, tiles: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Check and pad tiles given in row-major order (each the clipped tile box's shape, or
    full tile size), so a wrong count or shape fails loudly instead of writing a shifted
    slide."""
    h, w = shape
    boxes = [Box(y, x, min(y + tile, h), min(x + tile, w))
             for y in range(0, h, tile) for x in range(0, w, tile)]
    it = iter(tiles)
    for n, box in enumerate(boxes):
        px = next(it, None)
        if px is None:
            raise ValueError(f"tile iterator ended after {n} tiles; {shape} needs "
                             f"{len(boxes)} of {tile}x{tile}")
        px = np.asarray(px, dtype=np.uint8)
        if px.shape not in (box.shape + (3,), (tile, tile, 3)):
            raise ValueError(f"tile {n} ({box}) has shape {px.shape}, expected {box.shape + (3,)}")
        if px.shape[:2] != (tile, tile):
            px = np.pad(px, ((0, tile - px.shape[0]), (0, tile - px.shape[1]), (0, 0)), mode="edge")
        # tifffile stops pulling after the last tile: check for extras before handing it over
        if n == len(boxes) - 1 and next(it, None) is not None:
            raise ValueError(f"tile iterator has more than the {len(boxes)} tiles {shape} needs")
        yield px


def write_pyramidal_tiff_tiles(path: str | os.PathLike[str], shape: tuple[int, int], tiles: TileSource, *,
                               mpp: float, tile: int = 256, levels: int | None = None,
                               compression: str = "jpeg", quality: int = 90) -> Path:
    """Write a slide given tile by tile as the same pyramid as :func:`write_pyramidal_tiff`,
    without holding it in memory.

    ``tiles`` is either a callable ``f(box) -> RGB`` (level-0 boxes of at most tile x tile,
    asked in row-major order, once each) or an iterable of RGB tiles in row-major order
    (edge tiles either clipped to the image or full size; a wrong count or shape raises).

    Level 0 is streamed from ``tiles``. Each lower level is streamed from the level just
    written, read back from the (temporary) file by 2x2 tiles through tifffile's zarr
    store and box-downsampled, then appended as the next top-level IFD
    (``TiffWriter(append=True)``), so memory stays at a few tiles whatever the slide size
    and the source is asked for each level-0 pixel once. Lower levels of a JPEG slide are
    made from the decoded JPEG, as scanners do.
    """
    _check_mpp(mpp)
    import zarr

    path = Path(path)
    shapes = pyramid_shapes(*shape, levels=levels)
    level0 = (_tiles_from_fn(shapes[0], tile, tiles) if callable(tiles)
              else _tiles_from_iter(shapes[0], tile, tiles))
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
            tw.write(level0, shape=shapes[0] + (3,), dtype=np.uint8,
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
                   levels: int | None = None, compression: str = "zlib") -> Path:
    """Write ``rgb`` as a tiled pyramidal OME-TIFF like QuPath exports: OME-XML with
    ``PhysicalSizeX/Y`` in µm, level 0 as the main IFD and 2x downsampled levels as SubIFDs
    (OpenSlide sees only level 0 of this layout; tifffile and QuPath read the pyramid).
    Why: to test the tifffile fallback of ``pipeline.slide`` on the files QuPath writes."""
    _check_mpp(mpp)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"need uint8 (H, W, 3) RGB, got {rgb.dtype} {rgb.shape}")
    path = Path(path)
    shapes = pyramid_shapes(*rgb.shape[:2], levels=levels)
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
