"""OME-Zarr label store: chunk-wise writing, strided pyramid, RGB root image, tissue label,
NGFF 0.5 metadata checked by three independent readers (zarr, ome_zarr.reader,
ome-zarr-models), and the coordinate transforms that make them overlay."""

from __future__ import annotations

import json
import pickle
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader
from ome_zarr_models import open_ome_zarr
from ome_zarr_models.v05 import Image, ImageLabel, Labels
from scipy import ndimage as ndi

from pipeline.types import Box
from pipeline.writers.labels import (
    build_pyramid,
    build_pyramid_block,
    create_store,
    open_store,
    pyramid_blocks,
    pyramid_shapes,
    write_block,
    write_image,
    write_tissue,
)
from pipeline.writers.ngff import finalize
from pipeline.writers.table import instance_measurements, write_table

BIG = 70_000  # ids above 2^16 catch any narrowing to uint16


def synthetic_labels(h: int = 70, w: int = 90) -> np.ndarray:
    """Discs, two touching discs, a C shape (concavity), instances on three image borders
    and a 1-px instance; every instance is one 4-connected component."""
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((h, w), np.int64)

    def disc(cy: float, cx: float, r: float) -> np.ndarray:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    lab[disc(15, 15, 8)] = 1
    left = disc(40, 20, 7)
    lab[left] = 2
    lab[disc(40, 34, 7) & ~left] = 3  # touches instance 2
    lab[10:30, 48:52] = 4  # a "C": deep concavity
    lab[10:14, 48:64] = 4
    lab[26:30, 48:64] = 4
    lab[0:5, w - 10:w] = 5  # top-right corner
    lab[h - 5:h, 0:6] = 6  # bottom-left corner
    lab[h - 8:h, 40:50] = 7  # bottom edge
    lab[50, 70] = 8  # single pixel
    for v in range(1, 9):
        _, n = ndi.label(lab == v)
        assert n == 1, f"instance {v} must be one 4-connected part"
    return lab


def _write_all(tmp_path: Path, lab: np.ndarray, chunk: int = 16, mpp: float = 0.25,
               n_levels: int | None = None, threads: bool = True):
    spec = create_store(tmp_path / "nuclei.zarr", lab.shape, chunk, mpp, n_levels=n_levels)
    boxes = spec.chunk_boxes()
    random.Random(0).shuffle(boxes)  # any order
    # blocks of 2x1 chunks (still chunk-aligned) written independently by two threads
    merged = [Box(b.y0, b.x0, min(b.y0 + 2 * chunk, lab.shape[0]), b.x1)
              for b in boxes if (b.y0 // chunk) % 2 == 0]
    if threads:
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda b: write_block(spec, b, lab[b.slices()]), merged))
    else:
        for b in merged:
            write_block(spec, b, lab[b.slices()])
    build_pyramid(spec)
    return spec


@pytest.fixture()
def lab() -> np.ndarray:
    lab = synthetic_labels()
    return np.where(lab > 0, lab + BIG, 0).astype(np.uint32)


def test_blocks_round_trip_and_pyramid_is_exact_striding(tmp_path: Path, lab: np.ndarray) -> None:
    spec = _write_all(tmp_path, lab, chunk=16)
    assert spec.level_shapes == ((70, 90), (35, 45), (18, 23))
    root = zarr.open_group(spec.path, mode="r")
    s0 = root["labels/nuclei/s0"]
    assert s0.dtype == np.uint32 and s0.chunks == (16, 16)
    np.testing.assert_array_equal(s0[:], lab)
    for k in range(1, spec.n_levels):
        np.testing.assert_array_equal(root[f"labels/nuclei/s{k}"][:], lab[:: 2**k, :: 2**k])
        # never averaged: every value in a level is a value of level 0
        assert set(np.unique(root[f"labels/nuclei/s{k}"][:])) <= set(np.unique(lab))


@pytest.mark.parametrize("chunk", [8, 16])
def test_pyramid_of_painted_regions_equals_full_striding(tmp_path: Path, chunk: int) -> None:
    """Labels only in a few blocks (tissue islands on a large empty slide): building the
    pyramid from those blocks alone gives every level exactly, and computes far fewer
    chunks than the whole extent."""
    shape = (300, 410)
    lab = np.zeros(shape, np.uint32)
    islands = [Box(2 * chunk, 3 * chunk, 4 * chunk, 5 * chunk),
               Box(shape[0] - chunk - shape[0] % chunk, shape[1] - shape[1] % chunk, *shape)]
    rng = np.random.default_rng(chunk)
    for i, b in enumerate(islands):
        lab[b.slices()] = rng.integers(0, 3, size=b.shape) * (i + 1) + BIG
    spec = create_store(tmp_path / "nuclei.zarr", shape, chunk, 0.25)
    for b in islands:
        write_block(spec, b, lab[b.slices()])
    computed = build_pyramid(spec, islands)
    total = sum(-(-h // chunk) * -(-w // chunk) for h, w in spec.level_shapes[1:])
    assert computed < total / 4
    root = zarr.open_group(spec.path, mode="r")
    for k in range(1, spec.n_levels):
        np.testing.assert_array_equal(root[f"labels/nuclei/s{k}"][:], lab[:: 2**k, :: 2**k])


def test_write_block_rejects_misaligned_or_bad_blocks(tmp_path: Path) -> None:
    spec = create_store(tmp_path / "s.zarr", (40, 50), 16, 0.25)
    ok = np.ones((16, 16), np.uint32)
    with pytest.raises(ValueError, match="aligned"):
        write_block(spec, Box(8, 0, 24, 16), ok)
    with pytest.raises(ValueError, match="aligned"):
        write_block(spec, Box(0, 0, 16, 20), np.ones((16, 20), np.uint32))  # ends mid-chunk
    with pytest.raises(ValueError, match="aligned"):
        write_block(spec, Box(32, 48, 48, 64), ok)  # outside the image
    with pytest.raises(ValueError, match="shape"):
        write_block(spec, Box(0, 0, 16, 16), np.ones((16, 15), np.uint32))
    with pytest.raises(ValueError, match="fit"):
        write_block(spec, Box(0, 0, 16, 16), np.full((16, 16), 2**33, np.int64))
    write_block(spec, Box(32, 48, 40, 50), np.full((8, 2), 7, np.int32))  # edge block is fine
    assert zarr.open_array(spec.path, path="labels/nuclei/s0", mode="r")[39, 49] == 7


def test_pyramid_levels_rule_and_spec_pickles(tmp_path: Path) -> None:
    assert pyramid_shapes((100_000, 80_000), 1024) == tuple(
        (-(-100_000 // 2**k), -(-80_000 // 2**k)) for k in range(7))
    assert max(pyramid_shapes((100_000, 80_000), 1024)[-1]) <= 2048
    assert pyramid_shapes((10, 10), 16) == ((10, 10),)
    assert len(pyramid_shapes((10, 10), 16, n_levels=3)) == 3
    spec = create_store(tmp_path / "p.zarr", (33, 17), 8, 0.5, n_levels=4)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert spec.level_shapes == ((33, 17), (17, 9), (9, 5), (5, 3))


def test_unfinished_store_has_no_ome_metadata(tmp_path: Path, lab: np.ndarray) -> None:
    spec = _write_all(tmp_path, lab)
    for group in ("", "labels", "labels/nuclei"):
        attrs = json.loads((Path(spec.path) / group / "zarr.json").read_text())["attributes"]
        assert "ome" not in attrs, group
    assert open_ome_zarr_fails(spec.path)


def open_ome_zarr_fails(path: str) -> bool:
    try:
        open_ome_zarr(zarr.open_group(path, mode="r"))
    except Exception:
        return True
    return False


def overview_of(lab: np.ndarray, d: int) -> np.ndarray:
    """A made-up RGB overview of a slide the size of ``lab``, ``d`` level-0 px per pixel."""
    h, w = -(-lab.shape[0] // d), -(-lab.shape[1] // d)
    yy, xx = np.mgrid[:h, :w]
    return np.stack([yy * 7 % 256, xx * 5 % 256, (yy + xx) % 256], axis=2).astype(np.uint8)


def _finished(tmp_path: Path, lab: np.ndarray, mpp: float = 0.25):
    spec = _write_all(tmp_path, lab, mpp=mpp)
    mask = np.zeros((9, 12), bool)
    mask[1:7, 2:9] = True
    write_tissue(spec, mask, 8.0)
    write_image(spec, overview_of(lab, 2), 2.0)
    write_table(tmp_path, [instance_measurements(synthetic_labels().astype(np.int32),
                                                 np.ones(lab.shape, np.float32), (0, 0), 1.0, mpp,
                                                 id_offset=BIG)], store=spec)
    finalize(spec, name="slide-1", colors=[{"label-value": BIG + 1, "rgba": [255, 0, 0, 255]}],
             extra_attrs={"wsi_nuclei": {"slide": "slide-1.svs"}})
    return spec


def test_ome_zarr_reader_reads_levels_and_values(tmp_path: Path, lab: np.ndarray) -> None:
    spec = _finished(tmp_path, lab)
    nodes = list(Reader(parse_url(spec.path))())
    label_nodes = {n.metadata["name"]: n for n in nodes if n.first(Label) is not None}
    assert sorted(label_nodes) == ["nuclei", "tissue"]
    node = label_nodes["nuclei"]
    assert len(node.data) == spec.n_levels == 3
    for k, level in enumerate(node.data):
        np.testing.assert_array_equal(np.asarray(level), lab[:: 2**k, :: 2**k])
    assert len(label_nodes["tissue"].data) == spec.n_levels
    image = nodes[0]  # the root image is the slide, RGB
    assert image.first(Label) is None and image.metadata["name"] == "slide-1"
    assert [d.shape for d in image.data] == [(3, 35, 45), (3, 18, 23), (3, 9, 12)]
    assert image.metadata["axes"][0] == {"name": "c", "type": "channel"}
    assert image.metadata["channel_names"] == ["Red", "Green", "Blue"]
    assert image.metadata["contrast_limits"] == [[0, 255]] * 3
    np.testing.assert_array_equal(np.moveaxis(np.asarray(image.data[0]), 0, 2), overview_of(lab, 2))


def test_ome_zarr_models_validate_store(tmp_path: Path, lab: np.ndarray) -> None:
    spec = _finished(tmp_path, lab)
    root = zarr.open_group(spec.path, mode="r")
    model = open_ome_zarr(root)
    assert isinstance(model, Image)
    assert model.labels is not None and model.labels.label_paths == ["nuclei", "tissue"]
    assert [a.name for a in model.ome_attributes.multiscales[0].axes] == ["c", "y", "x"]
    Labels.from_zarr(root["labels"])
    image_label = ImageLabel.from_zarr(root["labels/nuclei"])
    assert len(image_label.ome_attributes.multiscales[0].datasets) == spec.n_levels
    assert image_label.ome_attributes.image_label is not None


def test_metadata_scales_units_and_versions(tmp_path: Path, lab: np.ndarray) -> None:
    spec = _finished(tmp_path, lab)
    store = Path(spec.path)
    ome = json.loads((store / "labels/nuclei/zarr.json").read_text())["attributes"]["ome"]
    assert ome["version"] == "0.5"
    assert ome["image-label"]["version"] == "0.5"
    assert ome["image-label"]["source"] == {"image": "../../"}
    assert ome["image-label"]["colors"] == [{"label-value": BIG + 1, "rgba": [255, 0, 0, 255]}]
    ms = ome["multiscales"][0]
    assert [a["unit"] for a in ms["axes"]] == ["micrometer", "micrometer"]
    for k, ds in enumerate(ms["datasets"]):
        assert ds["path"] == f"s{k}"
        assert ds["coordinateTransformations"] == [{"type": "scale", "scale": [0.25 * 2**k] * 2}]
    labels_ome = json.loads((store / "labels/zarr.json").read_text())["attributes"]["ome"]
    assert labels_ome == {"version": "0.5", "labels": ["nuclei", "tissue"]}
    root_attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    assert root_attrs["wsi_nuclei"] == {"slide": "slide-1.svs"}
    root = root_attrs["ome"]
    assert root["version"] == "0.5"
    assert [a.get("unit") for a in root["multiscales"][0]["axes"]] == [None, "micrometer", "micrometer"]
    channels = root["omero"]["channels"]
    assert [c["color"] for c in channels] == ["FF0000", "00FF00", "0000FF"]
    assert all(c["window"]["start"] == 0 and c["window"]["end"] == 255 for c in channels)
    tissue = json.loads((store / "labels/tissue/zarr.json").read_text())["attributes"]["ome"]
    assert tissue["image-label"]["source"] == {"image": "../../"}
    assert tissue["image-label"]["colors"][0]["label-value"] == 1


def test_every_array_has_dimension_names(tmp_path: Path, lab: np.ndarray) -> None:
    spec = _finished(tmp_path, lab)
    root = Path(spec.path)
    nodes = {f.parent.relative_to(root).as_posix(): json.loads(f.read_text())
             for f in root.rglob("zarr.json")}
    # the NGFF arrays (RGB, nuclei and tissue levels); tables/ is AnnData's encoding, not NGFF
    arrays = [a for k, a in nodes.items() if a["node_type"] == "array" and not k.startswith("tables/")]
    assert len(arrays) == 3 * spec.n_levels
    assert nodes["s0"]["dimension_names"] == ["c", "y", "x"]
    assert nodes["tables/nuclei"]["attributes"]["encoding-type"] == "anndata"
    for meta in arrays:
        assert meta.get("dimension_names") and len(meta["dimension_names"]) == len(meta["shape"])


def _centres(ms: dict, level: int, n: int, axis: int = -1) -> tuple[np.ndarray, float]:
    """Physical centres of pixels 0..n-1 of a level along a spatial axis, and the pixel
    size, read from NGFF metadata as a viewer does (scale, then translation)."""
    scale, shift = 1.0, 0.0
    for t in ms["datasets"][level]["coordinateTransformations"]:
        if t["type"] == "scale":
            scale = t["scale"][axis]
        else:
            shift = t["translation"][axis]
    return np.arange(n) * scale + shift, scale


@pytest.mark.parametrize("per_pixel", [8.0, 6.5])
def test_tissue_label_is_strided_and_overlays_level0(tmp_path: Path, per_pixel: float) -> None:
    """Tissue mask pixel i covers level-0 [i*d, (i+1)*d): each tissue level is the strided
    mask, and its transform puts pixel i where the level-0 pixels it covers are (level-0
    pixel p is centred at p * mpp, the nuclei's convention)."""
    rng = np.random.default_rng(3)
    mask = rng.random((12, 15)) > 0.6
    mpp = 0.5
    spec = create_store(tmp_path / "t.zarr", (70, 90), 16, mpp, n_levels=3)
    write_tissue(spec, np.ones_like(mask), per_pixel)  # overwritten below: write is idempotent
    write_tissue(spec, mask, per_pixel)
    write_image(spec, np.zeros((35, 45, 3), np.uint8), 2.0)
    finalize(spec, name="t")
    root = zarr.open_group(spec.path, mode="r")
    ms = root["labels/tissue"].attrs["ome"]["multiscales"][0]
    for k in range(spec.n_levels):
        level = root[f"labels/tissue/s{k}"][:]
        np.testing.assert_array_equal(level, mask[:: 2**k, :: 2**k].astype(np.uint8))
        for axis in (0, 1):
            n = level.shape[axis]
            centres, size = _centres(ms, k, n, axis - 2)
            first = np.arange(n) * 2**k  # the mask pixel each level pixel is
            np.testing.assert_allclose(centres, ((first + 0.5) * per_pixel - 0.5) * mpp)
            assert size == pytest.approx(per_pixel * 2**k * mpp)
    nuclei = root["labels/nuclei"].attrs["ome"]["multiscales"][0]
    assert _centres(nuclei, 2, 3)[0].tolist() == [0.0, 2.0, 4.0]  # level-0 pixel 4i: 4i * mpp


@pytest.mark.parametrize("d", [1, 3, 4])
def test_rgb_image_levels_are_box_means_and_overlay_level0(tmp_path: Path, d: int) -> None:
    """RGB level k pixel i is the mean of level-0 pixels [i*d*2^k, (i+1)*d*2^k): its
    transform centres it on them and gives it their extent, as many levels as the nuclei."""
    mpp = 0.25
    shape = (70, 90)
    spec = create_store(tmp_path / "i.zarr", shape, 16, mpp, n_levels=4)
    overview = overview_of(np.zeros(shape), d)
    write_image(spec, overview, float(d))
    write_tissue(spec, np.ones((9, 12), bool), 8.0)
    finalize(spec, name="slide")
    root = zarr.open_group(spec.path, mode="r")
    ms = root.attrs["ome"]["multiscales"][0]
    assert len(ms["datasets"]) == spec.n_levels
    expected = overview.astype(np.float64)
    for k in range(spec.n_levels):
        level = root[f"s{k}"][:]
        assert level.dtype == np.uint8 and level.shape == (3, *expected.shape[:2])
        np.testing.assert_allclose(np.moveaxis(level, 0, 2), expected, atol=0.5 + 1e-9)
        for axis in (1, 2):
            n = level.shape[axis]
            centres, size = _centres(ms, k, n, axis - 3)
            step = d * 2**k
            np.testing.assert_allclose(centres, ((np.arange(n) + 0.5) * step - 0.5) * mpp)
            assert size == pytest.approx(step * mpp)
        # the next level: 2 x 2 means of this one (edge blocks average what they have)
        src = np.moveaxis(level, 0, 2).astype(np.float64)
        h, w = -(-src.shape[0] // 2), -(-src.shape[1] // 2)
        expected = np.array([[src[2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1, 3).mean(axis=0)
                              for j in range(w)] for i in range(h)])


def test_finalize_needs_the_image(tmp_path: Path, lab: np.ndarray) -> None:
    spec = _write_all(tmp_path, lab, threads=False)
    with pytest.raises(ValueError, match="write_image"):
        finalize(spec, name="x")
    assert "ome" not in zarr.open_group(spec.path, mode="r").attrs
    with pytest.raises(ValueError, match="RGB"):
        write_image(spec, np.zeros((4, 5), np.uint8), 2.0)


def test_create_store_replaces_old_store(tmp_path: Path, lab: np.ndarray) -> None:
    spec = _write_all(tmp_path, lab, threads=False)
    write_image(spec, overview_of(lab, 4), 4.0)
    finalize(spec, name="x")
    spec2 = create_store(spec.path, (20, 20), 16, 0.25)
    root = zarr.open_group(spec2.path, mode="r")
    assert root["labels/nuclei/s0"].shape == (20, 20)
    assert not root["labels/nuclei/s0"][:].any()
    assert "ome" not in root.attrs


def test_open_store_recovers_spec_for_resume(tmp_path: Path, lab: np.ndarray) -> None:
    spec = create_store(tmp_path / "r.zarr", lab.shape, 16, 0.2527, n_levels=3)
    write_block(spec, Box(0, 0, 16, 16), lab[:16, :16])
    again = open_store(spec.path)
    assert again == spec
    write_block(again, Box(16, 0, 32, 16), lab[16:32, :16])  # resume: earlier blocks kept
    np.testing.assert_array_equal(
        zarr.open_array(spec.path, path="labels/nuclei/s0", mode="r")[:32, :16], lab[:32, :16])
    with pytest.raises(ValueError, match="create_store"):
        zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=3)
        open_store(tmp_path / "plain.zarr")


@pytest.mark.parametrize("shape", [(300, 410), (64, 64), (70, 33), (900, 129)])
def test_pyramid_by_blocks_equals_level_by_level(tmp_path: Path, shape: tuple[int, int]) -> None:
    """The parallel pyramid (fine levels per block of 4 x 4 chunks, any order, then the
    coarse rest) gives every level exactly as striding level 0, with tissue islands, blocks
    clipped at the image edge and slides too small for the block levels."""
    chunk = 16
    lab = np.zeros(shape, np.uint32)
    rng = np.random.default_rng(shape[0])
    islands = [Box(0, 0, min(shape[0], 2 * chunk), min(shape[1], 3 * chunk)),
               Box(shape[0] - shape[0] % chunk - (chunk if shape[0] % chunk == 0 else 0),
                   shape[1] - shape[1] % chunk - (chunk if shape[1] % chunk == 0 else 0), *shape)]
    for i, b in enumerate(islands):
        lab[b.slices()] = rng.integers(0, 3, size=b.shape) * (i + 1) + BIG
    spec = create_store(tmp_path / "nuclei.zarr", shape, chunk, 0.25)
    for b in islands:
        write_block(spec, b, lab[b.slices()])
    blocks = pyramid_blocks(spec, islands, levels=2)
    assert all(b.y0 % (4 * chunk) == 0 and b.x0 % (4 * chunk) == 0 for b in blocks)
    random.Random(1).shuffle(blocks)
    with ThreadPoolExecutor(max_workers=2) as pool:  # blocks never share a chunk
        list(pool.map(lambda b: build_pyramid_block(spec, b, levels=2), blocks))
    build_pyramid(spec, islands, first_level=3)
    root = zarr.open_group(spec.path, mode="r")
    for k in range(1, spec.n_levels):
        np.testing.assert_array_equal(root[f"labels/nuclei/s{k}"][:], lab[:: 2**k, :: 2**k])
