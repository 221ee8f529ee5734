"""QuPath detection features of nuclei as GeoJSON text (QuPath 0.4 - 0.7).

Why text made here and not by the writer: features are serialised with vectorised code on
the workers (``feature_bodies``: everything but the ``Nucleus id``, which needs the global
nucleus number); the single writer only splices ``Nucleus id`` behind each pre-made body
(``feature_texts``) and streams the text (``geojson.GeoJSONWriter``).

What QuPath needs (docs formats.md §1):

* A ``FeatureCollection`` of ``"objectType": "detection"`` features (light objects; QuPath
  advises detections for many objects). ``classification`` always carries ``color``
  (a name without colour fails to parse in QuPath 0.4-0.7).
* ``measurements`` as a flat dict of finite numbers: JSON has no NaN and QuPath 0.4 cannot
  read NaN strings, so non-finite values are left out.
* Valid polygons in level-0 pixels on a 0.1 px grid (``outlines.trace_tile`` makes them).

**Text**: coordinates are written with at most 1 decimal (the grid; ``802`` rather than
``802.0``). The file is UTF-8 (as RFC 8259 requires of JSON and as QuPath reads and writes
it): ``µ`` is written as itself, 2 bytes, not as the 6-byte ``\\u00b5`` escape. Bodies are
free of newlines, so a tile's bodies can be stored joined by ``\\n``.

**Measurements** (``MEASUREMENTS``) are rounded to what they mean and written as the
shortest text that reads back as the rounded number (numpy rounding, then ``repr``:
``0.381``, not ``0.38140963919697835``); the table (``nuclei.parquet``, ``tables/nuclei``)
keeps every column at full precision:

* ``Area µm^2``: 0.01 µm^2 (a 40x pixel is 0.0625 µm^2). No ``Area px^2``: every slide
  has a pixel size (``slide.plan_read`` refuses one without), and QuPath, like the table,
  derives the one from the other.
* ``Length µm``, ``Max diameter µm``, ``Min diameter µm``: 0.01 µm. The outline is only
  within 0.5 model px (0.125-0.25 µm) of the sub-pixel one, so a third decimal would be
  noise.
* ``Circularity``, ``Solidity``, ``Eccentricity``, ``Detection probability``: 0.001.
  Douglas-Peucker at 0.5 px alone moves solidity by a median 0.008 (40x) / 0.018 (20x),
  eccentricity comes from the pixel moments, and 0.001 is finer than any useful
  probability threshold.
* ``Nucleus id``: the label value, exact.

The shape measurements are those of the written polygon (``table.instance_measurements``
measures the same outlines, with QuPath's definitions: ``pipeline.measure.shape``). What a
nucleus costs: ``bench.postprocess_speed`` reports bytes per nucleus at 40x and 20x and
what the type, objectType + classification, measurements and geometry take of it;
coordinates far into a slide have a digit or two more each.

**No feature ids.** QuPath gives every imported object without an ``id`` a fresh random
UUID, and the link from a feature to its label value and table row is the ``Nucleus id``
measurement, so a stored id would only repeat that link in 44 bytes (~9 % of a 40x
nucleus). Without it re-running a slide still gives byte-identical files, and importing
the same file twice gives two sets of objects (as with any id-less GeoJSON).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon, mapping

from pipeline.measure.intensity import INTENSITY_NAMES
from pipeline.writers.outlines import XY_DECIMALS

__all__ = ["CELL_RATIO", "MEASUREMENTS", "NUCLEUS_CLASS", "feature_bodies", "feature_texts", "geometry_text",
           "nucleus_feature"]

NUCLEUS_CLASS = {"name": "Nucleus", "color": [0, 200, 0]}
CELL_RATIO = "Nucleus/Cell area ratio"  # a cell's nucleus area over its area
# Measurement (QuPath's name, as the table's column) -> decimals written to the GeoJSON;
# the table keeps full precision
MEASUREMENTS: dict[str, int] = {
    "Area µm^2": 2,
    "Length µm": 2,
    "Circularity": 3,
    "Solidity": 3,
    "Max diameter µm": 2,
    "Min diameter µm": 2,
    "Eccentricity": 3,
    "Detection probability": 3,
    **{name: 3 for name in INTENSITY_NAMES},
    CELL_RATIO: 3,
}
MEASUREMENT_NAMES = {"id": "Nucleus id"}  # table columns written under another name
COMPARTMENTS = ("Nucleus", "Cell", "Cytoplasm")  # QuPath's prefixes of a cell's measurements
_DECIMALS = MEASUREMENTS
# QuPath derives these from the ROI (the pixel area: from the µm^2 one)
_SKIP = {"centroid_x_px", "centroid_y_px", "centroid_x_um", "centroid_y_um",
         "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "area_px"}
_GEOMETRY_KEY = '"geometry":'
_PROPERTIES_KEY = ',"properties":'
_MEASUREMENTS_KEY = '"measurements":{'


def _decimals(name: str) -> int | None:
    """The decimals of measurement ``name``, also behind a cell compartment's prefix
    (``Nucleus: Area µm^2`` as ``Area µm^2``)."""
    if name in _DECIMALS:
        return _DECIMALS[name]
    compartment, _, rest = name.partition(": ")
    return _DECIMALS.get(rest) if compartment in COMPARTMENTS else None


def _rounded(name: str, values: np.ndarray) -> np.ndarray:
    """``values`` rounded to the decimals of measurement ``name`` (``MEASUREMENTS``; other
    names unchanged), so that ``repr`` writes them short: the nearest double to k / 10^d.
    ``+ 0.0`` turns a rounded -0.0 into 0.0; a value too large to round stays as it is."""
    decimals = _decimals(name)
    if decimals is None:
        return values
    out = np.round(values, decimals) + 0.0
    return np.where(np.isfinite(out) | ~np.isfinite(values), out, values)


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
            name = MEASUREMENT_NAMES.get(key, key)
            out[name] = float(_rounded(name, np.float64(number)))
    out["Nucleus id"] = float(nucleus_id)
    return out


def _classification_json(classification: Mapping[str, Any]) -> dict[str, Any]:
    if "color" not in classification or "name" not in classification:
        raise ValueError("classification needs both 'name' and 'color' (QuPath cannot parse it otherwise)")
    return {"name": str(classification["name"]), "color": [int(c) for c in classification["color"]]}


def nucleus_feature(
    nucleus_id: int,
    polygon: Polygon,
    measurements: Mapping[str, Any],
    classification: Mapping[str, Any] = NUCLEUS_CLASS,
) -> dict[str, Any]:
    """One QuPath detection feature. ``measurements`` may use table column names (mapped
    to QuPath-style names; centroid/bbox columns dropped) or final names; non-numeric and
    non-finite values are dropped. (``feature_bodies`` + ``feature_texts`` write the same
    feature as text, for many nuclei at once.)"""
    return {
        "type": "Feature",
        "geometry": mapping(polygon),
        "properties": {
            "objectType": "detection",
            "classification": _classification_json(classification),
            "measurements": _finite_measurements(nucleus_id, measurements),
        },
    }


def _geometry_texts(polygons: np.ndarray) -> list[str]:
    """GeoJSON geometry text of each polygon, vectorised: GEOS's WKT writer with 1 decimal,
    trimmed (exact and shortest for the 0.1 grid; integers lose their ".0"), rewritten to
    GeoJSON by a few replacements over the joined text. Faster than GEOS's GeoJSON writer."""
    if len(polygons) == 0:
        return []
    if not (shapely.get_type_id(polygons) == 3).all() or shapely.is_empty(polygons).any():
        return [str(g) for g in shapely.to_geojson(polygons)]
    text = "\n".join(shapely.to_wkt(polygons, rounding_precision=XY_DECIMALS, trim=True).tolist())
    text = (text.replace("POLYGON ((", '{"type":"Polygon","coordinates":[[[').replace("))", "]]]}")
            .replace("), (", "]],[[").replace(", ", "],[").replace(" ", ","))
    return text.split("\n")


def _literal(text: str) -> str:
    """``text`` as literal text of a %-format."""
    return text.replace("%", "%%")


def feature_bodies(
    polygons: np.ndarray | Sequence[Polygon],
    measurements: Mapping[str, Any],
    classification: Mapping[str, Any] = NUCLEUS_CLASS,
    nucleus_geometries: Sequence[str] | None = None,
    lead: Sequence[str] | None = None,
) -> list[str]:
    """Each nucleus's feature text without its id parts (see ``feature_texts``).

    ``measurements`` maps table column names (or final names) to arrays aligned with
    ``polygons``; ``id`` and centroid/bbox columns are skipped, non-finite values left
    out. Coordinates are written with 1 decimal (the 0.1 px grid), measurements rounded
    (``MEASUREMENTS``) and as ``repr`` (shortest round trip), one %-format per nucleus
    (a third faster than ``str.format`` with some 60 fields): this runs on the workers.

    With ``nucleus_geometries`` (GeoJSON geometry texts, e.g. :func:`geometry_text` of a
    nucleus's detection body) the features are QuPath **cells**: ``polygons`` are the
    cell boundaries (``geometry``) and the nuclei go to the feature-level
    ``nucleusGeometry``, QuPath's place for them. ``lead``: measurement texts written
    before ``measurements`` (:func:`measurement_texts`, e.g. a cell's nucleus's).
    """
    polys = np.asarray(polygons, dtype=object)
    geoms = _geometry_texts(polys)
    n = len(geoms)
    cells = nucleus_geometries is not None
    fmt = _GEOMETRY_KEY + "%s" + (',"nucleusGeometry":%s' if cells else "") + _literal(
        _PROPERTIES_KEY + '{"objectType":"' + ("cell" if cells else "detection") + '","classification":'
        + json.dumps(_classification_json(classification), separators=(",", ":")) + "," + _MEASUREMENTS_KEY)
    if lead is not None:
        if len(lead) != n:
            raise ValueError(f"{len(lead)} lead measurement texts for {n} features")
        fmt += "%s"
    named: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (rounded values, written)
    for key, values in measurements.items():
        if key in _SKIP or key in ("id", "Nucleus id"):
            continue
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (n,):
            raise ValueError(f"measurement {key!r} has shape {v.shape}, expected ({n},)")
        name = MEASUREMENT_NAMES.get(key, key)
        named[name] = (_rounded(name, v), np.isfinite(v))
    columns: list[list[Any]] = []
    for name, (v, written) in named.items():
        text = json.dumps(name, ensure_ascii=False)
        if written.all():
            fmt += _literal(text) + ":%r,"
            columns.append(v.tolist())
        elif written.any():  # rare: written per value, empty where not finite
            fmt += "%s"
            columns.append([f"{text}:{x!r}," if ok else "" for x, ok in zip(v.tolist(), written.tolist())])
    leading = [geoms]
    if cells:
        if len(nucleus_geometries) != n:
            raise ValueError(f"{len(nucleus_geometries)} nucleus geometries for {n} cells")
        leading.append(list(nucleus_geometries))
    if lead is not None:
        leading.append(list(lead))
    return [fmt % row for row in zip(*leading, *columns)]


def measurement_texts(bodies: Sequence[str], prefix: str, unprefixed: Collection[str] = ()) -> list[str]:
    """The measurements of feature bodies (:func:`feature_bodies`) as text for ``lead``,
    each name behind ``prefix`` except those in ``unprefixed``: a cell writes its nucleus's
    measurements as the tile task formatted them, renamed in a few replacements over the
    joined text (names are JSON strings and values numbers, so a name starts a row or
    follows a comma) instead of some 20 more numbers formatted per cell."""
    if not len(bodies):
        return []
    text = "\n" + "\n".join(b[b.index(_MEASUREMENTS_KEY) + len(_MEASUREMENTS_KEY):] for b in bodies)
    text = text.replace('\n"', '\n"' + prefix).replace(',"', ',"' + prefix)
    for name in unprefixed:
        text = text.replace(f'"{prefix}{name}"', f'"{name}"')
    return text[1:].split("\n")


def geometry_text(body: str) -> str:
    """The geometry text of a feature body made by :func:`feature_bodies`."""
    return body[len(_GEOMETRY_KEY):body.index(_PROPERTIES_KEY)]


def feature_texts(nucleus_ids: Iterable[int], bodies: Iterable[str]) -> list[str]:
    """Complete feature JSON texts: each body with the ``Nucleus id`` measurement spliced
    behind it. One string format per nucleus: this is all the single writer does per
    nucleus."""
    return [f'{{"type":"Feature",{b}"Nucleus id":{int(i)}.0}}}}}}' for i, b in zip(nucleus_ids, bodies)]
