"""The OpenSlide backend: every format OpenSlide knows (SVS, NDPI, MRXS, DICOM, generic TIFF...).

OpenSlide generic-tiff facts (measured with OpenSlide 4.0.1 on TIFFs written by tifffile,
see ``tests/test_slide.py``):

* level 0 must be *tiled*; a stripped TIFF is ``OpenSlideUnsupportedFormatError``
  ("Unsupported or missing image file") and goes to tifffile;
* pyramid levels are further *top-level* IFDs, tiled, whose ``NewSubfileType`` has the
  reduced-image bit (``subfiletype=1``); without it, or in SubIFDs, they are ignored and the
  slide has one level;
* ``openslide.mpp-x/y`` = 10000 / XResolution (``ResolutionUnit`` CENTIMETER) or
  25400 / XResolution (INCH); with unit NONE, or no resolution tags, there is no mpp.
  tifffile writes INCH when ``resolution`` is given without ``resolutionunit``, so pass
  the unit explicitly;
* JPEG, zlib, LZW and zstd tiles are decoded; JPEG-XL (50002) and WebP (50001) make the open
  fail with ``OpenSlideError`` ("Unsupported TIFF compression"), which ``open_slide`` also
  answers with tifffile (imagecodecs decodes both).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.discovery import slide_id
from pipeline.errors import SlideReadError
from pipeline.slide.reader import DEFAULT_STORED_TILE, FileSlideReader, one_line
from pipeline.types import Box, Level, SlideInfo

log = logging.getLogger(__name__)

# OpenSlide's read buffer is w*h uint32 from ctypes; large reads are split into chunks
MAX_READ = 4096
# reads of levels with non-integer downsamples start on this grid (see _read_anchored)
ANCHOR = 512


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite non-premultiplied RGBA on white (transparent = no scanned data = glass)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class OpenSlideReader(FileSlideReader):
    """OpenSlide backend; the handle opens lazily so the reader pickles as its path."""

    backend = "openslide"

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._slide: Any = None
        self.info = self._make_info(self._handle())

    def _handle(self) -> Any:
        import openslide

        if self._slide is None:
            with self._lock:
                if self._slide is None:
                    try:
                        self._slide = openslide.OpenSlide(self.path)
                    except (openslide.OpenSlideError, OSError) as exc:
                        # includes OpenSlideUnsupportedFormatError; open_slide then tries
                        # tifffile with the cause
                        raise SlideReadError(f"{self.path}: OpenSlide cannot open it: "
                                             f"{one_line(exc)}") from exc
        return self._slide

    def _make_info(self, slide: Any) -> SlideInfo:
        import openslide

        props = dict(slide.properties)
        mpp_x = props.get(openslide.PROPERTY_NAME_MPP_X)
        try:
            mpp = float(mpp_x) if mpp_x not in (None, "") else None
        except ValueError:
            mpp = None
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            mpp = None
        try:
            mpp_y = float(props.get(openslide.PROPERTY_NAME_MPP_Y) or "nan")
        except ValueError:
            mpp_y = math.nan
        if mpp is not None and math.isfinite(mpp_y) and abs(mpp_y / mpp - 1) > 0.01:
            log.warning("%s: non-square pixels (mpp-x %s, mpp-y %s): using mpp-x", self.path,
                        mpp, mpp_y)
        levels = tuple(Level(int(w), int(h), float(ds))
                       for (w, h), ds in zip(slide.level_dimensions, slide.level_downsamples))
        bounds = (int(props.get(openslide.PROPERTY_NAME_BOUNDS_X) or 0),
                  int(props.get(openslide.PROPERTY_NAME_BOUNDS_Y) or 0))
        w0, h0 = slide.dimensions
        return SlideInfo(path=self.path, slide_id=slide_id(self.path), width=int(w0),
                         height=int(h0), mpp=mpp, levels=levels, backend=self.backend,
                         vendor=props.get(openslide.PROPERTY_NAME_VENDOR) or "",
                         bounds_xy=bounds, properties=props)

    def tile_shape(self, level: int) -> tuple[int, int]:
        props = self.info.properties
        try:
            return (int(props[f"openslide.level[{level}].tile-height"]),
                    int(props[f"openslide.level[{level}].tile-width"]))
        except (KeyError, ValueError):
            return DEFAULT_STORED_TILE

    def _read(self, level: int, box: Box) -> np.ndarray:
        ds = self.info.levels[level].downsample
        if ds != int(ds):
            return self._read_anchored(level, box)
        if box.height > MAX_READ or box.width > MAX_READ:
            return _read_chunked(self._read, level, box)
        return self._read_at(level, box)

    def _read_at(self, level: int, box: Box) -> np.ndarray:
        """One OpenSlide call (location in level-0 pixels, size in level pixels)."""
        import openslide

        ds = self.info.levels[level].downsample
        location = (int(round(box.x0 * ds)), int(round(box.y0 * ds)))
        try:
            image = self._handle().read_region(location, level, (box.width, box.height))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(f"{self.path}: OpenSlide cannot read level {level} {box}: "
                                 f"{exc}") from exc
        return rgba_to_rgb(np.asarray(image))

    def _read_anchored(self, level: int, box: Box) -> np.ndarray:
        """Reads of a level with a non-integer downsample, made box-independent.

        OpenSlide converts the level-0 location back with ``x / downsample``; when that is
        not an integer it paints the level with a sub-pixel shift (interpolated), so a
        pixel's value depends on where the read started. Every pixel is therefore read in
        a call that starts at the corner of its ANCHOR x ANCHOR block (the read size does
        not change values, checked on ``boxes.tiff``), which makes reads bit-reproducible.
        """
        out = np.empty((box.height, box.width, 3), dtype=np.uint8)
        for by in range(box.y0 // ANCHOR * ANCHOR, box.y1, ANCHOR):
            for bx in range(box.x0 // ANCHOR * ANCHOR, box.x1, ANCHOR):
                y1, x1 = min(by + ANCHOR, box.y1), min(bx + ANCHOR, box.x1)
                block = self._read_at(level, Box(by, bx, y1, x1))
                part = Box(max(by, box.y0), max(bx, box.x0), y1, x1)
                out[part.slices((box.y0, box.x0))] = block[part.slices((by, bx))]
        return out

    def close(self) -> None:
        with self._lock:
            if self._slide is not None:
                self._slide.close()
                self._slide = None

    def _forget(self) -> None:
        self._slide = None



def _read_chunked(read: Callable[[int, Box], np.ndarray], level: int, box: Box) -> np.ndarray:
    """A big box as MAX_READ-sized reads (OpenSlide overflows on huge buffers)."""
    out = np.empty((box.height, box.width, 3), dtype=np.uint8)
    for y in range(box.y0, box.y1, MAX_READ):
        for x in range(box.x0, box.x1, MAX_READ):
            part = Box(y, x, min(y + MAX_READ, box.y1), min(x + MAX_READ, box.x1))
            out[part.slices((box.y0, box.x0))] = read(level, part)
    return out
