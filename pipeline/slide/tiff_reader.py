"""Slide readers behind one interface, the read plan, and model-resolution region reads.

This is the only module that imports OpenSlide or tifffile for slides. Three readers:

* ``OpenSlideReader``: every format OpenSlide knows (SVS, NDPI, MRXS, DICOM, generic TIFF...).
* ``TiffFileReader``: tifffile fallback for what OpenSlide refuses (OME-TIFF, plain TIFF).
* ``MemorySlide``: a numpy array or a pixel-generating callable (tests, benchmarks).

Readers are picklable: the state is the path (or the array / callable) and the handle is
reopened lazily in the receiving process, because Dask workers are spawned and OpenSlide /
tifffile handles must never be shared across processes.

``read_region`` turns a model-pixel box into RGB pixels such that a model pixel's value does
not depend on the box it was read with (bit-identical overlaps); the exact stitcher relies
on it. Out-of-image pixels mirror the image (``numpy`` ``reflect``).

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

import copy
import dataclasses
import logging
import math
import threading
import uuid
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.discovery import slide_id
from pipeline.errors import ConfigError, MissingMppError, SlideReadError
from pipeline.types import Box, Level, ReadPlan, SlideInfo

log = logging.getLogger(__name__)

MEMORY_SCHEME = "memory://"
# OpenSlide's read buffer is w*h uint32 from ctypes; large reads are split into chunks
MAX_READ = 4096
# reads of levels with non-integer downsamples start on this grid (see _read_anchored)
ANCHOR = 512
# pyramids of in-memory slides stop once the level fits in this many pixels
MEMORY_COARSEST = 1024

PixelFn = Callable[[int, Box], np.ndarray]


# --------------------------------------------------------------------------- readers


DAMAGED_FILL = 255  # white, like glass: the network finds no nuclei in it
DEFAULT_STORED_TILE = (256, 256)  # damage unit when a format does not tell its tile size
# A slide at most this much coarser than the model is upsampled (a 10x scan for a 40x model);
# coarser ones are refused: beyond it nuclei are a few pixels wide, and a wrong pixel size
# (a 72-dpi TIFF tag: 352.8 µm/px) would otherwise plan hundreds of thousands of tiles.
MAX_UPSAMPLE = 4.0
SCREEN_DPI = (72, 96, 150, 300, 600)  # resolution-tag defaults of image editors, not scanners


class SlideReader(ABC):
    """One slide: ``info`` plus RGB reads of any pyramid level.

    ``read_level`` validates the box so that every backend fails the same way; backends
    implement ``_read`` for a box that is known to lie inside the level.
    """

    info: SlideInfo
    # Reads (or stored tiles, when reading around damage) that succeeded, and how many
    # times a damaged stored tile was filled: callers compare counts before and after
    # their reads. Class-level zeros; ``+=`` makes them per reader.
    reads_ok: int = 0
    damage_fills: int = 0

    def read_level(self, level: int, box: Box) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``box`` in pixels of ``level`` (must lie inside it).

        A read that fails is retried tile by tile on the file's own tile grid; tiles that
        still cannot be read (a damaged JPEG tile) are painted ``DAMAGED_FILL`` and recorded
        in ``damaged``. Because damage is per stored tile, every read that covers a damaged
        tile sees the same fill, so overlapping windows still see identical pixels (exact
        stitching) and only the nuclei on or next to the damage are lost.
        """
        if not 0 <= level < len(self.info.levels):
            raise ValueError(f"level {level} out of range (slide has {len(self.info.levels)})")
        lv = self.info.levels[level]
        if box.is_empty() or box.y0 < 0 or box.x0 < 0 or box.y1 > lv.height or box.x1 > lv.width:
            raise ValueError(f"{box} is empty or not inside level {level} "
                             f"({lv.height} x {lv.width})")
        try:
            out = self._read(level, box)
            self.reads_ok += 1
        except SlideReadError:
            out = self._read_around_damage(level, box)
        if out.shape != (box.height, box.width, 3) or out.dtype != np.uint8:
            raise SlideReadError(f"{self.info.path}: reader returned {out.shape} {out.dtype} "
                                 f"for {box} at level {level}")
        return out

    @abstractmethod
    def _read(self, level: int, box: Box) -> np.ndarray:
        """RGB uint8 of a box inside the level."""

    def tile_shape(self, level: int) -> tuple[int, int]:
        """The (height, width) of the tiles the level is stored in (``DEFAULT_STORED_TILE``
        when the format does not say): the unit in which a file is damaged."""
        return DEFAULT_STORED_TILE

    @property
    def damaged(self) -> dict[tuple[int, Box], str]:
        """``(level, box in level pixels) -> error`` of each stored tile that could not be
        read by this reader (filled with ``DAMAGED_FILL``)."""
        return self.__dict__.setdefault("_damaged", {})


    def _read_around_damage(self, level: int, box: Box) -> np.ndarray:
        self.close()  # e.g. OpenSlide refuses every read after an error: a fresh handle
        out = np.empty((box.height, box.width, 3), np.uint8)
        th, tw = self.tile_shape(level)
        for y in range(box.y0 // th * th, box.y1, th):
            for x in range(box.x0 // tw * tw, box.x1, tw):
                part = Box(max(y, box.y0), max(x, box.x0), min(y + th, box.y1), min(x + tw, box.x1))
                dst = out[part.slices((box.y0, box.x0))]
                cell = Box(y, x, y + th, x + tw)
                if (level, cell) in self.damaged:
                    dst[...] = DAMAGED_FILL
                    self.damage_fills += 1
                    continue
                try:
                    dst[...] = self._read(level, part)
                    self.reads_ok += 1
                except SlideReadError as exc:
                    self.damaged[(level, cell)] = _one_line(exc)
                    log.warning("%s: level %d, stored tile at y %d, x %d cannot be read (%s); "
                                "painted as glass", self.info.path, level, y, x, _one_line(exc))
                    dst[...] = DAMAGED_FILL
                    self.damage_fills += 1
                    self.close()  # e.g. OpenSlide refuses every read after an error
        return out

    def close(self) -> None:  # noqa: B027 - readers without handles need nothing
        """Release file handles (reads after ``close`` reopen lazily)."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.path!r})"


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite non-premultiplied RGBA on white (transparent = no scanned data = glass)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class OpenSlideReader(SlideReader):
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
                                             f"{_one_line(exc)}") from exc
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

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "info": self.info}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.info = state["info"]
        self._lock = threading.Lock()
        self._slide = None


_OME_UNITS_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0,
                 "mm": 1e3, "cm": 1e4, "dm": 1e5, "m": 1e6, "Å": 1e-4, "angstrom": 1e-4}


def ome_mpp(ome_xml: str | None) -> float | None:
    """µm per pixel of the first OME ``Pixels`` element (``PhysicalSizeX`` + unit)."""
    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        size = element.get("PhysicalSizeX")
        if size is None:
            return None
        factor = _OME_UNITS_UM.get(element.get("PhysicalSizeXUnit", "µm"))
        try:
            mpp = float(size) * factor if factor is not None else None
        except ValueError:
            return None
        return mpp if mpp and math.isfinite(mpp) and mpp > 0 else None
    return None


def tiff_resolution_mpp(page: Any) -> float | None:
    """µm per pixel from XResolution / ResolutionUnit (None without a physical unit)."""
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    unit = int(tags["ResolutionUnit"].value)
    num, den = tags["XResolution"].value
    if not num or not den:
        return None
    per_unit = num / den  # pixels per unit
    um = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre
    return um / per_unit if um is not None else None


class TiffFileReader(SlideReader):
    """tifffile backend (OME-TIFF, plain TIFF); reads only the requested region through
    the series' zarr store, so a large file is never loaded whole."""

    backend = "tifffile"

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._tiff: Any = None
        self._arrays: dict[int, Any] = {}
        self._open()
        self.info = self._make_info()
        # decode one pixel now: tifffile opens files whose tiles it cannot decode (unknown
        # compression), and such a slide must fail at open, naming the cause, not per tile
        try:
            self._read(len(self.info.levels) - 1, Box(0, 0, 1, 1))  # strict: no damage fill
        except SlideReadError:
            self.close()
            raise

    def _open(self) -> Any:
        import tifffile

        if self._tiff is None:
            with self._lock:
                if self._tiff is None:
                    tiff = None
                    try:
                        tiff = tifffile.TiffFile(self.path)
                        series = tiff.series[0]
                        self._layout = _tiff_layout(series.axes, series.shape)
                    except Exception as exc:
                        if tiff is not None:
                            tiff.close()
                        raise SlideReadError(f"{self.path}: tifffile cannot open it: {exc}") from exc
                    if series.dtype != np.uint8:
                        tiff.close()
                        raise SlideReadError(f"{self.path}: pixel type {series.dtype} is not "
                                             "supported (8-bit RGB expected)")
                    self._series = series
                    self._tiff = tiff
        return self._tiff

    def tile_shape(self, level: int) -> tuple[int, int]:
        self._open()
        page = self._series.levels[level].pages[0]
        if getattr(page, "is_tiled", False) and page.tilelength and page.tilewidth:
            return int(page.tilelength), int(page.tilewidth)
        rows = int(getattr(page, "rowsperstrip", 0) or 0)  # a strip spans the full width
        if rows:
            return rows, int(self.info.levels[level].width)
        return DEFAULT_STORED_TILE

    def _make_info(self) -> SlideInfo:
        tiff = self._tiff
        series = self._series
        shapes = [lv.shape for lv in series.levels]
        y_ax, x_ax = self._layout[0], self._layout[1]
        h0, w0 = shapes[0][y_ax], shapes[0][x_ax]
        levels = []
        for shape in shapes:
            h, w = shape[y_ax], shape[x_ax]
            levels.append(Level(int(w), int(h), (h0 / h + w0 / w) / 2))
        mpp = ome_mpp(tiff.ome_metadata) if tiff.is_ome else None
        if mpp is None:
            mpp = tiff_resolution_mpp(series.pages[0] if series.pages else tiff.pages[0])
        page = tiff.pages[0]
        props = {f"tiff.{tag.name}": str(tag.value)[:1000] for tag in page.tags.values()
                 if tag.name in ("ImageDescription", "Software", "Make", "Model", "DateTime",
                                 "XResolution", "YResolution", "ResolutionUnit")}
        props["tifffile.series-axes"] = series.axes
        return SlideInfo(path=self.path, slide_id=slide_id(self.path), width=int(w0),
                         height=int(h0), mpp=mpp, levels=tuple(levels), backend=self.backend,
                         vendor="ome-tiff" if tiff.is_ome else "tiff", properties=props)

    def _array(self, level: int) -> Any:
        import zarr

        self._open()
        with self._lock:
            if level not in self._arrays:
                self._arrays[level] = zarr.open(self._series.aszarr(level=level), mode="r")
            return self._arrays[level]

    def _read(self, level: int, box: Box) -> np.ndarray:
        try:
            array = self._array(level)  # opens the file (and sets the layout) after unpickling
            y_ax, x_ax, c_ax = self._layout
            index: list[Any] = [0] * array.ndim
            index[y_ax] = slice(box.y0, box.y1)
            index[x_ax] = slice(box.x0, box.x1)
            if c_ax is not None:
                index[c_ax] = slice(0, 3)  # an alpha channel (4th sample) is dropped
            data = np.asarray(array[tuple(index)])
        except SlideReadError:
            raise
        except Exception as exc:
            raise SlideReadError(f"{self.path}: cannot read level {level} {box}: {exc}") from exc
        # remaining axes are (y, x[, c]) in their original order
        kept = sorted(a for a in (y_ax, x_ax, c_ax) if a is not None)
        order = [kept.index(y_ax), kept.index(x_ax)] + ([kept.index(c_ax)] if c_ax is not None else [])
        data = np.transpose(data, order)
        if c_ax is None:
            data = np.repeat(data[..., None], 3, axis=2)
        return np.ascontiguousarray(data, dtype=np.uint8)

    def close(self) -> None:
        with self._lock:
            if self._tiff is not None:
                self._tiff.close()
            self._tiff = None
            self._arrays = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "info": self.info}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.info = state["info"]
        self._lock = threading.Lock()
        self._tiff = None
        self._arrays = {}


def _tiff_layout(axes: str, shape: tuple[int, ...]) -> tuple[int, int, int | None]:
    """Axis positions of Y, X and the colour axis (S or C with 3-4 samples; None = grey)."""
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"series axes {axes!r} have no Y and X")
    colour = None
    for name in ("S", "C"):
        if name in axes and shape[axes.index(name)] in (3, 4):
            colour = axes.index(name)
            break
    if colour is None and any(n > 1 for a, n in zip(axes, shape) if a in "SC"):
        raise ValueError(f"series axes {axes!r} shape {shape} are not RGB or grey")
    return axes.index("Y"), axes.index("X"), colour


def _read_chunked(read: Callable[[int, Box], np.ndarray], level: int, box: Box) -> np.ndarray:
    """A big box as MAX_READ-sized reads (OpenSlide overflows on huge buffers)."""
    out = np.empty((box.height, box.width, 3), dtype=np.uint8)
    for y in range(box.y0, box.y1, MAX_READ):
        for x in range(box.x0, box.x1, MAX_READ):
            part = Box(y, x, min(y + MAX_READ, box.y1), min(x + MAX_READ, box.x1))
            out[part.slices((box.y0, box.x0))] = read(level, part)
    return out


def box_downsample2(rgb: np.ndarray) -> np.ndarray:
    """2x box average (odd edges replicate), rounded: the next level of a memory pyramid."""
    h, w = rgb.shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    if h % 2 or w % 2:
        rgb = np.pad(rgb, pad, mode="edge")
    s = rgb.reshape(rgb.shape[0] // 2, 2, rgb.shape[1] // 2, 2, 3).astype(np.uint16).sum(axis=(1, 3))
    return ((s + 2) // 4).astype(np.uint8)


def _memory_levels(height: int, width: int) -> tuple[Level, ...]:
    """Downsamples 1, 2, 4, ... (sizes ceil-divided) until the level fits MEMORY_COARSEST."""
    levels = [Level(width, height, 1.0)]
    while max(levels[-1].width, levels[-1].height) > MEMORY_COARSEST:
        last = levels[-1]
        levels.append(Level(-(-last.width // 2), -(-last.height // 2), last.downsample * 2))
    return tuple(levels)


class MemorySlide(SlideReader):
    """A slide held in memory (``rgb`` array) or generated on demand (``procedural``).

    ``info.path`` is ``memory://<name>``; ``register_memory_slide`` makes that path
    resolvable by ``open_slide`` in this process (serial executor). In other processes the
    path means nothing: pass the pickled slide itself instead.
    """

    backend = "memory"

    def __init__(self, rgb: np.ndarray, mpp: float | None, name: str | None = None):
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"MemorySlide needs RGB uint8 (h, w, 3), got {rgb.shape} {rgb.dtype}")
        self._fn: PixelFn | None = None
        self._pyramid: list[np.ndarray] = [rgb]
        self._setup(rgb.shape[0], rgb.shape[1], mpp, name, "array")

    @classmethod
    def procedural(cls, height: int, width: int, mpp: float | None, fn: PixelFn,
                   name: str | None = None) -> MemorySlide:
        """A slide whose pixels ``fn(level, box) -> RGB uint8`` are made on demand, so that
        benchmarks can fake gigapixel slides (levels: downsample 1, 2, 4, ... ~1k px)."""
        self = cls.__new__(cls)
        self._fn = fn
        self._pyramid = []
        self._setup(height, width, mpp, name, getattr(fn, "__name__", "procedural"))
        return self

    def _setup(self, height: int, width: int, mpp: float | None, name: str | None,
               kind: str) -> None:
        name = name or f"{kind}-{height}x{width}-{uuid.uuid4().hex[:8]}"
        self.info = SlideInfo(path=MEMORY_SCHEME + name, slide_id=name, width=int(width),
                              height=int(height), mpp=mpp, levels=_memory_levels(height, width),
                              backend=self.backend, vendor="memory",
                              properties={"memory.kind": kind})
        self._lock = threading.Lock()

    def _level_array(self, level: int) -> np.ndarray:
        with self._lock:
            while len(self._pyramid) <= level:
                self._pyramid.append(box_downsample2(self._pyramid[-1]))
            return self._pyramid[level]

    def _read(self, level: int, box: Box) -> np.ndarray:
        if self._fn is not None:
            out = np.asarray(self._fn(level, box))
            if out.shape != (box.height, box.width, 3):
                raise SlideReadError(f"{self.info.path}: pixel function returned {out.shape} "
                                     f"for {box}")
            return out.astype(np.uint8, copy=False)
        return self._level_array(level)[box.slices()].copy()

    def __getstate__(self) -> dict[str, Any]:
        # derived levels are rebuilt on demand: pickles carry level 0 (or the callable) only
        return {"info": self.info, "fn": self._fn,
                "rgb": self._pyramid[0] if self._fn is None else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.info = state["info"]
        self._fn = state["fn"]
        self._pyramid = [] if state["rgb"] is None else [state["rgb"]]
        self._lock = threading.Lock()


# --------------------------------------------------------------------------- opening

_MEMORY_SLIDES: dict[str, MemorySlide] = {}


def register_memory_slide(slide: MemorySlide) -> str:
    """Make ``slide.info.path`` (``memory://<name>``) openable by ``open_slide`` in this
    process, so the path-based orchestrator can run it with the serial executor."""
    _MEMORY_SLIDES[slide.info.path] = slide
    return slide.info.path


def unregister_memory_slide(path: str) -> None:
    """Forget a registered memory slide (frees its pixels)."""
    _MEMORY_SLIDES.pop(path, None)


def open_slide(path: str | Path | SlideReader, mpp_override: float | None = None) -> SlideReader:
    """OpenSlide first, tifffile when OpenSlide does not recognise the format; a
    ``SlideReader`` or a registered ``memory://`` path is used as is.

    ``mpp_override`` replaces the slide's level-0 mpp (slides without one, or wrong ones).
    Raises ``SlideReadError`` (one line naming the file) when the slide cannot be opened.
    """
    reader = _open(path)
    if mpp_override is not None:
        if not (mpp_override > 0 and math.isfinite(mpp_override)):
            raise ConfigError(f"{reader.info.path}: invalid mpp override {mpp_override}")
        if isinstance(path, SlideReader) or str(path).startswith(MEMORY_SCHEME):
            reader = copy.copy(reader)  # never change the caller's object
        reader.info = dataclasses.replace(reader.info, mpp=float(mpp_override))
    return reader


def _open(path: str | Path | SlideReader) -> SlideReader:
    if isinstance(path, SlideReader):
        return path
    text = str(path)
    if text.startswith(MEMORY_SCHEME):
        try:
            return _MEMORY_SLIDES[text]
        except KeyError:
            raise SlideReadError(f"{text}: memory slide not registered in this process "
                                 "(memory slides work with the serial executor only; "
                                 "pickle the MemorySlide itself for other processes)") from None
    p = Path(text)
    if not p.exists():
        raise SlideReadError(f"{text}: file not found")
    if p.is_dir() and p.suffix.lower() != ".mrxs":
        raise SlideReadError(f"{text}: is a folder, not a slide file")
    first: Exception | None = None
    try:
        reader = OpenSlideReader(text)
        if not _is_ome_generic_tiff(reader.info):
            return reader
        # OpenSlide reads a tiled OME-TIFF as generic-tiff, ignoring its SubIFD pyramid
        # and its OME pixel size: tifffile understands both
        reader.close()
    except SlideReadError as exc:
        # unsupported format, or a TIFF OpenSlide recognises but cannot decode (e.g.
        # JPEG-XL tiles): tifffile may still read it
        first = exc.__cause__ or exc
    try:
        reader = TiffFileReader(text)
    except SlideReadError as exc:
        if first is None:
            raise
        raise SlideReadError(f"{text}: not a readable slide (OpenSlide: {_one_line(first)}; "
                             f"tifffile: {_one_line(exc.__cause__ or exc)})") from first
    if first is not None:
        import openslide

        # a format OpenSlide does not know is routine; one it knows but fails on is not
        level = (logging.INFO if isinstance(first, openslide.OpenSlideUnsupportedFormatError)
                 else logging.WARNING)
        log.log(level, "%s: reading with tifffile (OpenSlide: %s)", text, _one_line(first))
    else:
        log.info("%s: reading with tifffile (OME-TIFF)", text)
    return reader


def _one_line(exc: BaseException) -> str:
    """An exception as one short line (error messages must fit one CLI line)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _is_ome_generic_tiff(info: SlideInfo) -> bool:
    return info.vendor == "generic-tiff" and "<OME" in info.properties.get(
        "tiff.ImageDescription", "")


# --------------------------------------------------------------------------- plan + reads


def plan_read(info: SlideInfo, model_mpp: float) -> ReadPlan:
    """Level to read and model-pixel image size for a model trained at ``model_mpp``.

    The level is the coarsest one whose downsample (``nominal_downsample``) does not
    exceed the scale (0.1 % tolerance for vendor downsamples such as 4.0003), so the
    model never sees upsampled pixels beyond that tolerance.
    """
    if info.mpp is None:
        raise MissingMppError(f"{info.path}: the slide has no pixel size (mpp); pass --mpp "
                              "with the level-0 micrometres per pixel")
    if not model_mpp > 0:
        raise ValueError(f"model mpp must be positive, got {model_mpp}")
    scale = model_mpp / info.mpp
    if scale < 1 / MAX_UPSAMPLE:
        raise MissingMppError(_too_coarse(info, model_mpp))
    nominal = [nominal_downsample(info, i) for i in range(len(info.levels))]
    level = 0
    for i, ds in enumerate(nominal):
        if ds <= scale * (1 + 1e-3) and ds >= nominal[level]:
            level = i
    shape = (max(1, math.ceil(info.height / scale - 1e-9)),
             max(1, math.ceil(info.width / scale - 1e-9)))
    return ReadPlan(level=level, level_downsample=nominal[level],
                    scale=float(scale), mpp=float(model_mpp), shape=shape)


def _too_coarse(info: SlideInfo, model_mpp: float) -> str:
    """Why a slide this coarse is refused, and what to do (a pathologist reads this)."""
    assert info.mpp is not None
    text = (f"{info.path}: {info.mpp:.4g} µm per pixel is {info.mpp / model_mpp:.1f}x coarser than "
            f"the model's {model_mpp:g} µm/px (at most {MAX_UPSAMPLE:g}x is segmented: nuclei "
            f"are a few pixels wide there)")
    dpi = 25400 / info.mpp
    if round(dpi) in SCREEN_DPI and abs(dpi - round(dpi)) < 0.01:
        text += (f"; the file's resolution tag says {round(dpi)} dpi, an image editor's default "
                 "rather than a scanner's")
    return text + "; if the pixel size is wrong, pass the true one with --mpp"


def nominal_downsample(info: SlideInfo, level: int) -> float:
    """The integer downsample k of a level whose size is level 0's divided by k and
    rounded (either way); otherwise the reported one.

    Readers report dimension ratios (OpenSlide averages width and height ratios: 4.016
    for a 75 x 62 level of 300 x 250), but such a level's pixel j covers level-0
    [j*k, (j+1)*k): using k keeps residuals integer and reads exact.
    """
    lv = info.levels[level]
    k = max(1, int(round(lv.downsample)))
    fits = (lv.width in (info.width // k, -(-info.width // k))
            and lv.height in (info.height // k, -(-info.height // k)))
    return float(k) if fits else float(lv.downsample)


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """``numpy`` ``reflect`` padding as an index map: -k -> k, n-1+k -> n-1-k (any k)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    k = np.mod(idx, period)
    return np.where(k >= n, period - k, k)


def _residual(plan: ReadPlan) -> tuple[float, int | None]:
    """Resampling factor level -> model, and its integer value when it is one in effect
    (the drift over the whole image stays below half a model pixel)."""
    r = plan.scale / plan.level_downsample
    k = int(round(r))
    if k >= 1 and abs(r - k) * max(plan.shape) < 0.5:
        return r, k
    return r, None


def read_region(reader: SlideReader, plan: ReadPlan, box: Box) -> np.ndarray:
    """RGB uint8 ``(box.height, box.width, 3)`` at model resolution for a model-pixel box
    that may reach outside the image (mirrored there).

    Every model pixel is a fixed function of fixed source pixels (global index maps), so
    overlapping boxes agree bit for bit: residual 1 copies, integer residual k averages the
    k x k source pixels, other residuals sample level coordinate (i + 0.5) * r - 0.5
    bilinearly (source indices clamped to the level).
    """
    if box.is_empty():
        raise ValueError(f"empty box {box}")
    H, W = plan.shape
    lv = reader.info.levels[plan.level]
    r, k = _residual(plan)
    if k == 1 and box.y0 >= 0 and box.x0 >= 0 and box.y1 <= min(H, lv.height) \
            and box.x1 <= min(W, lv.width):
        return reader.read_level(plan.level, box)  # hot path: a plain read
    rows = reflect_index(np.arange(box.y0, box.y1), H)
    cols = reflect_index(np.arange(box.x0, box.x1), W)
    r0, c0 = int(rows.min()), int(cols.min())
    hull = Box(r0, c0, int(rows.max()) + 1, int(cols.max()) + 1)
    if k is not None:
        image = _read_integer(reader, plan.level, hull, k, lv)
    else:
        image = _read_bilinear(reader, plan.level, hull, r, lv)
    return np.ascontiguousarray(image[np.ix_(rows - r0, cols - c0)])


def _read_integer(reader: SlideReader, level: int, hull: Box, k: int, lv: Level) -> np.ndarray:
    """Model pixels of ``hull``: mean of level pixels [i*k, (i+1)*k) (indices clamped)."""
    ys = np.clip(np.arange(hull.y0 * k, hull.y1 * k), 0, lv.height - 1)
    xs = np.clip(np.arange(hull.x0 * k, hull.x1 * k), 0, lv.width - 1)
    src_box = Box(int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1)
    src = reader.read_level(level, src_box)
    if src.shape[:2] != (len(ys), len(xs)):  # clamped indices at the level's far edges
        src = src[np.ix_(ys - src_box.y0, xs - src_box.x0)]
    if k == 1:
        return src
    s = src.reshape(hull.height, k, hull.width, k, 3).astype(np.uint32).sum(axis=(1, 3))
    n = k * k
    return ((s + n // 2) // n).astype(np.uint8)


def _axis_weights(start: int, stop: int, r: float, n: int) -> tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """Bilinear source indices (clamped) and weight of the second one, per model index."""
    c = (np.arange(start, stop, dtype=np.float64) + 0.5) * r - 0.5
    i0 = np.floor(c)
    f = c - i0
    i0 = i0.astype(np.int64)
    return np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1), f


def _read_bilinear(reader: SlideReader, level: int, hull: Box, r: float, lv: Level) -> np.ndarray:
    """Model pixels of ``hull`` sampled bilinearly at (i + 0.5) * r - 0.5 of the level."""
    y0, y1, fy = _axis_weights(hull.y0, hull.y1, r, lv.height)
    x0, x1, fx = _axis_weights(hull.x0, hull.x1, r, lv.width)
    src_box = Box(int(y0.min()), int(x0.min()), int(y1.max()) + 1, int(x1.max()) + 1)
    # float32 halves memory; still the same operations on the same inputs for each pixel
    src = reader.read_level(level, src_box).astype(np.float32)
    y0, y1 = y0 - src_box.y0, y1 - src_box.y0
    x0, x1 = x0 - src_box.x0, x1 - src_box.x0
    fy = fy.astype(np.float32)[:, None, None]
    fx = fx.astype(np.float32)[None, :, None]
    # rows first, then columns: the same operations in the same order for every pixel
    top = src[y0]
    bottom = src[y1]
    rowmix = top * (np.float32(1) - fy) + bottom * fy
    out = rowmix[:, x0] * (np.float32(1) - fx) + rowmix[:, x1] * fx
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)

