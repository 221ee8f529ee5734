"""QuPath-ready GeoJSON of nuclei (QuPath 0.4 - 0.7), streamed and written atomically.

What QuPath needs (docs formats.md §1):

* A ``FeatureCollection`` of ``"objectType": "detection"`` features (light objects; QuPath
  advises detections for many objects). ``classification`` always carries ``color``
  (a name without colour fails to parse in QuPath 0.4-0.7).
* ``measurements`` as a flat dict of finite numbers: JSON has no NaN and QuPath 0.4 cannot
  read NaN strings, so non-finite values are left out.
* Valid polygons on a 0.01 px grid: QuPath 0.6+ reduces precision on import and rejects
  invalid polygons, so every polygon goes through ``make_valid`` + ``set_precision(0.01)``.
* Coordinates in **level-0 pixels**, origin at the top-left corner, y down, continuous
  (pixel (i, j) covers [j, j+1) x [i, i+1)). Polygons follow **pixel edges**, so a
  polygon's area is its pixel count x scale^2, the same as QuPath's own tracing.
* **OpenSlide bounds**: QuPath's default OpenSlide reader crops slides that declare
  ``openslide.bounds-x/y`` (e.g. MIRAX) to those bounds, so QuPath x = OpenSlide x -
  bounds-x. Pass ``origin_shift=(bounds_x, bounds_y)`` to target that reader
  (``SlideInfo.bounds_xy``); use (0, 0) for Bio-Formats or slides without bounds.

Feature ids are deterministic UUIDs (uuid5 of ``"<slide_id>:<nucleus_id>"``): re-running a
slide gives byte-identical files, and the id ties a feature to its label value. QuPath
offers to update ids if the same objects are imported twice into one image.
"""

from __future__ import annotations

import gzip as gzip_module
import io
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import rasterio.features
import shapely
from rasterio.transform import Affine
from shapely.geometry import Polygon, mapping, shape
from shapely.geometry.polygon import orient

from pipeline.atomic import temp_name

log = logging.getLogger(__name__)

__all__ = [
    "NUCLEUS_CLASS",
    "NUCLEUS_NAMESPACE",
    "GeoJSONWriter",
    "label_polygons",
    "nucleus_feature",
    "nucleus_uuid",
]

PRECISION = 0.01  # QuPath's 0.01 px grid
NUCLEUS_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://wsi-nuclei/nucleus")
NUCLEUS_CLASS = {"name": "Nucleus", "color": [0, 200, 0]}
# Table column -> QuPath-style measurement name.
MEASUREMENT_NAMES = {
    "id": "Nucleus id",
    "area_px": "Area px^2",
    "area_um2": "Area µm^2",
    "perimeter_um": "Perimeter µm",
    "eccentricity": "Eccentricity",
    "solidity": "Solidity",
    "mean_probability": "Mean probability",
}
_SKIP = {"centroid_x_px", "centroid_y_px", "centroid_x_um", "centroid_y_um",
         "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"}  # QuPath derives these from the ROI


def _largest_polygon(geom: shapely.Geometry, value: int) -> Polygon | None:
    """A single Polygon from any (multi)geometry, warning when parts are dropped."""
    if isinstance(geom, Polygon):
        return geom if not geom.is_empty else None
    # two levels of parts: a GeometryCollection from make_valid may hold MultiPolygons
    polys = [p for g in shapely.get_parts(geom) for p in shapely.get_parts(g)
             if isinstance(p, Polygon) and not p.is_empty]
    if not polys:
        return None
    if len(polys) > 1:
        log.warning("nucleus %d traced to %d polygons; keeping the largest", value, len(polys))
    return max(polys, key=lambda p: p.area)


def _clean(poly: Polygon, value: int) -> Polygon:
    """Valid, single, on the 0.01 grid; falls back to the unsnapped valid polygon in the
    (practically unreachable) case that snapping would erase it, so no instance is lost."""
    geom = poly if poly.is_valid else shapely.make_valid(poly)
    part = _largest_polygon(geom, value) or poly
    snapped = _largest_polygon(shapely.set_precision(part, PRECISION), value)
    if snapped is None:
        log.warning("nucleus %d vanishes on the %.2f px grid; written unsnapped", value, PRECISION)
        snapped = part
    return orient(snapped, sign=1.0)


def label_polygons(
    labels: np.ndarray,
    offset_yx: tuple[int, int],
    scale: float,
    origin_shift: tuple[float, float] = (0.0, 0.0),
) -> Iterator[tuple[int, Polygon]]:
    """Pixel-edge polygons of every instance, in level-0 px, sorted by label value.

    Exactly one polygon per non-zero label value, in ascending order: the same order as
    the rows of ``table.instance_measurements`` on the same crop.

    ``labels`` is a model-pixel crop whose [0, 0] is model pixel ``offset_yx``; ``scale``
    is level-0 px per model px; ``origin_shift=(bx, by)`` is subtracted from x and y (see
    module doc, OpenSlide bounds). Instances are 4-connected without holes by the watershed
    contract; if one still yields several parts, the largest is kept with a warning.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if labels.size == 0 or not labels.any():
        return
    if labels.min() < 0 or labels.max() > np.iinfo(np.int32).max:
        raise ValueError("label values must be in 0..2^31-1 (rasterio traces int32)")
    lab = labels.astype(np.int32, copy=False)
    s = float(scale)
    transform = Affine(s, 0.0, offset_yx[1] * s - origin_shift[0], 0.0, s, offset_yx[0] * s - origin_shift[1])
    parts: dict[int, list[Polygon]] = {}
    for geom, value in rasterio.features.shapes(lab, mask=lab > 0, connectivity=4, transform=transform):
        parts.setdefault(int(value), []).append(shape(geom))
    for value in sorted(parts):
        pieces = parts[value]
        if len(pieces) > 1:
            log.warning("nucleus %d traced to %d polygons; keeping the largest", value, len(pieces))
        yield value, _clean(max(pieces, key=lambda p: p.area), value)


def nucleus_uuid(slide_id: str, nucleus_id: int) -> str:
    """Deterministic feature id of a nucleus."""
    return str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{slide_id}:{int(nucleus_id)}"))


def _finite_measurements(nucleus_id: int, measurements: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in measurements.items():
        if key in _SKIP:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[MEASUREMENT_NAMES.get(key, key)] = number
    out["Nucleus id"] = float(nucleus_id)
    return out


def nucleus_feature(
    slide_id: str,
    nucleus_id: int,
    polygon: Polygon,
    measurements: Mapping[str, Any],
    classification: Mapping[str, Any] = NUCLEUS_CLASS,
) -> dict[str, Any]:
    """One QuPath detection feature. ``measurements`` may use table column names (mapped
    to QuPath-style names; centroid/bbox columns dropped) or final names; non-numeric and
    non-finite values are dropped."""
    if "color" not in classification or "name" not in classification:
        raise ValueError("classification needs both 'name' and 'color' (QuPath cannot parse it otherwise)")
    return {
        "type": "Feature",
        "id": nucleus_uuid(slide_id, nucleus_id),
        "geometry": mapping(polygon),
        "properties": {
            "objectType": "detection",
            "classification": {"name": str(classification["name"]),
                               "color": [int(c) for c in classification["color"]]},
            "measurements": _finite_measurements(nucleus_id, measurements),
        },
    }


class GeoJSONWriter:
    """Stream a FeatureCollection to ``path`` (``.geojson``/``.json``, gzip if ``.gz``).

    Features are written one by one (nothing accumulates in memory) to a hidden temporary
    file in the same folder, renamed onto ``path`` when the ``with`` block ends normally
    and deleted if it raises. ``gzip=None`` follows the suffix; an explicit value must
    agree with it. Gzip output has no timestamp, so equal inputs give equal bytes.
    """

    def __init__(self, path: str | os.PathLike[str], gzip: bool | None = None) -> None:
        self.path = Path(path)
        name = self.path.name.lower()
        is_gz = name.endswith(".gz")
        if not name.removesuffix(".gz").endswith((".geojson", ".json")):
            raise ValueError(f"{self.path}: expected a .geojson, .json, .geojson.gz or .json.gz name")
        if gzip is not None and gzip != is_gz:
            raise ValueError(f"{self.path}: gzip={gzip} does not match the file suffix")
        self.gzip = is_gz
        self.count = 0
        self._tmp: Path | None = None
        self._raw: IO[bytes] | None = None
        self._text: io.TextIOWrapper | None = None

    def __enter__(self) -> GeoJSONWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_name(self.path)
        self._raw = open(self._tmp, "wb")
        stream: IO[bytes] = self._raw
        if self.gzip:
            stream = gzip_module.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=6)
        self._text = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
        self._text.write('{"type": "FeatureCollection", "features": [')
        return self

    def write(self, feature: Mapping[str, Any]) -> None:
        """Append one feature (must be JSON-serialisable without NaN)."""
        if self._text is None:
            raise RuntimeError("GeoJSONWriter.write outside its 'with' block")
        text = json.dumps(feature, allow_nan=False, separators=(",", ":"))
        self._text.write(("\n" if self.count == 0 else ",\n") + text)
        self.count += 1

    add = write  # alias: ``writer.add(feature)`` reads naturally in the orchestrator

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._text is None or self._raw is None or self._tmp is None:
            raise RuntimeError("GeoJSONWriter exited without being entered")
        complete = False
        try:
            if exc_type is None:
                self._text.write("\n]}\n")
            self._text.close()  # flushes; writes the gzip trailer (the raw file stays open)
            complete = exc_type is None
        finally:
            self._raw.close()
            self._text = None
            if complete:
                os.replace(self._tmp, self.path)
                log.info("wrote %d features to %s", self.count, self.path)
            else:
                self._tmp.unlink(missing_ok=True)
                log.warning("GeoJSON %s not written (interrupted)", self.path)
