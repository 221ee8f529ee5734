"""The tifffile backend: what OpenSlide refuses (OME-TIFF, plain TIFF), read region by region."""

from __future__ import annotations

import math
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.discovery import slide_id
from pipeline.errors import SlideReadError
from pipeline.slide.reader import DEFAULT_STORED_TILE, FileSlideReader
from pipeline.types import Box, Level, SlideInfo

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


class TiffFileReader(FileSlideReader):
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

    def _forget(self) -> None:
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
