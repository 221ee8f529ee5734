"""``wsi-nuclei export --spatialdata`` on real runs, read back the way a scverse user reads
it (``spatialdata.read_zarr``). Needs the ``[spatialdata]`` extra; only the test of the
missing-package message runs without it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from pipeline.cli import main
from pipeline.pyramid_tiff import write_pyramidal_tiff
from pipeline.run import process_slide
from pipeline.slide_run.config import RunConfig
from pipeline.slide_run.executors import SerialExecutor
from pipeline.synthetic import synthetic_he

MODEL = "pruned80.pt"
MPP = 0.25
SIDE = 256
CHUNK = 64  # two pyramid levels on a 256-px slide
EXPORT = "nuclei.sdata.zarr"


def _run(root: Path, rgb: np.ndarray, name: str) -> Path:
    slide = write_pyramidal_tiff(root / f"{name}.tif", rgb, mpp=MPP, compression="zlib")
    cfg = RunConfig(model=MODEL, out=str(root / "out"), tile_size=SIDE, chunk=CHUNK)
    outcome = process_slide(str(slide), cfg, SerialExecutor())
    assert outcome.status == "done", outcome.error
    return Path(outcome.out_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic slide with nuclei, and bare glass (no tissue, no nuclei)."""
    pytest.importorskip("spatialdata")
    root = tmp_path_factory.mktemp("export")
    rgb, _ = synthetic_he(SIDE, SIDE, seed=3, mpp=MPP)
    return _run(root, rgb, "tissue"), _run(root, np.full((SIDE, SIDE, 3), 245, np.uint8), "glass")


def _export(out: Path, *flags: str) -> object:
    import spatialdata as sd

    assert main(["export", str(out), "--spatialdata", *flags]) == 0
    return sd.read_zarr(out / EXPORT)


def _level0(element: object) -> np.ndarray:
    from spatialdata import get_pyramid_levels

    return get_pyramid_levels(element, n=0).values


def _matrix(element: object) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    return get_transformation(element, "global").to_affine_matrix(("y", "x"), ("y", "x"))


def test_export_reads_back_with_table_linked_to_labels(runs: tuple[Path, Path]) -> None:
    from spatialdata import get_element_instances, get_pyramid_levels
    from spatialdata.models import TableModel

    out = runs[0]
    sdata = _export(out)
    print(sdata)
    assert list(sdata.images) == ["slide"]
    assert sorted(sdata.labels) == ["nuclei_labels", "tissue_labels"]
    assert list(sdata.tables) == ["nuclei_table"]
    table = sdata.tables["nuclei_table"]
    TableModel().validate(table)
    assert table.uns["spatialdata_attrs"] == {"region": "nuclei_labels", "region_key": "region",
                                              "instance_key": "id"}
    # the table's instance ids are exactly the label values present, and the Parquet's ids
    labels = _level0(sdata.labels["nuclei_labels"])
    present = np.unique(labels[labels > 0])
    assert len(present) > 10
    assert sorted(table.obs["id"].tolist()) == present.tolist()
    assert get_element_instances(sdata.labels["nuclei_labels"]).tolist() == present.tolist()
    assert table.obs["id"].tolist() == pd.read_parquet(out / "nuclei.parquet")["id"].tolist()
    # the labels pyramid is the store's own, level by level (no pixel recomputed)
    store = zarr.open_group(str(out / "nuclei.zarr"), mode="r")
    levels = list(sdata.labels["nuclei_labels"])
    assert levels == ["scale0", "scale1"]
    for k, level in enumerate(levels):
        np.testing.assert_array_equal(sdata.labels["nuclei_labels"][level]["image"].values,
                                      store[f"labels/nuclei/s{k}"][...])
    # the image is the full-resolution slide, pixel for pixel, r/g/b channels
    image = get_pyramid_levels(sdata.images["slide"], n=0)
    assert list(image.coords["c"].values) == ["r", "g", "b"]
    slide = tifffile.imread(json.loads((out / "summary.json").read_text())["slide"], level=0)
    np.testing.assert_array_equal(np.moveaxis(image.values, 0, 2), slide)


def test_export_puts_every_element_on_one_micrometre_grid(runs: tuple[Path, Path]) -> None:
    from spatialdata import get_extent

    out = runs[0]
    sdata = _export(out, "--overwrite")
    labels, image = sdata.labels["nuclei_labels"], sdata.images["slide"]
    # the same level-0 grid: same shape, same transform, level-0 pixel i = [i, i + 1) * mpp µm
    assert _level0(labels).shape == _level0(image).shape[1:] == (SIDE, SIDE)
    np.testing.assert_allclose(_matrix(labels), np.diag([MPP, MPP, 1.0]))
    np.testing.assert_allclose(_matrix(image), np.diag([MPP, MPP, 1.0]))
    # the tissue mask (its own coarse pixels) covers the same µm extent
    tissue = sdata.labels["tissue_labels"]
    per_px = zarr.open_group(str(out / "nuclei.zarr"), mode="r").attrs["wsi_nuclei_store"]["tissue_per_px"]
    np.testing.assert_allclose(_matrix(tissue), np.diag([MPP * per_px, MPP * per_px, 1.0]))
    for element in (labels, image, tissue):
        extent = get_extent(element, coordinate_system="global")
        np.testing.assert_allclose([extent["x"], extent["y"]], [(0, SIDE * MPP)] * 2)
    # obsm["spatial"] is in the same µm: each centroid falls on its own nucleus
    table = sdata.tables["nuclei_table"]
    x, y = np.floor(table.obsm["spatial"] / MPP).astype(int).T
    values = _level0(labels)[y, x]
    assert np.mean(values == table.obs["id"].to_numpy()) > 0.9


def test_export_of_a_run_without_nuclei(runs: tuple[Path, Path], caplog) -> None:
    # its slide file gone: the store's reduced copy, with a warning
    Path(json.loads((runs[1] / "summary.json").read_text())["slide"]).unlink()
    sdata = _export(runs[1])
    assert "exporting the reduced copy" in caplog.text
    table = sdata.tables["nuclei_table"]
    assert table.n_obs == 0 and table.n_vars > 0
    assert list(table.uns["spatialdata_attrs"]["region"]) == []  # annotates nothing
    assert not _level0(sdata.labels["nuclei_labels"]).any()
    assert not _level0(sdata.labels["tissue_labels"]).any()
    store = zarr.open_group(str(runs[1] / "nuclei.zarr"), mode="r")
    np.testing.assert_array_equal(_level0(sdata.images["slide"]), store["s0"][...])
    per_px = store.attrs["wsi_nuclei_store"]["image_per_px"]
    np.testing.assert_allclose(_matrix(sdata.images["slide"]), np.diag([MPP * per_px, MPP * per_px, 1.0]))


def test_export_refuses_to_overwrite_and_leaves_no_temporary(runs: tuple[Path, Path], capsys) -> None:
    out = runs[1]
    if not (out / EXPORT).exists():
        _export(out, "--no-slide")
    before = sorted(p.name for p in (out / EXPORT).iterdir())
    capsys.readouterr()
    assert main(["export", str(out), "--spatialdata"]) == 2
    assert "exists (use --overwrite" in capsys.readouterr().err
    _export(out, "--overwrite", "--no-slide")
    assert sorted(p.name for p in (out / EXPORT).iterdir()) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp-")] == []


def test_export_of_a_folder_that_is_not_a_finished_slide(tmp_path: Path, capsys) -> None:
    (tmp_path / "nuclei.zarr").mkdir()
    assert main(["export", str(tmp_path), "--spatialdata"]) == 2  # no summary.json
    assert "not a wsi-nuclei output folder" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert main(["export", str(tmp_path), "--spatialdata"]) == 2
    assert "did not finish (status 'failed')" in capsys.readouterr().err


def test_export_without_spatialdata_names_the_extra(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "nuclei.zarr").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"status": "done"}))
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # import spatialdata -> ImportError
    assert main(["export", str(tmp_path), "--spatialdata"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "wsi-nuclei[spatialdata]" in err
