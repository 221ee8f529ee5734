"""Per-nucleus measurement table: Parquet for pandas users, Zarr columns beside the labels.

Coordinates and units (level-0 pixels unless the column says µm):

* ``centroid_{x,y}_px`` use the **array-index convention**: level-0 pixel (i, j) has its
  centre at (y=i, x=j), as in numpy, napari and our NGFF transforms (scale, no
  translation). Model pixel (r, c) covers level-0 ``[r*s, (r+1)*s)`` (``s`` = level-0 px
  per model px), so a model-pixel centroid ``c`` (index convention, the mean pixel index)
  in a crop at ``offset`` maps to ``(c + offset + 0.5) * s - 0.5``. QuPath's continuous
  coordinates (pixel i covers [i, i+1)) are these values + 0.5.
* ``centroid_*_um = centroid_*_px * mpp`` (the NGFF physical coordinate).
* ``area_px = model_area * s^2`` (the label's pixel count; the GeoJSON outline's area is
  within a few % of it, see ``geojson.tile_polygons``).
* ``perimeter_um`` and ``solidity`` come from the GeoJSON outline itself (the smoothed,
  sub-pixel polygon in level-0 px): its length x mpp, and its area / its convex hull's
  area. So the table and QuPath's view of a nucleus agree, and a perimeter does not
  count staircase steps.
* ``eccentricity`` is skimage's: from the second central moments of the pixels (the
  ellipse with the same moments), scale-free.
* ``bbox_*`` is the half-open level-0 pixel range covering the nucleus:
  ``floor(model_bbox_start * s)`` .. ``ceil(model_bbox_stop * s)``; exact when s is an integer.
* Without an mpp every ``*_um*`` column is NaN.

All of it is computed for the whole crop at once, with no Python loop per nucleus: pixel
count, centroid, second moments (eccentricity) and bbox from the traced pixel edges
(``geojson.trace_tile``: Green's theorem, exact, equal to the sums over the pixels), the
mean probability by one ``numpy.bincount`` over the foreground pixels, perimeter and
solidity by shapely's vectorised functions over the outlines.

The writer streams: rows are buffered only up to one row group, which goes both to a
Parquet row group (``nuclei.parquet``, atomic) and to the 1-D Zarr arrays
``nuclei.zarr/tables/nuclei/<column>`` (chunk = row group). The Zarr group attrs list the
columns, ``instance_key="id"`` (the label value in ``labels/nuclei``) and
``region="labels/nuclei"``; ``n_rows`` is written last.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
import zarr

from pipeline.atomic import atomic_path
from pipeline.writers.geojson import TileOutlines, trace_tile
from pipeline.writers.labels import LabelStoreSpec

log = logging.getLogger(__name__)

__all__ = ["COLUMNS", "TABLE_PATH", "empty_table", "instance_measurements", "write_table"]

TABLE_PATH = "tables/nuclei"
COLUMNS: dict[str, str] = {
    "id": "uint32",
    "centroid_x_px": "float64",
    "centroid_y_px": "float64",
    "centroid_x_um": "float64",
    "centroid_y_um": "float64",
    "area_px": "float64",
    "area_um2": "float64",
    "perimeter_um": "float64",
    "eccentricity": "float64",
    "solidity": "float64",
    "mean_probability": "float64",
    "bbox_x0": "int64",
    "bbox_y0": "int64",
    "bbox_x1": "int64",
    "bbox_y1": "int64",
}


def empty_table(id_dtype: str = "uint32") -> pd.DataFrame:
    """A zero-row table with the final column order and dtypes."""
    dtypes = {**COLUMNS, "id": id_dtype}
    return pd.DataFrame({k: np.zeros(0, dtype=v) for k, v in dtypes.items()})


def instance_measurements(
    labels: np.ndarray,
    prob: np.ndarray,
    offset_yx: tuple[int, int],
    scale: float,
    mpp_level0: float | None,
    *,
    id_offset: int = 0,
    id_dtype: str = "uint32",
    outlines: TileOutlines | None = None,
) -> pd.DataFrame:
    """Measure every instance of a model-pixel label crop, in level-0 units.

    ``labels``: local ids (> 0) on a crop whose [0, 0] is model pixel ``offset_yx``;
    ``prob``: nucleus probability on the same crop; ``scale``: level-0 px per model px;
    ``id`` = local id + ``id_offset`` (the global label value painted in the store).
    ``outlines``: ``geojson.trace_tile`` of the same crop, when the caller has it already
    (it holds the outlines and the label moments); traced here otherwise.
    """
    if labels.shape != prob.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and prob {prob.shape} must be equal 2-D shapes")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if outlines is None:
        outlines = trace_tile(labels, offset_yx, scale)
    ids = outlines.values
    if len(ids) == 0:
        return empty_table(id_dtype)
    # mean probability: the one pass over the pixels (everything else comes from the edges)
    flat = labels.ravel()
    fg = np.flatnonzero(flat != 0)
    value = flat[fg].astype(np.intp)
    if ids[-1] > 4 * (len(ids) + len(fg)):  # sparse large ids: compact them first
        value, ids_at = np.searchsorted(ids, value), np.arange(len(ids))
    else:
        ids_at = ids
    weights = np.asarray(prob).ravel()[fg].astype(np.float64)
    mean_prob = np.bincount(value, weights, int(ids_at[-1]) + 1)[ids_at] / outlines.pixels
    # eigenvalues of the inertia tensor (skimage's eccentricity)
    m_rr, m_cc, m_rc = outlines.moments.T
    half = (m_rr + m_cc) / 2
    root = np.hypot((m_rr - m_cc) / 2, m_rc)
    l1 = half + root
    l2 = np.clip(half - root, 0, None)
    ecc = np.sqrt(1 - np.divide(l2, l1, out=np.ones_like(l1), where=l1 > 0))
    polygons = outlines.polygons
    poly_area = shapely.area(polygons)
    hull_area = shapely.area(shapely.convex_hull(polygons))
    oy, ox = float(offset_yx[0]), float(offset_yx[1])
    s = float(scale)
    cy = (outlines.centroid[:, 0] + oy + 0.5) * s - 0.5
    cx = (outlines.centroid[:, 1] + ox + 0.5) * s - 0.5
    mpp = float(mpp_level0) if mpp_level0 is not None else np.nan
    area = outlines.pixels * s * s
    y0, x0, y1, x1 = outlines.bbox.T
    out = {
        "id": (ids.astype(np.int64) + int(id_offset)).astype(id_dtype),
        "centroid_x_px": cx,
        "centroid_y_px": cy,
        "centroid_x_um": cx * mpp,
        "centroid_y_um": cy * mpp,
        "area_px": area,
        "area_um2": area * mpp * mpp,
        "perimeter_um": shapely.length(polygons) * mpp,
        "eccentricity": ecc,
        "solidity": np.divide(poly_area, hull_area, out=np.ones_like(poly_area), where=hull_area > 0),
        "mean_probability": mean_prob,
        "bbox_x0": np.floor((x0 + ox) * s).astype(np.int64),
        "bbox_y0": np.floor((y0 + oy) * s).astype(np.int64),
        "bbox_x1": np.ceil((x1 + ox) * s).astype(np.int64),
        "bbox_y1": np.ceil((y1 + oy) * s).astype(np.int64),
    }
    return pd.DataFrame(out, copy=False)  # every column has its COLUMNS dtype already


def _as_frame(chunk: pd.DataFrame | Mapping[str, Any], dtypes: dict[str, str]) -> pd.DataFrame:
    frame = chunk if isinstance(chunk, pd.DataFrame) else pd.DataFrame(dict(chunk))
    if set(frame.columns) != set(dtypes):
        raise ValueError(f"table columns {sorted(frame.columns)} != expected {sorted(dtypes)}")
    ids = frame["id"].to_numpy()
    if len(ids) and (ids.min() < 0 or int(ids.max()) > np.iinfo(dtypes["id"]).max):
        raise ValueError(f"nucleus ids outside the range of {dtypes['id']}")
    return frame[list(dtypes)].astype(dtypes).reset_index(drop=True)


class _Sink:
    """Parquet writer + Zarr column arrays fed one row group at a time."""

    def __init__(self, parquet_tmp: Path, group: zarr.Group, dtypes: dict[str, str], rows: int) -> None:
        self.schema = pa.schema([(k, pa.from_numpy_dtype(np.dtype(v))) for k, v in dtypes.items()])
        self.writer = pq.ParquetWriter(parquet_tmp, self.schema, compression="zstd")
        self.arrays = {
            k: group.create_array(k, shape=(0,), chunks=(rows,), dtype=v, fill_value=0,
                                  dimension_names=["nucleus"], overwrite=True)
            for k, v in dtypes.items()
        }
        self.n_rows = 0

    def write(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        self.writer.write_table(pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False))
        for k, arr in self.arrays.items():
            arr.append(frame[k].to_numpy())
        self.n_rows += len(frame)


def write_table(
    out_dir: str | os.PathLike[str],
    frames: Iterable[pd.DataFrame | Mapping[str, Any]],
    *,
    store: str | os.PathLike[str] | LabelStoreSpec | None = None,
    parquet_name: str = "nuclei.parquet",
    row_group_size: int = 65536,
    id_dtype: str = "uint32",
) -> int:
    """Stream per-tile tables into ``out_dir/nuclei.parquet`` and the Zarr twin; return rows.

    ``frames`` yields DataFrames (or dicts of columns) with exactly the ``COLUMNS`` names,
    e.g. from ``instance_measurements``. ``pd.read_parquet(out_dir / "nuclei.parquet")``
    reads the result. The Zarr columns go to ``<store>/tables/nuclei`` (group replaced);
    ``store`` is the label store (spec or path), by default ``out_dir/nuclei.zarr``.
    """
    if row_group_size < 1:
        raise ValueError("row_group_size must be >= 1")
    out = Path(out_dir)
    dtypes = {**COLUMNS, "id": id_dtype}
    if store is None:
        store_path = out / "nuclei.zarr"
    else:
        store_path = Path(store.path if isinstance(store, LabelStoreSpec) else store)
    root = zarr.open_group(store=str(store_path), mode="a", zarr_format=3)
    group = root.require_group("tables").create_group("nuclei", overwrite=True)
    group.attrs.update({"columns": list(dtypes), "dtypes": dtypes, "instance_key": "id",
                        "region": "labels/nuclei", "parquet": f"../{parquet_name}"})
    with atomic_path(out / parquet_name) as tmp:
        sink = _Sink(tmp, group, dtypes, row_group_size)
        try:
            pending: list[pd.DataFrame] = []
            n_pending = 0
            for chunk in frames:
                frame = _as_frame(chunk, dtypes)
                pending.append(frame)
                n_pending += len(frame)
                while n_pending >= row_group_size:
                    block = pd.concat(pending, ignore_index=True)
                    sink.write(block.iloc[:row_group_size])
                    rest = block.iloc[row_group_size:].reset_index(drop=True)
                    pending, n_pending = [rest], len(rest)
            if n_pending:
                sink.write(pd.concat(pending, ignore_index=True))
        finally:
            sink.writer.close()
    group.attrs["n_rows"] = sink.n_rows
    log.info("table: %d nuclei -> %s and %s/%s", sink.n_rows, out / parquet_name, store_path, TABLE_PATH)
    return sink.n_rows
