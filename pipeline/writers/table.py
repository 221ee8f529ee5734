"""Per-nucleus measurement table: Parquet for pandas users, AnnData beside the labels.

Coordinates and units (level-0 pixels unless the column says µm):

* ``centroid_{x,y}_px`` use the **array-index convention**: level-0 pixel (i, j) has its
  centre at (y=i, x=j), as in numpy, napari and our NGFF transforms (scale, no
  translation). Model pixel (r, c) covers level-0 ``[r*s, (r+1)*s)`` (``s`` = level-0 px
  per model px), so a model-pixel centroid ``c`` (index convention, the mean pixel index)
  in a crop at ``offset`` maps to ``(c + offset + 0.5) * s - 0.5``. QuPath's continuous
  coordinates (pixel i covers [i, i+1)) are these values + 0.5.
* ``centroid_*_um = centroid_*_px * mpp`` (the NGFF physical coordinate).
* ``area_px = model_area * s^2`` (the label's pixel count; the GeoJSON outline's area is
  within a few % of it, see ``outlines``).
* The measurements have QuPath 0.6's names and definitions (``MEASUREMENT_COLUMNS``), so
  that the table, the GeoJSON and QuPath's own measurements of an imported nucleus agree:
  ``Area µm^2``, ``Length µm``, ``Circularity``, ``Solidity``, ``Max diameter µm``,
  ``Min diameter µm`` of the GeoJSON outline itself (the smoothed, sub-pixel polygon in
  level-0 px; ``pipeline.measure.shape``), so a length does not count staircase steps;
  ``Eccentricity`` (an extra) is skimage's, from the second central moments of the pixels
  (the ellipse with the same moments), scale-free; ``Detection probability`` is the mean
  nucleus probability over the nucleus's pixels.
* ``bbox_*`` is the half-open level-0 pixel range covering the nucleus:
  ``floor(model_bbox_start * s)`` .. ``ceil(model_bbox_stop * s)``; exact when s is an integer.

All of it is computed for the whole crop at once, with no Python loop per nucleus: pixel
count, centroid, second moments (eccentricity) and bbox from the traced pixel edges
(``outlines.trace_tile``: Green's theorem, exact, equal to the sums over the pixels), the
mean probability by one ``numpy.bincount`` over the foreground pixels, the shape
measurements by shapely's vectorised functions over the outlines.

Two files, one set of rows (one per nucleus, in global id order):

* ``nuclei.parquet``: the flat table above, streamed one row group at a time (atomic), for
  pandas/Arrow users. Its schema metadata has one key, ``wsi_nuclei``: a JSON object with
  the level-0 ``mpp``, the ``units`` of each column, the ``coordinates`` convention, the
  ``wsi_nuclei_version``, and what the caller adds (slide path and id, model name and
  sha256: ``pipeline.slide_run.outputs.write_nuclei``). So a Parquet file copied away still says what
  its numbers mean.
* ``nuclei.zarr/tables/nuclei``: the same rows as an **AnnData** (``anndata``'s own zarr
  encoding, zarr v3, written with ``anndata.io.write_elem``), annotating the label image
  the way SpatialData tables do, so ``anndata.read_zarr``, scanpy/squidpy and
  ``spatialdata.read_zarr`` open it:

  - ``obs``: ``id`` (the instance key: the value in ``labels/nuclei``, uint32) and
    ``region`` (categorical, always ``"nuclei"``: the labels element it annotates);
    ``obs_names`` are the ids as strings.
  - ``X`` (float64) with ``var_names`` = ``X_COLUMNS`` (and a cell's columns when cells
    were made): the per-nucleus measurements, where scanpy/squidpy look for features;
    ``var["unit"]`` their units.
  - ``obsm["spatial"]``: centroid (x, y) in **µm** (the unit of the label store's NGFF
    coordinate system; ``uns["wsi_nuclei"]["spatial_unit"]`` says so).
    ``obsm["centroid_px"]``: centroid (x, y) in level-0 px; ``obsm["bbox_px"]``: (x0, y0,
    x1, y1). ``uns["wsi_nuclei"]["obsm_columns"]`` names the Parquet column behind each
    obsm column, so every Parquet value is in the table.
  - ``uns["spatialdata_attrs"]``: ``region`` = ``"nuclei"``, ``region_key`` = ``"region"``,
    ``instance_key`` = ``"id"`` (SpatialData's ``TableModel``); the group attributes repeat
    them with SpatialData's table ``version`` (its reader needs it). A table without rows
    has ``region`` = ``[]``: SpatialData rejects a region that no row names.
  - ``uns["wsi_nuclei"]``: the Parquet metadata above.

Memory: ``X`` and the ``obsm`` arrays grow one row group at a time (chunk = row group);
only the ids are kept (4 bytes per nucleus), and ``obs`` is written at the end, when the
string index AnnData wants exists for a moment: peak RSS +130 MiB per million nuclei over
the former all-streaming Zarr columns (measured, 1 M rows: 105 -> 235 MiB above start).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from pipeline import __version__
from pipeline.atomic import atomic_path
from pipeline.measure.intensity import INTENSITY_NAMES, stain_intensities
from pipeline.measure.shape import SHAPE_NAMES, shape_measurements
from pipeline.measure.shape import UNITS as SHAPE_UNITS
from pipeline.measure.stain import StainVectors
from pipeline.writers.labels import LABEL_NAME, LabelStoreSpec
from pipeline.writers.outlines import TileOutlines, trace_tile

log = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "COLUMN_UNITS",
    "METADATA_KEY",
    "TABLE_PATH",
    "X_COLUMNS",
    "empty_table",
    "instance_measurements",
    "write_table",
]

TABLE_NAME = "nuclei"
TABLE_PATH = f"tables/{TABLE_NAME}"
# measurements, named as QuPath names them (shape: ``pipeline.measure.shape``; extras:
# Eccentricity, from the pixel moments, and the mean nucleus probability; stain
# intensities: ``pipeline.measure.intensity``)
ECCENTRICITY = "Eccentricity"
PROBABILITY = "Detection probability"
MEASUREMENT_COLUMNS: tuple[str, ...] = (*SHAPE_NAMES, ECCENTRICITY, PROBABILITY, *INTENSITY_NAMES)
COLUMNS: dict[str, str] = {
    "id": "uint32",
    "centroid_x_px": "float64",
    "centroid_y_px": "float64",
    "centroid_x_um": "float64",
    "centroid_y_um": "float64",
    "area_px": "float64",
    **{name: "float64" for name in MEASUREMENT_COLUMNS},
    "bbox_x0": "int64",
    "bbox_y0": "int64",
    "bbox_x1": "int64",
    "bbox_y1": "int64",
}
# NGFF unit names; "1": dimensionless; the id has no unit (it is the label value)
_NGFF_UNITS = {"µm": "micrometer", "µm^2": "micrometer^2", "1": "1"}
COLUMN_UNITS: dict[str, str] = {
    "id": "",
    "centroid_x_px": "pixel",
    "centroid_y_px": "pixel",
    "centroid_x_um": "micrometer",
    "centroid_y_um": "micrometer",
    "area_px": "pixel^2",
    **{name: _NGFF_UNITS[unit] for name, unit in SHAPE_UNITS.items()},
    ECCENTRICITY: "1",
    PROBABILITY: "1",
    # colour-deconvolved stain values and their sum, in optical density units (log10)
    **{name: "optical density" for name in INTENSITY_NAMES},
    "bbox_x0": "pixel",
    "bbox_y0": "pixel",
    "bbox_x1": "pixel",
    "bbox_y1": "pixel",
}
COORDINATES = (
    "level-0 pixels of the whole slide, array-index convention: pixel (i, j) has its centre at "
    "(y=i, x=j) (numpy, napari, the NGFF scale transforms); QuPath's continuous coordinates are "
    "these + 0.5 (its GeoJSON also subtracts summary.json's origin_shift_xy); *_um = *_px * mpp; "
    "bbox_* half-open [x0, x1) x [y0, y1)"
)
METADATA_KEY = "wsi_nuclei"  # Parquet schema metadata key (JSON) and AnnData uns key
# AnnData layout: measurements in X; obsm matrices with the Parquet columns behind them
X_COLUMNS: tuple[str, ...] = (*MEASUREMENT_COLUMNS, "area_px")
OBSM_PX: dict[str, tuple[str, ...]] = {
    "centroid_px": ("centroid_x_px", "centroid_y_px"),
    "bbox_px": ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"),
}
SPATIAL_UM = ("centroid_x_um", "centroid_y_um")
REGION_KEY = "region"
INSTANCE_KEY = "id"
SPATIALDATA_TABLE_VERSION = "0.1"  # SpatialData's tables format that these attributes follow
# explicit "no sharding": growing arrays are appended chunk by chunk (a shard would be
# rewritten on every append), and anndata warns when the choice is left to it
_NO_SHARDS: dict[str, Any] = {"shards": None}


def empty_table(id_dtype: str = "uint32") -> pd.DataFrame:
    """A zero-row table with the final column order and dtypes."""
    dtypes = {**COLUMNS, "id": id_dtype}
    return pd.DataFrame({k: np.zeros(0, dtype=v) for k, v in dtypes.items()})


def instance_measurements(
    labels: np.ndarray,
    prob: np.ndarray,
    offset_yx: tuple[int, int],
    scale: float,
    mpp_level0: float,
    *,
    id_offset: int = 0,
    id_dtype: str = "uint32",
    outlines: TileOutlines | None = None,
    rgb: np.ndarray | None = None,
    stains: StainVectors | None = None,
) -> pd.DataFrame:
    """Measure every instance of a model-pixel label crop, in level-0 units.

    ``labels``: local ids (> 0) on a crop whose [0, 0] is model pixel ``offset_yx``;
    ``prob``: nucleus probability on the same crop; ``scale``: level-0 px per model px;
    ``id`` = local id + ``id_offset`` (the global label value painted in the store).
    ``outlines``: ``outlines.trace_tile`` of the same crop, when the caller has it already
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
    shape = shape_measurements(outlines.polygons, mpp_level0)  # the GeoJSON's own polygons
    if rgb is None:
        intensity = {name: np.full(len(ids), np.nan) for name in INTENSITY_NAMES}
    else:
        if rgb.shape[:2] != labels.shape:
            raise ValueError(f"rgb {rgb.shape} does not cover labels {labels.shape}")
        intensity = stain_intensities(labels, rgb, stains or StainVectors(), ids)
    oy, ox = float(offset_yx[0]), float(offset_yx[1])
    s = float(scale)
    cy = (outlines.centroid[:, 0] + oy + 0.5) * s - 0.5
    cx = (outlines.centroid[:, 1] + ox + 0.5) * s - 0.5
    mpp = float(mpp_level0)
    area = outlines.pixels * s * s
    y0, x0, y1, x1 = outlines.bbox.T
    out = {
        "id": (ids.astype(np.int64) + int(id_offset)).astype(id_dtype),
        "centroid_x_px": cx,
        "centroid_y_px": cy,
        "centroid_x_um": cx * mpp,
        "centroid_y_um": cy * mpp,
        "area_px": area,
        **shape,
        ECCENTRICITY: ecc,
        PROBABILITY: mean_prob,
        **intensity,
        "bbox_x0": np.floor((x0 + ox) * s).astype(np.int64),
        "bbox_y0": np.floor((y0 + oy) * s).astype(np.int64),
        "bbox_x1": np.ceil((x1 + ox) * s).astype(np.int64),
        "bbox_y1": np.ceil((y1 + oy) * s).astype(np.int64),
    }
    return pd.DataFrame(out, copy=False)  # every column has its COLUMNS dtype already


def _as_frame(chunk: pd.DataFrame | Mapping[str, Any], dtypes: dict[str, str]) -> pd.DataFrame:
    """The chunk's columns in ``dtypes``' order and types, as one new frame of the arrays
    themselves where they have their type already (``DataFrame.astype`` copied each of the
    ~35 columns: 3.6 ms a tile against 0.2 ms)."""
    columns = {k: chunk[k].to_numpy() for k in chunk.columns} if isinstance(chunk, pd.DataFrame) else chunk
    if set(columns) != set(dtypes):
        raise ValueError(f"table columns {sorted(columns)} != expected {sorted(dtypes)}")
    ids = np.asarray(columns["id"])
    if len(ids) and (ids.min() < 0 or int(ids.max()) > np.iinfo(dtypes["id"]).max):
        raise ValueError(f"nucleus ids outside the range of {dtypes['id']}")
    return pd.DataFrame({k: np.asarray(columns[k], dtype=v) for k, v in dtypes.items()}, copy=False)


def column_unit(name: str) -> str:
    """A column's unit, also behind a cell compartment's prefix (``Cell: Area µm^2``)."""
    if name in COLUMN_UNITS:
        return COLUMN_UNITS[name]
    rest = name.partition(": ")[2]
    return COLUMN_UNITS.get(rest, "1")


def table_metadata(mpp: float, extra: Mapping[str, Any] | None = None,
                   columns: Iterable[str] = ()) -> dict[str, Any]:
    """What the numbers in the table mean: written into both the Parquet and the AnnData.

    ``extra`` (slide, model, checksum, ...) comes from the caller; the keys made here win.
    ``columns``: measurement columns beyond ``COLUMNS`` (cells), whose units are added.
    """
    units = {**COLUMN_UNITS, **{name: column_unit(name) for name in columns}}
    return {**dict(extra or {}), "wsi_nuclei_version": __version__, "mpp": mpp,
            "units": units, "coordinates": COORDINATES}


class _AnnDataTable:
    """``tables/nuclei`` as an AnnData, its X and obsm appended one row group at a time.

    anndata writes every element (``write_elem``); the growing arrays are created empty
    with row-group chunks and extended with ``zarr.Array.append``, in the store. The rest
    (obs, var, uns, the empty mappings and the group's attributes: ~50 small zarr nodes)
    is written at ``close`` into a ``MemoryStore`` and then copied to the store as plain
    files: zarr v3 pays a round trip to its event-loop thread, and for a local store one
    more to a file thread, per metadata document and chunk (~450 for the table, 1-2.5 ms
    each on a loaded 2-core machine), which a memory store spares. The files are those
    ``write_elem`` would write to the store. Until ``close`` the group is not an AnnData
    (the store is marked complete by ``ngff.finalize``, which runs later).
    """

    def __init__(self, store_path: Path, id_dtype: str, rows: int, meta: Mapping[str, Any],
                 x_columns: tuple[str, ...] = X_COLUMNS) -> None:
        from anndata.io import write_elem

        self.id_dtype = id_dtype
        self.path = store_path
        self.meta = {k: v for k, v in meta.items() if v is not None}  # uns cannot hold None
        # the measurements' units go to var["unit"], beside their names (a name such as
        # "Nucleus/Cell area ratio" cannot be a key of uns, which zarr stores as groups)
        units = dict(self.meta.get("units", {}))
        self.var = pd.DataFrame({"unit": [units.pop(c, "") for c in x_columns]},
                                index=pd.Index(x_columns, dtype=object))
        self.meta["units"] = units
        self.obsm = {"spatial": SPATIAL_UM, **OBSM_PX}
        shutil.rmtree(store_path / TABLE_PATH, ignore_errors=True)  # a former run's table
        root = zarr.open_group(store=str(store_path), mode="a", zarr_format=3)
        self.group = root.require_group("tables").require_group(TABLE_NAME)  # attributes at close
        obsm = self.group.require_group("obsm")
        self.arrays: list[tuple[list[str], zarr.Array]] = []  # (Parquet columns, array)
        for parent, key, cols, dtype in [(self.group, "X", x_columns, "float64"),
                                         *[(obsm, k, v, COLUMNS[v[0]]) for k, v in self.obsm.items()]]:
            write_elem(parent, key, np.zeros((0, len(cols)), dtype),
                       dataset_kwargs={**_NO_SHARDS, "chunks": (rows, len(cols))})
            self.arrays.append((list(cols), parent[key]))
        self.ids: list[np.ndarray] = []

    def _obs(self, ids: np.ndarray) -> pd.DataFrame:
        region = pd.Categorical.from_codes(np.zeros(len(ids), np.int8), categories=[LABEL_NAME])
        return pd.DataFrame({INSTANCE_KEY: ids, REGION_KEY: region},
                            index=pd.Index(ids.astype(str), dtype=object))

    def write(self, frame: pd.DataFrame) -> None:
        for cols, arr in self.arrays:
            arr.append(frame[cols].to_numpy(dtype=arr.dtype))
        self.ids.append(frame[INSTANCE_KEY].to_numpy())

    def close(self) -> None:
        import anndata as ad  # here: importing the measurement code (benchmarks, tests) stays light
        from anndata.io import write_elem
        from zarr.storage import MemoryStore

        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, self.id_dtype)
        # SpatialData rejects a table whose region no row has: an empty one annotates nothing
        region: str | list[str] = LABEL_NAME if len(ids) else []
        attrs = {"region": region, "region_key": REGION_KEY, "instance_key": INSTANCE_KEY}
        uns = {"spatialdata_attrs": attrs,
               METADATA_KEY: {**self.meta, "spatial_unit": "micrometer",
                              "obsm_columns": {k: list(v) for k, v in self.obsm.items()}}}
        nodes: dict[str, Any] = {}  # key -> zarr Buffer, filled by the memory store
        tables = zarr.open_group(store=MemoryStore(nodes), mode="w", zarr_format=3).require_group("tables")
        write_elem(tables, TABLE_NAME, ad.AnnData(obs=self._obs(ids), var=self.var, uns=uns),
                   dataset_kwargs=_NO_SHARDS)  # no X: the store has it already
        tables[TABLE_NAME].attrs.update({"spatialdata-encoding-type": "ngff:regions_table", **attrs,
                                         "version": SPATIALDATA_TABLE_VERSION})
        for key, buffer in nodes.items():
            if key.startswith("tables/"):  # not the memory root's own metadata
                target = self.path / key
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(buffer.to_bytes())


class _Sink:
    """Parquet writer + AnnData table fed one row group at a time."""

    def __init__(self, parquet_tmp: Path, store_path: Path, dtypes: dict[str, str], rows: int,
                 meta: Mapping[str, Any], x_columns: tuple[str, ...]) -> None:
        self.table = _AnnDataTable(store_path, dtypes["id"], rows, meta, x_columns)
        self.schema = pa.schema([(k, pa.from_numpy_dtype(np.dtype(v))) for k, v in dtypes.items()],
                                metadata={METADATA_KEY: json.dumps(meta)})
        self.writer = pq.ParquetWriter(parquet_tmp, self.schema, compression="zstd")
        self.n_rows = 0

    def write(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        self.writer.write_table(pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False))
        self.table.write(frame)
        self.n_rows += len(frame)


def write_table(
    out_dir: str | os.PathLike[str],
    frames: Iterable[pd.DataFrame | Mapping[str, Any]],
    *,
    store: LabelStoreSpec,
    metadata: Mapping[str, Any] | None = None,
    parquet_name: str = "nuclei.parquet",
    row_group_size: int = 65536,
    id_dtype: str = "uint32",
    extra_columns: tuple[str, ...] = (),
) -> int:
    """Stream per-tile tables into ``out_dir/nuclei.parquet`` and the AnnData twin; return rows.

    ``frames`` yields DataFrames (or dicts of columns) with exactly the ``COLUMNS`` names,
    e.g. from ``instance_measurements``. ``pd.read_parquet(out_dir / "nuclei.parquet")``
    reads the result. The AnnData goes to ``<store>/tables/nuclei`` (group replaced) of the
    label store ``store`` (``labels.create_store``), whose mpp the metadata records.
    ``metadata`` (JSON-able values: slide, model, checksum) joins ``table_metadata`` in both
    outputs. ``extra_columns``: float measurements after ``COLUMNS`` (a cell's, when cells
    were made: ``writers.cells.CELL_COLUMNS``), in the Parquet and in the AnnData's ``X``.
    """
    if row_group_size < 1:
        raise ValueError("row_group_size must be >= 1")
    out = Path(out_dir)
    dtypes = {**COLUMNS, **{name: "float64" for name in extra_columns}, "id": id_dtype}
    store_path = Path(store.path)
    meta = table_metadata(store.mpp, metadata, extra_columns)
    with atomic_path(out / parquet_name) as tmp:
        sink = _Sink(tmp, store_path, dtypes, row_group_size, meta, (*X_COLUMNS, *extra_columns))
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
            sink.table.close()
        finally:
            sink.writer.close()
    log.info("table: %d nuclei -> %s and %s/%s", sink.n_rows, out / parquet_name, store_path, TABLE_PATH)
    return sink.n_rows
