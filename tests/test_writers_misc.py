"""Nucleus table (measurements, Parquet + AnnData twin, streaming), preview PNG, summary JSON
and the atomic file helpers."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

from pipeline.atomic import atomic_path, atomic_write_bytes, atomic_write_text, save_npz_atomic
from pipeline.writers.colours import NUCLEUS_RGB, TISSUE_RGB
from pipeline.writers.labels import LabelStoreSpec, create_store
from pipeline.writers.preview import write_preview
from pipeline.writers.summary import is_done, read_summary, write_summary
from pipeline.writers.table import COLUMNS, X_COLUMNS, instance_measurements, write_table


def _square() -> tuple[np.ndarray, np.ndarray]:
    lab = np.zeros((10, 12), np.int32)
    lab[2:6, 3:7] = 1  # 4x4 model px square
    prob = np.zeros((10, 12), np.float32)
    prob[2:6, 3:7] = 0.5
    prob[2, 3] = 0.9
    return lab, prob


def test_square_measurements_in_level0_units() -> None:
    lab, prob = _square()
    t = instance_measurements(lab, prob, (100, 40), 2.0, 0.25, id_offset=1000)
    assert list(t.columns) == list(COLUMNS)
    [row] = t.to_dict("records")
    assert row["id"] == 1001 and t["id"].dtype == np.uint32
    assert row["area_px"] == 64.0  # 16 model px * 2^2
    # the outline of a 4 x 4 model-px square, smoothed: its polygon area, not the pixel count
    assert 0.8 * 64.0 * 0.25**2 <= row["Area µm^2"] <= 64.0 * 0.25**2
    # level-0 rows (102..105)*2 -> 204..211, centre index 207.5; cols (43..46)*2 -> 86..93
    assert row["centroid_y_px"] == 207.5 and row["centroid_x_px"] == 89.5
    assert row["centroid_y_um"] == 207.5 * 0.25 and row["centroid_x_um"] == 89.5 * 0.25
    assert (row["bbox_y0"], row["bbox_x0"], row["bbox_y1"], row["bbox_x1"]) == (204, 86, 212, 94)
    assert row["Solidity"] == pytest.approx(1.0) and row["Eccentricity"] == pytest.approx(0.0, abs=1e-12)
    assert row["Detection probability"] == pytest.approx((15 * 0.5 + 0.9) / 16)
    assert row["Length µm"] > 0 and 0.8 < row["Circularity"] <= 1.0
    assert row["Min diameter µm"] <= row["Max diameter µm"] <= row["Length µm"] / 2
    empty = instance_measurements(np.zeros((3, 3), np.int32), np.zeros((3, 3)), (0, 0), 1.0, 0.5)
    assert len(empty) == 0 and list(empty.columns) == list(COLUMNS)


@pytest.mark.parametrize("seed", [0, 1])
def test_moments_match_skimage_regionprops(seed: int) -> None:
    """Area, centroid, bbox, eccentricity and mean probability from one bincount pass
    equal skimage's regionprops (random labels: many shapes, parts and holes)."""
    from skimage.measure import regionprops_table

    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 40, (70, 90)).astype(np.int32)
    lab[rng.random(lab.shape) < 0.5] = 0
    lab[10:30, 20:60] = 41  # a large elongated one
    prob = rng.random(lab.shape)
    s, (oy, ox) = 2.0, (10, 20)
    t = instance_measurements(lab, prob, (oy, ox), s, 0.5)
    p = regionprops_table(lab, prob, properties=("label", "area", "centroid", "bbox", "eccentricity",
                                                 "intensity_mean"))
    assert t["id"].tolist() == p["label"].tolist()
    np.testing.assert_allclose(t["Eccentricity"], p["eccentricity"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(t["Detection probability"], p["intensity_mean"], rtol=1e-12)
    np.testing.assert_array_equal(t["area_px"], p["area"] * s * s)
    np.testing.assert_allclose(t["centroid_y_px"], (p["centroid-0"] + oy + 0.5) * s - 0.5, rtol=1e-12)
    np.testing.assert_allclose(t["centroid_x_px"], (p["centroid-1"] + ox + 0.5) * s - 0.5, rtol=1e-12)
    for ours, theirs, off in (("bbox_y0", "bbox-0", oy), ("bbox_x0", "bbox-1", ox),
                              ("bbox_y1", "bbox-2", oy), ("bbox_x1", "bbox-3", ox)):
        np.testing.assert_array_equal(t[ours], (p[theirs] + off) * s)


def _tiles(n_tiles: int, per_tile: int) -> list[pd.DataFrame]:
    frames = []
    for t in range(n_tiles):
        lab = np.zeros((8, 4 * per_tile), np.int32)
        for i in range(per_tile):
            lab[1 : 2 + i % 3, 4 * i : 4 * i + 2] = i + 1
        frames.append(instance_measurements(lab, np.ones(lab.shape), (8 * t, 0), 1.0, 0.5,
                                            id_offset=t * per_tile))
    return frames


def _store(tmp_path: Path) -> LabelStoreSpec:
    """The label store of ``tmp_path``, where the run puts it (``nuclei.zarr``), at 0.5 µm/px."""
    return create_store(tmp_path / "nuclei.zarr", (32, 32), 16, 0.5)


def test_table_parquet_equals_anndata(tmp_path: Path) -> None:
    frames = _tiles(5, 7)
    n = write_table(tmp_path, iter(frames), store=_store(tmp_path), row_group_size=8)
    assert n == 35
    df = pd.read_parquet(tmp_path / "nuclei.parquet")
    assert len(df) == 35 and list(df.columns) == list(COLUMNS)
    assert df["id"].tolist() == list(range(1, 36))
    pd.testing.assert_frame_equal(df, pd.concat(frames, ignore_index=True))
    assert pq.ParquetFile(tmp_path / "nuclei.parquet").metadata.num_row_groups == 5  # 8,8,8,8,3
    table = ad.read_zarr(tmp_path / "nuclei.zarr" / "tables" / "nuclei")
    assert table.n_obs == 35 and list(table.var_names) == list(X_COLUMNS)
    assert table.obs["id"].dtype == np.uint32 and table.obs["id"].tolist() == df["id"].tolist()
    np.testing.assert_array_equal(table.X, df[list(X_COLUMNS)].to_numpy())
    np.testing.assert_array_equal(table.obsm["centroid_px"], df[["centroid_x_px", "centroid_y_px"]])
    np.testing.assert_array_equal(table.obsm["bbox_px"], df[["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]])
    chunks = zarr.open_array(tmp_path / "nuclei.zarr", path="tables/nuclei/X", mode="r").chunks
    assert chunks == (8, len(X_COLUMNS))  # one chunk per row group


def test_table_into_given_store_from_column_dicts(tmp_path: Path) -> None:
    spec = create_store(tmp_path / "elsewhere.zarr", (32, 32), 16, 0.5)
    dicts = [{k: v.to_numpy() for k, v in f.items()} for f in _tiles(2, 4)]
    dicts[1]["id"] = dicts[1]["id"].astype(np.uint64)  # wider ids are narrowed when they fit
    assert write_table(tmp_path / "out", dicts, store=spec) == 8
    table = ad.read_zarr(Path(spec.path) / "tables" / "nuclei")
    assert table.obs["id"].dtype == np.uint32 and table.obs["id"].tolist() == list(range(1, 9))
    df = pd.read_parquet(tmp_path / "out" / "nuclei.parquet")
    assert df["id"].tolist() == list(range(1, 9))
    # the store knows its mpp: spatial coordinates in µm, like the labels' NGFF coordinates
    assert table.uns["wsi_nuclei"]["spatial_unit"] == "micrometer"
    np.testing.assert_array_equal(table.obsm["spatial"], df[["centroid_x_um", "centroid_y_um"]])
    meta = pq.read_schema(tmp_path / "out" / "nuclei.parquet").metadata
    assert json.loads(meta[b"wsi_nuclei"])["mpp"] == 0.5


def test_table_streams_row_groups(tmp_path: Path) -> None:
    """Row groups are flushed while the input is still being produced."""
    seen: list[int] = []

    def frames():
        for i, frame in enumerate(_tiles(6, 5)):
            if i == 4:  # 20 rows already yielded, row group 6 -> >= 3 groups flushed
                x = zarr.open_array(tmp_path / "nuclei.zarr", path="tables/nuclei/X", mode="r")
                seen.append(x.shape[0])
            yield frame

    assert write_table(tmp_path, frames(), store=_store(tmp_path), row_group_size=6) == 30
    assert seen and seen[0] >= 18


def test_bad_table_leaves_no_parquet(tmp_path: Path) -> None:
    good = _tiles(1, 3)[0]
    store = _store(tmp_path)
    with pytest.raises(ValueError, match="columns"):
        write_table(tmp_path, [good, good.drop(columns=["Solidity"])], store=store)
    assert not (tmp_path / "nuclei.parquet").exists()
    huge = {k: v.to_numpy() for k, v in good.items()}
    huge["id"] = huge["id"].astype(np.uint64) + np.uint64(2**32)  # would wrap in uint32
    with pytest.raises(ValueError, match="range"):
        write_table(tmp_path, [huge], store=store)
    assert not (tmp_path / "nuclei.parquet").exists()
    assert write_table(tmp_path, [], store=store) == 0
    assert len(pd.read_parquet(tmp_path / "nuclei.parquet")) == 0


def test_preview_png_has_outlines(tmp_path: Path) -> None:
    thumb = np.full((40, 50, 3), 230, np.uint8)
    labels = np.zeros((40, 50), np.int32)
    labels[5:12, 5:12] = 1
    labels[20:30, 20:28] = 2
    tissue = np.zeros((20, 25), bool)  # half resolution: resampled to the thumbnail
    tissue[2:18, 2:23] = True
    write_preview(tmp_path / "preview.png", thumb, labels, tissue)
    img = np.asarray(Image.open(tmp_path / "preview.png"))
    assert img.shape == (40, 50, 3)
    green = np.all(img == NUCLEUS_RGB, axis=2)
    blue = np.all(img == TISSUE_RGB, axis=2)
    assert green.sum() == 24 + 32  # inner boundary pixels of a 7x7 and a 10x8 box
    assert green[5, 5] and not green[8, 8]  # outline, not fill
    assert blue.sum() > 0 and blue[4, 20] and not blue[20, 10]
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]


def test_summary_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    assert read_summary(path) is None and not is_done(path)
    write_summary(path, {"status": "running", "n": np.int64(3), "mpp": np.float32(0.5),
                         "bad": float("nan"), "inf": [float("inf"), 1.0], "path": tmp_path})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data == {"status": "running", "n": 3, "mpp": 0.5, "bad": None, "inf": [None, 1.0],
                    "path": str(tmp_path)}
    assert text.startswith('{\n  "bad"')
    assert not is_done(path)
    write_summary(path, {"status": "done"})
    assert is_done(path)
    path.write_text("{ truncated")
    assert read_summary(path) is None and not is_done(path)
    path.write_text("[1, 2]")
    assert read_summary(path) is None
    with pytest.raises(TypeError):
        write_summary(path, {"x": object()})
    assert path.read_text() == "[1, 2]"  # failed write left the old file


def test_atomic_helpers(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(OSError), atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith("a.txt") and tmp.name.startswith(".")
        tmp.write_bytes(b"partial")
        raise OSError("disk full")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "never.bin"):
        pass
    npz = tmp_path / "tile_0001.npz.cache"  # exact name kept: numpy does not append .npz
    save_npz_atomic(npz, labels=np.arange(6).reshape(2, 3), prob=np.ones(2, np.float32))
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["labels"], np.arange(6).reshape(2, 3))
        assert data["prob"].dtype == np.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "tile_0001.npz.cache"]
    big = np.repeat(np.arange(64, dtype=np.int32), 4096).reshape(512, 512)  # runs: compressible
    for level in (0, 1, 9):
        out = tmp_path / f"level{level}.npz"
        save_npz_atomic(out, level=level, labels=big, scalar=np.array(3.5),
                        text=np.frombuffer(b"ab\n", np.uint8))
        with np.load(out) as data:
            assert np.array_equal(data["labels"], big) and data["labels"].dtype == np.int32
            assert float(data["scalar"]) == 3.5 and data["text"].tobytes() == b"ab\n"
    sizes = {level: (tmp_path / f"level{level}.npz").stat().st_size for level in (0, 1, 9)}
    assert sizes[0] > big.nbytes and sizes[1] < sizes[0] / 10 and sizes[9] <= sizes[1]
    # packed members are stored as they are, the others still deflated
    from pipeline.slide_run.tile_file import pack_texts, unpack_texts

    texts = ['{"geometry":"µ"}', "", "x" * 5000]
    mixed = tmp_path / "mixed.npz"
    save_npz_atomic(mixed, labels=big, features=pack_texts(texts), stored=("features",))
    with zipfile.ZipFile(mixed) as archive:
        kinds = {i.filename: i.compress_type for i in archive.infolist()}
    assert kinds == {"labels.npy": zipfile.ZIP_DEFLATED, "features.npy": zipfile.ZIP_STORED}
    with np.load(mixed) as data:
        assert unpack_texts(data["features"]) == texts and np.array_equal(data["labels"], big)
    assert unpack_texts(pack_texts([])) == []
