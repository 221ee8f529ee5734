"""``wsi-nuclei view OUT/slide``: a finished slide in napari, nuclei on top, measurements
under the cursor.

Why a command and not just ``napari OUT/slide/nuclei.zarr``: napari asks which reader to
use (its builtin one fails on an OME-Zarr group), napari-ome-zarr opens the labels hidden
and cannot know the per-nucleus table, and the store holds only a reduced copy of the
slide. Here the slide comes from its own file, lazily, level by level (a dask array per
pyramid level over the pipeline's slide readers), so zooming in shows its full
resolution; the store's RGB image is the fallback when that file is gone. Nuclei are
drawn as contours so that the tissue shows through, and ``nuclei.parquet`` becomes the
labels layer's ``features`` (napari shows the row of the nucleus under the cursor).

``layers_for`` builds the layer list as plain data (testable without Qt or a display);
``open_viewer`` is the thin part that needs napari (the ``[view]`` extra).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["INSTALL_HINT", "LayerSpec", "layers_for", "open_viewer", "output_dir"]

INSTALL_HINT = "pip install 'wsi-nuclei[view]'  (in a checkout: pip install -e '.[view]')"
SLIDE_CHUNK = 1024  # px per side of each lazy slide read (one dask chunk)
NUCLEI_CONTOUR = 1  # px of the level shown; 0 = filled
FILLED_OPACITY = 0.5  # nuclei opacity when filled: the tissue shows through
TISSUE_CONTOUR = 1  # tissue-mask pixels (~8 µm)
SCREENSHOT_FILL = 0.98  # of the canvas taken by the slide in --screenshot


@dataclass
class LayerSpec:
    """One napari layer: ``napari.layers.Layer.create(data, kwargs, kind)``, then the
    ``settings`` (properties napari sets only after creation, e.g. ``contour``)."""

    data: Any
    kwargs: dict[str, Any]
    kind: str  # "image" or "labels"
    settings: dict[str, Any] = field(default_factory=dict)


def output_dir(path: str | Path) -> Path:
    """The slide's output folder, given it or its ``nuclei.zarr``; must be finished."""
    out = Path(path)
    if out.name == "nuclei.zarr":
        out = out.parent
    if not (out / "summary.json").is_file() or not (out / "nuclei.zarr").is_dir():
        raise FileNotFoundError(f"{path}: not a wsi-nuclei output folder (OUT/<slide>/ with "
                                "summary.json and nuclei.zarr)")
    return out


class _SlideLevel:
    """One pyramid level of a slide as an array-like for ``dask.array.from_array``:
    indexing reads that box through the pipeline's reader (one reader per slide, shared
    by its levels, reads serialised: a reader may reopen its handle after damage)."""

    def __init__(self, source: _SlideSource, level: int, shape: tuple[int, int]):
        self.source, self.level = source, level
        self.shape = (shape[0], shape[1], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        from pipeline.types import Box

        ys, xs = key[0].indices(self.shape[0]), key[1].indices(self.shape[1])
        rest = key[2] if len(key) > 2 else slice(None)
        if ys[1] <= ys[0] or xs[1] <= xs[0]:
            return np.zeros((max(0, ys[1] - ys[0]), max(0, xs[1] - xs[0]), 3), np.uint8)[..., rest]
        box = Box(ys[0], xs[0], ys[1], xs[1])
        with self.source.lock:
            rgb = self.source.reader.read_level(self.level, box)
        return rgb[::ys[2], ::xs[2], rest]


@dataclass
class _SlideSource:
    reader: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


def slide_pyramid(path: str, mpp_override: float | None) -> list[Any]:
    """The slide's levels as lazy dask arrays (y, x, 3), finest first."""
    import dask.array as da

    from pipeline.slide.open import open_slide

    reader = open_slide(path, mpp_override=mpp_override)
    source = _SlideSource(reader)
    levels = sorted(enumerate(reader.info.levels), key=lambda kv: -kv[1].width)
    out = []
    for index, lv in levels:
        if out and lv.width >= out[-1].shape[1]:
            continue  # napari wants strictly smaller levels
        arr = _SlideLevel(source, index, (lv.height, lv.width))
        out.append(da.from_array(arr, chunks=(SLIDE_CHUNK, SLIDE_CHUNK, 3), asarray=False,
                                 fancy=False, meta=np.empty((0, 0, 0), np.uint8)))
    return out


def ngff_transform(group: Any) -> tuple[list[float], list[float]]:
    """(scale, translation) of a multiscale group's first level, spatial axes only."""
    ms = group.attrs["ome"]["multiscales"][0]
    spatial = [i for i, a in enumerate(ms["axes"]) if a.get("type") == "space"]
    scale, shift = [1.0] * len(ms["axes"]), [0.0] * len(ms["axes"])
    for t in ms["datasets"][0]["coordinateTransformations"]:
        if t["type"] == "scale":
            scale = t["scale"]
        elif t["type"] == "translation":
            shift = t["translation"]
    return [float(scale[i]) for i in spatial], [float(shift[i]) for i in spatial]


def store_levels(group: Any) -> list[Any]:
    import dask.array as da

    return [da.from_zarr(group[d["path"]]) for d in group.attrs["ome"]["multiscales"][0]["datasets"]]


def _multi(levels: list[Any]) -> Any:
    """napari takes a list for a pyramid, a plain array for one level."""
    return levels if len(levels) > 1 else levels[0]


def _features(out: Path) -> Any:
    """``nuclei.parquet`` with the ``index`` column napari matches to label values."""
    import pandas as pd

    table = pd.read_parquet(out / "nuclei.parquet")
    table.insert(0, "index", table["id"].astype(np.int64))
    return table


def layers_for(out_dir: str | Path, *, filled: bool = False, slide: bool = True) -> list[LayerSpec]:
    """The layers of ``wsi-nuclei view``, bottom to top: the slide (from its file when
    ``slide`` and readable, else the store's RGB image), the tissue contour, the cell
    boundaries when cells were made, the nuclei (contours, or filled at half opacity)
    with the table as features. All in µm when the
    mpp is known (the store's coordinates), else in level-0 pixels."""
    import zarr

    from pipeline.errors import SlideReadError
    from pipeline.writers.colours import CELL_RGB, NUCLEUS_RGB
    from pipeline.writers.labels import CELL_NAME, LABEL_PATH, STORE_ATTR, TISSUE_PATH

    out = output_dir(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    root = zarr.open_group(str(out / "nuclei.zarr"), mode="r")
    if "ome" not in root.attrs:
        raise ValueError(f"{out / 'nuclei.zarr'} is not finished (no OME metadata)")
    mpp = root.attrs[STORE_ATTR]["mpp"]
    name = root.attrs["ome"]["multiscales"][0].get("name") or out.name
    unit = ("micrometer", "micrometer") if mpp is not None else None
    px = float(mpp) if mpp is not None else 1.0

    layers = []
    image = None
    if slide:
        try:
            image = slide_pyramid(summary["slide"], (summary.get("config") or {}).get("mpp"))
            layers.append(LayerSpec(_multi(image), {"name": name, "rgb": True, "scale": (px, px),
                                                    "units": unit}, "image"))
        except SlideReadError as exc:
            log.warning("%s; showing the reduced copy in nuclei.zarr", exc)
    if image is None:
        scale, shift = ngff_transform(root)
        rgb = [level.transpose(1, 2, 0) for level in store_levels(root)]  # (c, y, x) -> (y, x, c)
        layers.append(LayerSpec(_multi(rgb), {"name": f"{name} (reduced copy)", "rgb": True,
                                              "scale": tuple(scale), "translate": tuple(shift),
                                              "units": unit}, "image"))
    if TISSUE_PATH in root:
        tissue = root[TISSUE_PATH]
        scale, shift = ngff_transform(tissue)
        rgba = tissue.attrs["ome"]["image-label"]["colors"][0]["rgba"]
        layers.append(LayerSpec(
            _multi(store_levels(tissue)),
            {"name": "tissue", "scale": tuple(scale), "translate": tuple(shift), "units": unit,
             "opacity": 1.0, "colormap": {None: "transparent", 0: "transparent",
                                          1: [v / 255 for v in rgba]}},
            "labels", {"contour": TISSUE_CONTOUR}))
    if f"labels/{CELL_NAME}" in root:  # cells (--cell-expansion): their boundaries under the nuclei
        cells = root[f"labels/{CELL_NAME}"]
        scale, shift = ngff_transform(cells)
        layers.append(LayerSpec(
            _multi(store_levels(cells)),
            {"name": "cells", "scale": tuple(scale), "translate": tuple(shift), "units": unit,
             "opacity": 1.0, "colormap": {None: [v / 255 for v in CELL_RGB] + [1.0], 0: "transparent"}},
            "labels", {"contour": NUCLEI_CONTOUR}))
    nuclei = root[LABEL_PATH]
    scale, shift = ngff_transform(nuclei)
    style: dict[str, Any] = {"opacity": FILLED_OPACITY}  # napari's colours tell touching nuclei apart
    if not filled:  # outlines in one bright colour, as in the preview and QuPath
        style = {"opacity": 1.0, "colormap": {None: [v / 255 for v in NUCLEUS_RGB] + [1.0],
                                              0: "transparent"}}
    layers.append(LayerSpec(
        _multi(store_levels(nuclei)),
        {"name": "nuclei", "scale": tuple(scale), "translate": tuple(shift), "units": unit,
         "features": _features(out), **style},
        "labels", {} if filled else {"contour": NUCLEI_CONTOUR}))
    return layers


def _napari() -> Any:
    try:
        import napari
    except ImportError as exc:
        raise ImportError(f"wsi-nuclei view needs napari: {INSTALL_HINT}") from exc
    return napari


def open_viewer(out_dir: str | Path, *, filled: bool = False, slide: bool = True,
                show: bool = True) -> Any:
    """A napari viewer with ``layers_for(out_dir)``, scale bar on, the whole slide in view.
    The caller runs the event loop (``napari.run()``) or takes a screenshot."""
    napari = _napari()
    out = output_dir(out_dir)
    viewer = napari.Viewer(title=f"wsi-nuclei: {out.name}", show=show)
    for spec in layers_for(out, filled=filled, slide=slide):
        layer = napari.layers.Layer.create(spec.data, spec.kwargs, spec.kind)
        for key, value in spec.settings.items():
            setattr(layer, key, value)
        viewer.add_layer(layer)
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)  # napari >= 0.9
    (overlays.scale_bar if overlays is not None else viewer.scale_bar).visible = True
    viewer.reset_view()
    return viewer


# --------------------------------------------------------------------------- command line


def add_view(sub: Any) -> None:
    """Register ``wsi-nuclei view``."""
    from pipeline.cliutil import formatter

    p = sub.add_parser(
        "view", formatter_class=formatter, help="open a finished slide in napari",
        description="The slide (full resolution, from its file; else the reduced copy in "
                    "nuclei.zarr), the tissue contour and the nucleus outlines in napari, with "
                    "each nucleus's measurements (nuclei.parquet) shown under the cursor. "
                    f"Needs napari: {INSTALL_HINT}",
        epilog="examples:\n"
               "  wsi-nuclei view results/CMU-1\n"
               "  wsi-nuclei view results/CMU-1 --filled           # filled nuclei, half opacity\n"
               "  wsi-nuclei view results/CMU-1 --screenshot view.png   # render to PNG, exit\n"
               "  wsi-nuclei view results/CMU-1 --screenshot detail.png --region 1000 800 600 400")
    p.add_argument("folder", help="a slide's output folder OUT/<slide> (or its nuclei.zarr)")
    p.add_argument("--filled", action="store_true", help="nuclei filled instead of outlined")
    p.add_argument("--no-slide", action="store_true",
                   help="show the store's reduced RGB copy even when the slide file is readable")
    p.add_argument("--screenshot", default=None, metavar="PNG",
                   help="render the view to PNG and exit (the window shows briefly: needs a "
                        "display, e.g. xvfb-run on a server)")
    p.add_argument("--size", type=int, nargs=2, default=(900, 1200), metavar=("H", "W"),
                   help="canvas size of --screenshot in px")
    p.add_argument("--region", type=int, nargs=4, default=None, metavar=("X", "Y", "WIDTH", "HEIGHT"),
                   help="what --screenshot shows, in level-0 px as QuPath and OpenSlide count them "
                        "(default: the whole slide)")
    p.set_defaults(func=view_command)


def view_command(args: Any) -> int:
    """Open the viewer (blocks until its window closes), or render ``--screenshot``."""
    from pipeline.errors import ConfigError

    try:
        napari = _napari()
    except ImportError as exc:
        raise ConfigError(str(exc)) from exc
    # a hidden canvas renders black: the window is shown even for --screenshot
    viewer = open_viewer(args.folder, filled=args.filled, slide=not args.no_slide)
    if args.screenshot is None:
        napari.run()
        return 0
    try:
        h, w = args.size
        extent = np.asarray(viewer.layers.extent.world, np.float64)  # [[y0, x0], [y1, x1]]
        if args.region is not None:  # level-0 px -> world (µm, or px without an mpp)
            x, y, rw, rh = args.region
            px = float(viewer.layers["nuclei"].scale[-1])
            extent = np.array([[y, x], [y + rh, x + rw]], np.float64) * px
        span = np.maximum(extent[1] - extent[0], 1e-9)
        viewer.camera.center = tuple((extent[0] + extent[1]) / 2)
        viewer.camera.zoom = SCREENSHOT_FILL * min(h / span[0], w / span[1])
        viewer.screenshot(args.screenshot, canvas_only=True, size=(h, w), flash=False)
        log.info("screenshot %s", args.screenshot)
    finally:
        viewer.close()
    return 0
