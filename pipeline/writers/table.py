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

All of it is computed for the whole crop at once (``numpy.bincount`` over the
foreground pixels, shapely's vectorised functions over the outlines): no Python loop per
nucleus.

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
    polygons: np.ndarray | None = None,
) -> pd.DataFrame:
    """Measure every instance of a model-pixel label crop, in level-0 units.

    ``labels``: local ids (> 0) on a crop whose [0, 0] is model pixel ``offset_yx``;
    ``prob``: nucleus probability on the same crop; ``scale``: level-0 px per model px;
    ``id`` = local id + ``id_offset`` (the global label value painted in the store).
    ``polygons``: the outlines from ``geojson.tile_polygons`` on the same crop (one per
    label, ascending), when the caller has them already; traced here otherwise.
    """
    if labels.shape != prob.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and prob {prob.shape} must be equal 2-D shapes")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if labels.size == 0 or not labels.any():
        return empty_table(id_dtype)
    lab = labels if labels.dtype.kind in "iu" else labels.astype(np.int64)
    if lab.dtype.kind == "i" and lab.min() < 0:
        raise ValueError("label values must be >= 0")
    flat = lab.ravel()
    fg = np.flatnonzero(flat != 0)
    value = flat[fg].astype(np.intp)
    rows, cols = np.divmod(fg, lab.shape[1])
    size = int(value.max()) + 1
    count = np.bincount(value, minlength=size)
    ids = np.flatnonzero(count)
    n = count[ids].astype(np.float64)
    # centroids, then second central moments about them (two passes: no cancellation)
    cy_all = np.bincount(value, rows, size)
    cx_all = np.bincount(value, cols, size)
    cy_all[ids] /= n
    cx_all[ids] /= n
    dy = rows - cy_all[value]
    dx = cols - cx_all[value]
    mu_yy = np.bincount(value, dy * dy, size)[ids] / n
    mu_xx = np.bincount(value, dx * dx, size)[ids] / n
    mu_xy = np.bincount(value, dy * dx, size)[ids] / n
    # eigenvalues of the inertia tensor [[xx, -xy], [-xy, yy]] (skimage's eccentricity)
    half = (mu_yy + mu_xx) / 2
    root = np.hypot((mu_yy - mu_xx) / 2, mu_xy)
    l1 = half + root
    l2 = np.clip(half - root, 0, None)
    ecc = np.sqrt(1 - np.divide(l2, l1, out=np.ones_like(l1), where=l1 > 0))
    mean_prob = np.bincount(value, np.asarray(prob, dtype=np.float64).ravel()[fg], size)[ids] / n
    big = np.iinfo(np.int64).max
    y0 = np.full(size, big)
    x0 = np.full(size, big)
    y1 = np.full(size, -1)
    x1 = np.full(size, -1)
    np.minimum.at(y0, value, rows)
    np.minimum.at(x0, value, cols)
    np.maximum.at(y1, value, rows)
    np.maximum.at(x1, value, cols)
    if polygons is None:
        from pipeline.writers.geojson import tile_polygons

        polygons = tile_polygons(lab, offset_yx, scale)[1]
    if len(polygons) != len(ids):
        raise ValueError(f"{len(polygons)} polygons for {len(ids)} labels")
    poly_area = shapely.area(polygons)
    hull_area = shapely.area(shapely.convex_hull(polygons))
    oy, ox = float(offset_yx[0]), float(offset_yx[1])
    s = float(scale)
    cy = (cy_all[ids] + oy + 0.5) * s - 0.5
    cx = (cx_all[ids] + ox + 0.5) * s - 0.5
    mpp = float(mpp_level0) if mpp_level0 is not None else np.nan
    area = n * s * s
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
        "bbox_x0": np.floor((x0[ids] + ox) * s).astype(np.int64),
        "bbox_y0": np.floor((y0[ids] + oy) * s).astype(np.int64),
        "bbox_x1": np.ceil((x1[ids] + 1 + ox) * s).astype(np.int64),
        "bbox_y1": np.ceil((y1[ids] + 1 + oy) * s).astype(np.int64),
    }
    return pd.DataFrame(out).astype({**COLUMNS, "id": id_dtype})


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
