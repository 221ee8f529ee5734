"""A finished run as viewers see it: the store opens as an RGB slide image with two label
images that overlay it (ome-zarr's Reader, ome-zarr-models), and ``wsi-nuclei view``'s
layers (built without Qt; with napari when it is installed and can draw)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader
from ome_zarr_models import open_ome_zarr
from ome_zarr_models.v05 import Image
from PIL import Image as PILImage
from tiny_slides import MODEL, TILE, write_slides

from pipeline.cli import main
from pipeline.run import process_slide
from pipeline.slide.open import open_slide
from pipeline.slide_run.config import RunConfig
from pipeline.slide_run.executors import SerialExecutor
from pipeline.types import Box
from pipeline.view import INSTALL_HINT, layers_for, output_dir
from pipeline.writers.colours import NUCLEUS_RGB

CHUNK = 32  # label chunk: a 256 px slide gets 3 pyramid levels
IMAGE_SIDE = 100  # the store's RGB copy of the 256 px slide: 3 level-0 px per pixel


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny slide through the real pipeline, with a reduced RGB copy coarser than the
    slide (as for any real slide)."""
    import pipeline.writers.labels as labels

    root = tmp_path_factory.mktemp("view")
    (slide,) = write_slides(root / "slides", ["s.tif"])
    cfg = RunConfig(model=MODEL, out=str(root / "out"), tile_size=TILE, chunk=CHUNK, device="cpu",
                    cell_expansion=2.0)
    mp = pytest.MonkeyPatch()
    mp.setattr(labels, "IMAGE_SIDE", IMAGE_SIDE)
    try:
        outcome = process_slide(slide, cfg, SerialExecutor())
    finally:
        mp.undo()
    assert outcome.status == "done", outcome.error
    assert outcome.nuclei > 5
    return Path(outcome.out_dir)


def _slide(run: Path) -> np.ndarray:
    summary = json.loads((run / "summary.json").read_text())
    with open_slide(summary["slide"]) as reader:
        return reader.read_level(0, Box(0, 0, reader.info.height, reader.info.width))


def _world_box(scale: tuple[float, ...], translate: tuple[float, ...], shape: tuple[int, ...]) -> np.ndarray:
    """[[y0, x0], [y1, x1]]: the area a layer's pixels cover (pixel i spans i +- 0.5)."""
    s, t = np.asarray(scale), np.asarray(translate)
    return np.stack([t - s / 2, t + (np.asarray(shape[:2]) - 0.5) * s])


def test_store_opens_as_rgb_image_with_three_labels(run: Path) -> None:
    store = str(run / "nuclei.zarr")
    nodes = list(Reader(parse_url(store))())
    image, labels = nodes[0], {n.metadata["name"]: n for n in nodes if n.first(Label) is not None}
    assert image.first(Label) is None and image.metadata["name"] == "s"  # the slide id
    assert sorted(labels) == ["cells", "nuclei", "tissue"]
    levels = [np.asarray(d) for d in image.data]
    assert len(levels) == len(labels["nuclei"].data) == len(labels["tissue"].data) == 3
    assert len(labels["cells"].data) == 3
    assert all(a.dtype == np.uint8 and a.shape[0] == 3 for a in levels)
    assert max(levels[0].shape[1:]) <= IMAGE_SIDE
    assert image.metadata["contrast_limits"] == [[0, 255]] * 3
    model = open_ome_zarr(zarr.open_group(store, mode="r"))
    assert isinstance(model, Image) and model.labels.label_paths == ["nuclei", "cells", "tissue"]


def test_rgb_image_overlays_the_labels_in_micrometres(run: Path) -> None:
    """Where the NGFF transforms put an RGB pixel, the slide (read from its file) has the
    colour that pixel averaged: the copy overlays the level-0 labels."""
    root = zarr.open_group(str(run / "nuclei.zarr"), mode="r")
    rgb_ms = root.attrs["ome"]["multiscales"][0]
    nuclei_ms = root["labels/nuclei"].attrs["ome"]["multiscales"][0]
    mpp = nuclei_ms["datasets"][0]["coordinateTransformations"][0]["scale"][0]
    assert mpp == pytest.approx(0.25) and nuclei_ms["axes"][0]["unit"] == "micrometer"
    transforms = rgb_ms["datasets"][0]["coordinateTransformations"]
    scale = transforms[0]["scale"][1:]
    shift = transforms[1]["translation"][1:]
    d = scale[0] / mpp
    assert d == pytest.approx(3.0)  # 256 px -> at most IMAGE_SIDE px
    rgb = np.moveaxis(root["s0"][:], 0, 2).astype(np.float64)
    slide = _slide(run).astype(np.float64)
    for y, x in [(0, 0), (100, 37), (128, 200), (255, 255), (131, 2)]:  # level-0 pixels
        world = np.array([y, x]) * mpp  # pixel centres at integer indices, as the labels
        i, j = np.floor((world - shift) / scale + 0.5).astype(int)  # the RGB pixel there
        block = slide[int(i * d):int((i + 1) * d), int(j * d):int((j + 1) * d)]
        assert int(i * d) <= y < int((i + 1) * d) and int(j * d) <= x < int((j + 1) * d)
        np.testing.assert_allclose(rgb[i, j], block.reshape(-1, 3).mean(axis=0), atol=0.51)


def test_layers_read_the_slide_lazily_with_features(run: Path) -> None:
    image, tissue, cells, nuclei = layers_for(run)
    assert (image.kind, tissue.kind, cells.kind, nuclei.kind) == ("image", "labels", "labels", "labels")
    assert cells.kwargs["name"] == "cells" and cells.settings == {"contour": 1}
    stored = zarr.open_group(str(run / "nuclei.zarr"), mode="r")["labels/cells"]
    np.testing.assert_array_equal(np.asarray(cells.data[0]), stored["s0"][:])
    assert image.kwargs["rgb"] and image.kwargs["scale"] == (0.25, 0.25)
    assert image.kwargs["units"] == ("micrometer", "micrometer")
    np.testing.assert_array_equal(np.asarray(image.data[37:201, 5:250]), _slide(run)[37:201, 5:250])
    labels = zarr.open_group(str(run / "nuclei.zarr"), mode="r")["labels/nuclei"]
    assert [a.shape for a in nuclei.data] == [labels[f"s{k}"].shape for k in range(3)]
    np.testing.assert_array_equal(np.asarray(nuclei.data[1]), labels["s1"][:])
    assert nuclei.kwargs["scale"] == image.kwargs["scale"] and nuclei.settings == {"contour": 1}
    assert nuclei.kwargs["colormap"][None][:3] == [v / 255 for v in NUCLEUS_RGB]
    features = nuclei.kwargs["features"]
    values = np.unique(labels["s0"][:])
    assert sorted(features["index"].tolist()) == values[values > 0].tolist()
    table = pd.read_parquet(run / "nuclei.parquet")
    assert (features["index"] == table["id"]).all() and "Area µm^2" in features
    assert tissue.settings["contour"] > 0 and tissue.kwargs["colormap"][0] == "transparent"
    # the tissue mask covers the slide where the slide is
    box = _world_box(tissue.kwargs["scale"], tissue.kwargs["translate"], tissue.data[0].shape)
    np.testing.assert_allclose(box[0], [-0.125, -0.125])
    assert (box[1] >= 255.5 * 0.25 - 1e-9).all()
    filled = layers_for(run, filled=True)[-1]
    assert filled.settings == {} and filled.kwargs["opacity"] == 0.5 and "colormap" not in filled.kwargs


def test_without_the_slide_file_the_reduced_copy_is_shown(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "s"
    shutil.copytree(run, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["slide"] = str(tmp_path / "moved-away.tif")
    (copy / "summary.json").write_text(json.dumps(summary))
    for layers in (layers_for(copy), layers_for(run, slide=False)):
        image = layers[0]
        assert image.kwargs["name"] == "s (reduced copy)" and image.kwargs["rgb"]
        assert len(image.data) == 3 and image.data[0].shape[2] == 3
        np.testing.assert_allclose(image.kwargs["scale"], (0.75, 0.75))
        np.testing.assert_allclose(image.kwargs["translate"], (0.25, 0.25))
        # the copy's pixels cover the labels' area (its last pixels may overhang the edge)
        rgb_box = _world_box(image.kwargs["scale"], image.kwargs["translate"], image.data[0].shape)
        nuclei = layers[-1]
        label_box = _world_box(nuclei.kwargs["scale"], nuclei.kwargs["translate"], nuclei.data[0].shape)
        np.testing.assert_allclose(rgb_box[0], label_box[0])
        assert (rgb_box[1] >= label_box[1]).all() and (rgb_box[1] - label_box[1] < 0.75).all()


def test_view_needs_a_finished_output_folder(run: Path, tmp_path: Path) -> None:
    assert output_dir(run / "nuclei.zarr") == run
    with pytest.raises(FileNotFoundError, match="output folder"):
        output_dir(tmp_path)
    copy = tmp_path / "s"
    shutil.copytree(run, copy)
    root = zarr.open_group(str(copy / "nuclei.zarr"), mode="r+")
    del root.attrs["ome"]
    with pytest.raises(ValueError, match="not finished"):
        layers_for(copy)
    assert main(["view", str(tmp_path)]) == 2


def test_view_without_napari_says_how_to_install(run: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "napari", None)  # import napari raises ImportError
    assert main(["view", str(run)]) == 2
    assert INSTALL_HINT in capsys.readouterr().err


# --------------------------------------------------------------------------- with napari


def _napari_env() -> dict[str, str]:
    env = dict(os.environ)
    if not env.get("DISPLAY"):
        env.setdefault("QT_QPA_PLATFORM", "offscreen")  # never let Qt abort the process
    return env


@pytest.fixture(scope="module")
def napari_can_draw() -> None:
    """Skip unless napari is installed and can open a viewer here (it needs OpenGL: a
    display, e.g. ``xvfb-run -a pytest ...`` on a server). Probed in a subprocess: Qt
    aborts the process when it finds no platform."""
    pytest.importorskip("napari")
    draw = ("import napari, numpy as np; v = napari.Viewer(show=False); "
            "v.add_image(np.zeros((4, 4, 3), np.uint8), rgb=True); "
            "v.add_labels(np.eye(4, dtype=int)).contour = 1; v.close()")
    probe = subprocess.run([sys.executable, "-c", draw],
                           env=_napari_env(), capture_output=True, text=True, timeout=300)
    if probe.returncode:
        tail = (probe.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"napari cannot open a viewer here (run under xvfb-run): {tail}")


def test_napari_viewer_shows_slide_tissue_and_nuclei(run: Path, napari_can_draw: None) -> None:
    code = f"""
import json, numpy as np
from pipeline.view import open_viewer
v = open_viewer({str(run)!r}, show=False)
nuclei = v.layers['nuclei']
t = nuclei.features.iloc[len(nuclei.features) // 2]
world = (t['centroid_y_px'] * 0.25, t['centroid_x_px'] * 0.25)
status = nuclei.get_status(world, world=True)['coordinates']
print(json.dumps({{
    'layers': [(l.name, type(l).__name__, bool(l.visible)) for l in v.layers],
    'contour': nuclei.contour, 'id': int(t['id']),
    'value': int(np.ravel(nuclei.get_value(world, world=True))[-1]),  # multiscale: (level, value)
    'status': status, 'area': float(t['Area µm^2']),
    'extents': [np.asarray(l.extent.world).tolist() for l in v.layers],
}}))
v.close()
"""
    done = subprocess.run([sys.executable, "-c", code], env=_napari_env(), capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["layers"] == [["s", "Image", True], ["tissue", "Labels", True], ["nuclei", "Labels", True]]
    assert got["contour"] == 1
    assert got["value"] == got["id"]  # the centroid lies in its nucleus (convex-ish shapes)
    assert f"id: {got['id']}," in got["status"]  # the hovered nucleus's table row
    assert f"Area µm^2: {got['area']:.3g}," in got["status"]
    image, _, nuclei = (np.asarray(e) for e in got["extents"])
    np.testing.assert_allclose(image, nuclei)  # the slide and its labels overlay


def test_view_screenshot_shows_outlines(run: Path, napari_can_draw: None, tmp_path: Path) -> None:
    try:  # a window needs a Qt binding (the [view] extra brings PyQt5); napari's models do not
        import qtpy.QtWidgets  # noqa: F401
    except Exception as exc:  # qtpy raises its own error type when no binding is installed
        pytest.skip(f"no Qt binding for a napari window: {exc}")
    png = tmp_path / "view.png"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "view", str(run), "--screenshot",
                           str(png), "--size", "300", "400"], env=_napari_env(), capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    rgb = np.asarray(PILImage.open(png))[..., :3]
    assert rgb.shape == (300, 400, 3)
    green = np.all(rgb == NUCLEUS_RGB, axis=2).sum()
    pinkish = ((rgb[..., 0] > 150) & (rgb[..., 1] < 150)).sum()  # H&E-like stroma
    assert green > 200 and pinkish > 10_000
