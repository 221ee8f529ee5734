"""The nucleus table of a real run, read the way users read it: ``tables/nuclei`` with
``anndata`` (and SpatialData where installed), ``nuclei.parquet`` with pandas/pyarrow, both
against each other and against the label image."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline import __version__
from pipeline.run import process_slide
from pipeline.slide.memory import MemorySlide
from pipeline.slide.open import register_memory_slide
from pipeline.slide_run.config import RunConfig
from pipeline.slide_run.executors import SerialExecutor
from pipeline.synthetic import synthetic_he
from pipeline.writers.table import COLUMN_UNITS, COLUMNS, METADATA_KEY, TABLE_PATH, X_COLUMNS

MODEL = "pruned80.pt"
MPP = 0.25


def _run(out: Path, rgb: np.ndarray, name: str, tissue_mask: bool) -> Path:
    path = register_memory_slide(MemorySlide(rgb, mpp=MPP, name=name))
    cfg = RunConfig(model=MODEL, out=str(out), tile_size=128, chunk=128, tissue_mask=tissue_mask)
    outcome = process_slide(path, cfg, SerialExecutor())
    assert outcome.status == "done", outcome.error
    return Path(outcome.out_dir)


@pytest.fixture(scope="module")
def slide_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rgb, _ = synthetic_he(256, 320, seed=3, mpp=MPP)
    return _run(tmp_path_factory.mktemp("run"), rgb, "table-slide", tissue_mask=False)


@pytest.fixture(scope="module")
def empty_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bare glass: no tissue, no tiles, no nuclei."""
    glass = np.full((256, 256, 3), 245, np.uint8)
    return _run(tmp_path_factory.mktemp("empty"), glass, "glass", tissue_mask=True)


def _read(out: Path) -> tuple[ad.AnnData, pd.DataFrame]:
    return ad.read_zarr(out / "nuclei.zarr" / TABLE_PATH), pd.read_parquet(out / "nuclei.parquet")


def test_anndata_table_has_the_parquet_rows_and_the_label_ids(slide_out: Path) -> None:
    table, df = _read(slide_out)
    assert len(df) > 10 and table.n_obs == len(df)
    assert table.obs["id"].to_numpy().tolist() == df["id"].tolist()
    assert table.obs["id"].dtype == np.uint32
    assert list(table.obs_names) == [str(i) for i in df["id"]]
    assert list(table.var_names) == list(X_COLUMNS)
    assert table.X.dtype == np.float64
    np.testing.assert_array_equal(table.X, df[list(X_COLUMNS)].to_numpy())
    # every Parquet column is in the AnnData, where uns says it is
    columns = table.uns[METADATA_KEY]["obsm_columns"]
    seen = {"id", *X_COLUMNS}
    for key, names in columns.items():
        names = list(names)
        np.testing.assert_array_equal(table.obsm[key], df[names].to_numpy())
        assert table.obsm[key].dtype == df[names[0]].dtype
        seen.update(names)
    assert seen == set(COLUMNS)
    # the slide has an mpp: spatial coordinates in µm (x, y), as squidpy expects
    assert table.uns[METADATA_KEY]["spatial_unit"] == "micrometer"
    np.testing.assert_allclose(table.obsm["spatial"], df[["centroid_x_px", "centroid_y_px"]] * MPP)
    labels = zarr.open_group(str(slide_out / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]
    ids = np.unique(labels[labels > 0])
    assert sorted(table.obs["id"].tolist()) == ids.tolist()
    # area_px is each label's pixel count; the centroid lies on its nucleus's pixels
    counts = np.bincount(labels.ravel())[table.obs["id"].to_numpy().astype(int)]
    np.testing.assert_allclose(table[:, "area_px"].X.ravel(), counts)
    x, y = np.rint(table.obsm["centroid_px"]).astype(int).T
    assert np.mean(labels[y, x] == table.obs["id"].to_numpy()) > 0.9


def test_anndata_table_has_spatialdata_attrs(slide_out: Path) -> None:
    table, _ = _read(slide_out)
    attrs = table.uns["spatialdata_attrs"]
    assert attrs == {"region": "nuclei", "region_key": "region", "instance_key": "id"}
    assert isinstance(table.obs["region"].dtype, pd.CategoricalDtype)
    assert set(table.obs["region"]) == {"nuclei"}
    assert table.obs["id"].is_unique
    root = zarr.open_group(str(slide_out / "nuclei.zarr"), mode="r")
    group = root[TABLE_PATH]
    assert group.attrs["encoding-type"] == "anndata"
    assert {k: group.attrs[k] for k in attrs} == attrs and group.attrs["version"] == "0.1"
    # the region names the labels element the ids come from
    assert attrs["region"] in root["labels"].attrs["ome"]["labels"]


def test_parquet_metadata_says_what_the_numbers_mean(slide_out: Path) -> None:
    raw = pq.read_schema(slide_out / "nuclei.parquet").metadata
    meta = json.loads(raw[METADATA_KEY.encode()])
    summary = json.loads((slide_out / "summary.json").read_text())
    assert meta["mpp"] == MPP == summary["slide_mpp"]
    assert meta["units"] == COLUMN_UNITS and set(meta["units"]) == set(COLUMNS)
    assert meta["model"] == MODEL and meta["model_sha256"] == summary["model_sha256"]
    assert len(meta["model_sha256"]) == 64
    assert meta["slide"] == summary["slide"] and meta["slide_id"]
    assert meta["wsi_nuclei_version"] == __version__
    assert "array-index" in meta["coordinates"]
    # the AnnData carries the same metadata
    table, _ = _read(slide_out)
    uns = table.uns[METADATA_KEY]
    assert {k: uns[k] for k in ("mpp", "model", "model_sha256", "slide", "slide_id")} == {
        k: meta[k] for k in ("mpp", "model", "model_sha256", "slide", "slide_id")}
    # the measurements' units beside them in var, the other columns' in uns
    assert dict(table.var["unit"]) == {k: meta["units"][k] for k in X_COLUMNS}
    assert dict(uns["units"]) | dict(table.var["unit"]) == meta["units"]


def test_empty_slide_gives_readable_tables(empty_out: Path) -> None:
    table, df = _read(empty_out)
    assert table.n_obs == 0 == len(df) and list(df.columns) == list(COLUMNS)
    assert list(table.var_names) == list(X_COLUMNS) and table.X.shape == (0, len(X_COLUMNS))
    assert table.obsm["spatial"].shape == (0, 2) and table.obsm["bbox_px"].shape == (0, 4)
    assert list(table.obs.columns) == ["id", "region"]
    assert table.uns["spatialdata_attrs"]["region_key"] == "region"
    assert len(table.uns["spatialdata_attrs"]["region"]) == 0  # annotates nothing
    meta = json.loads(pq.read_schema(empty_out / "nuclei.parquet").metadata[METADATA_KEY.encode()])
    assert meta["mpp"] == MPP and meta["model"] == MODEL


def test_spatialdata_reads_the_table(slide_out: Path, empty_out: Path) -> None:
    """SpatialData (not a dependency) finds and validates the table. Only ``tables`` is
    selected: SpatialData reads raster elements only in its own NGFF dialect, not plain
    NGFF 0.5 labels."""
    sd = pytest.importorskip("spatialdata")
    from spatialdata.models import TableModel

    for out, n in ((slide_out, None), (empty_out, 0)):
        with pytest.warns(UserWarning):  # not SpatialData's own container format
            sdata = sd.read_zarr(out / "nuclei.zarr", selection=("tables",))
        table = sdata.tables["nuclei"]
        TableModel().validate(table)
        assert table.n_obs == (len(pd.read_parquet(out / "nuclei.parquet")) if n is None else n)
