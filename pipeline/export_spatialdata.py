"""``wsi-nuclei export OUT/slide --spatialdata``: a finished slide as a SpatialData store.

Why an export and not ``nuclei.zarr`` itself: ``spatialdata.read_zarr`` (0.7) does not open
the NGFF store (no ``spatialdata_attrs`` at the root, images expected under ``images/``,
rasters marked with SpatialData's own format version, and the table and the labels element
both named ``nuclei``). Instead of hand-writing SpatialData's format, which changes between
its releases, the elements are made with spatialdata's own models and written by
``SpatialData.write``: the store follows whatever version of spatialdata is installed (the
``[spatialdata]`` extra).

``OUT/slide/nuclei.sdata.zarr`` holds, with fixed names so that scripts work on every slide:

* ``images/slide``: the slide, RGB (c, y, x) with channels ``r``, ``g``, ``b``. By default the
  full-resolution slide read lazily from its own file through the pipeline's readers (dask,
  one 1024-px chunk at a time) and made multiscale by spatialdata (2 x 2 means, as many levels
  as the nuclei); ``slide=False``, or a slide file that is gone, takes the store's reduced
  copy (its own pyramid, no pixels recomputed).
* ``labels/<name>_labels`` for every label image of the store (``nuclei_labels``,
  ``tissue_labels``, ``cells_labels`` when cells were made): the store's own pyramid levels
  as lazy ``dask.array.from_zarr`` arrays, so a slide of any size is copied chunk by chunk.
* ``tables/nuclei_table``: the store's AnnData table, annotating ``nuclei_labels``
  (``region`` = ``nuclei_labels``, instance key ``id`` = the label value).

Coordinates: one coordinate system, ``global``, in µm. SpatialData puts a pixel's corner at
integer intrinsic coordinates (pixel i covers [i, i + 1)); the NGFF store puts level-0 pixel
centres there. Level-0 pixel i therefore covers ``[i, i + 1) * mpp`` µm here (QuPath's
convention too), every element's level 0 is ``Scale(mpp * d)`` (d = level-0 px per pixel)
and ``obsm["spatial"]`` is the centroid ``(centroid_px + 0.5) * mpp``. SpatialData derives
each coarser level's scale from the shapes (``shape0 / shape_k``) instead of the store's
strided ``2^k``: at the far edge of a level whose sizes were rounded up, the two differ by
less than one pixel of that level.

Atomic: the store is written under a temporary name beside the final one and renamed; an
existing export is replaced only with ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.atomic import temp_name
from pipeline.errors import ConfigError
from pipeline.view import SLIDE_CHUNK, ngff_transform, output_dir, slide_pyramid, store_levels

log = logging.getLogger(__name__)

__all__ = ["EXPORT_NAME", "IMAGE", "INSTALL_HINT", "LABELS_SUFFIX", "TABLE", "export_spatialdata",
           "spatialdata_elements"]

EXPORT_NAME = "nuclei.sdata.zarr"
INSTALL_HINT = "pip install 'wsi-nuclei[spatialdata]'  (in a checkout: pip install -e '.[spatialdata]')"
IMAGE = "slide"
LABELS_SUFFIX = "_labels"  # SpatialData forbids a labels element and a table of the same name
TABLE = "nuclei_table"
COORDINATE_SYSTEM = "global"
RGB = ["r", "g", "b"]


def _spatialdata() -> Any:
    try:
        import spatialdata
    except ImportError as exc:
        raise ConfigError(f"--spatialdata needs the spatialdata package: {INSTALL_HINT}") from exc
    return spatialdata


def _finished(out_dir: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """(output folder, summary) of a finished slide, or a one-line error."""
    out = output_dir(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    if summary.get("status") not in ("done", "partial"):
        raise ConfigError(f"{out}: the slide's run did not finish (status {summary.get('status')!r})")
    return out, summary


def _scale(group: Any, mpp: float) -> Any:
    """The µm transform of a multiscale group's level 0 in SpatialData's pixel-corner
    convention: NGFF scale s and centre translation t become Scale(s) and a translation of
    ``t - s / 2 + mpp / 2`` (zero for every array the pipeline writes)."""
    from spatialdata.transformations import Scale, Sequence, Translation

    scale, shift = ngff_transform(group)
    corner = [t - s / 2 + mpp / 2 for s, t in zip(scale, shift)]
    transform = Scale(scale, axes=("y", "x"))
    if any(abs(c) > 1e-9 * mpp for c in corner):
        transform = Sequence([transform, Translation(corner, axes=("y", "x"))])
    return transform


def _pyramid(model: Any, levels: list[Any], dims: tuple[str, ...], transform: Any,
             channels: list[str] | None = None) -> Any:
    """A multiscale element from existing levels (no pixel recomputed), validated by
    ``model``: SpatialData's multiscale layout (``scale<k>/image``), transform on level 0."""
    import xarray as xr
    from spatialdata.transformations import set_transformation

    coords = {"c": channels} if channels is not None else {}
    tree = xr.DataTree.from_dict({
        f"scale{k}": xr.Dataset({"image": xr.DataArray(level, dims=dims, coords=coords)})
        for k, level in enumerate(levels)})
    set_transformation(tree, {COORDINATE_SYSTEM: transform}, set_all=True)
    model.validate(tree)
    return tree


def _slide_image(summary: dict[str, Any], n_levels: int, mpp: float) -> Any | None:
    """The full-resolution slide, lazily, as a multiscale Image2DModel; None when its file
    cannot be read."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    from pipeline.errors import SlideReadError

    try:
        level0 = slide_pyramid(summary["slide"], (summary.get("config") or {}).get("mpp"))[0]
    except SlideReadError as exc:
        log.warning("%s; exporting the reduced copy in nuclei.zarr", exc)
        return None
    return Image2DModel.parse(
        level0.transpose(2, 0, 1), dims=("c", "y", "x"), c_coords=RGB,
        transformations={COORDINATE_SYSTEM: Scale([mpp, mpp], axes=("y", "x"))},
        scale_factors=[2] * (n_levels - 1) or None, chunks=(3, SLIDE_CHUNK, SLIDE_CHUNK))


def spatialdata_elements(out_dir: str | os.PathLike[str], *, slide: bool = True) -> Any:
    """The finished slide in ``out_dir`` as an in-memory ``SpatialData`` (lazy rasters; the
    table is read into memory: ~200 bytes per nucleus)."""
    sd = _spatialdata()
    import anndata as ad
    import numpy as np
    import pandas as pd
    import zarr
    from spatialdata.models import Image2DModel, Labels2DModel, TableModel

    from pipeline.writers.labels import LABEL_NAME, LABEL_PATH, STORE_ATTR
    from pipeline.writers.table import INSTANCE_KEY, METADATA_KEY, OBSM_PX, REGION_KEY, TABLE_PATH

    out, summary = _finished(out_dir)
    root = zarr.open_group(str(out / "nuclei.zarr"), mode="r")
    if "ome" not in root.attrs:
        raise ConfigError(f"{out / 'nuclei.zarr'} is not finished (no OME metadata)")
    mpp = float(root.attrs[STORE_ATTR]["mpp"])
    n_levels = len(root[LABEL_PATH].attrs["ome"]["multiscales"][0]["datasets"])
    image = _slide_image(summary, n_levels, mpp) if slide else None
    if image is None:
        image = _pyramid(Image2DModel, store_levels(root), ("c", "y", "x"), _scale(root, mpp), RGB)
    labels = {f"{name}{LABELS_SUFFIX}": _pyramid(Labels2DModel, store_levels(root[f"labels/{name}"]),
                                                 ("y", "x"), _scale(root[f"labels/{name}"], mpp))
              for name in root["labels"].attrs["ome"]["labels"]}

    table = ad.io.read_elem(root[TABLE_PATH])
    region = f"{LABEL_NAME}{LABELS_SUFFIX}"
    table.obs[REGION_KEY] = pd.Categorical([region] * table.n_obs, categories=[region])
    table.uns.pop(TableModel.ATTRS_KEY, None)
    # level-0 pixel i covers [i, i + 1) * mpp here (see the module docstring)
    centroid = np.asarray(table.obsm["centroid_px"], dtype=np.float64)
    table.obsm["spatial"] = (centroid + 0.5) * mpp
    table.uns[METADATA_KEY] = {
        **table.uns.get(METADATA_KEY, {}),
        "spatial": f"obsm['spatial'] = (obsm['centroid_px'] ({', '.join(OBSM_PX['centroid_px'])}) + 0.5)"
                   f" * mpp: µm in SpatialData's '{COORDINATE_SYSTEM}' coordinate system, where "
                   "level-0 pixel i covers [i, i + 1) * mpp"}
    # SpatialData rejects a region that no row names: a table without rows annotates nothing
    table = TableModel.parse(table, region=region if table.n_obs else [], region_key=REGION_KEY,
                             instance_key=INSTANCE_KEY)
    return sd.SpatialData(images={IMAGE: image}, labels=labels, tables={TABLE: table})


@contextlib.contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """A temporary folder beside ``final`` that replaces it when the body succeeds; on
    failure it is removed and ``final`` is untouched. ``os.replace`` cannot replace a
    non-empty folder: an old ``final`` is moved aside first, and removed after the rename."""
    tmp = temp_name(final)
    try:
        yield tmp
        old = temp_name(final)
        if final.exists():
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old.exists():
                os.replace(old, final)  # put the previous export back
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_spatialdata(out_dir: str | os.PathLike[str], *, slide: bool = True,
                       overwrite: bool = False) -> Path:
    """Write ``OUT/slide/nuclei.sdata.zarr`` (see the module docstring); return its path."""
    final = _finished(out_dir)[0] / EXPORT_NAME
    _spatialdata()
    if final.exists() and not overwrite:
        raise ConfigError(f"{final} exists (use --overwrite to replace it)")
    sdata = spatialdata_elements(out_dir, slide=slide)
    import anndata as ad

    # the table's arrays unsharded, as in nuclei.zarr (and said, so anndata does not warn)
    with _atomic_dir(final) as tmp, ad.settings.override(auto_shard_zarr_v3=False):
        sdata.write(tmp)
    log.info("SpatialData store %s: %s", final, ", ".join(
        f"{kind} {', '.join(names)}" for kind, names in
        (("images", sdata.images), ("labels", sdata.labels), ("tables", sdata.tables))))
    return final
