"""The NGFF 0.5 metadata of the store (``writers.labels`` writes the pixels): the root
image's ``multiscales`` and ``omero``, each label image's ``multiscales`` and
``image-label``, the ``labels`` list. Written once, after every pixel, root last, so a
store whose root has ``multiscales`` is complete (see ``writers.labels`` for the layout
and the coordinate conventions the transforms encode)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import zarr

from pipeline.writers.colours import TISSUE_RGB
from pipeline.writers.labels import (
    DIMS,
    NGFF_VERSION,
    RGB_CHANNELS,
    STORE_ATTR,
    TISSUE_NAME,
    TISSUE_PATH,
    LabelStoreSpec,
    open_array,
)

log = logging.getLogger(__name__)

__all__ = ["finalize"]


def _multiscale(spec: LabelStoreSpec, name: str, per_px: Sequence[float], *, rgb: bool = False,
                translate: Sequence[float] | None = None, kind: str = "nearest",
                method: str = "stride [::2, ::2] of the previous level (labels are never averaged)",
                ) -> dict[str, Any]:
    """NGFF ``multiscales`` entry: level k's pixel is ``per_px[k]`` level-0 pixels, its
    centre shifted by ``translate[k]`` level-0 pixels (see the module docstring)."""
    unit = spec.mpp
    axes = [{"name": d, "type": "space", "unit": "micrometer"} for d in DIMS]
    if rgb:
        axes.insert(0, {"name": "c", "type": "channel"})
    channel_scale, channel_shift = ([1.0], [0.0]) if rgb else ([], [])
    datasets = []
    for k, d in enumerate(per_px):
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": channel_scale + [unit * d] * 2}]
        if translate is not None and translate[k]:
            transforms.append({"type": "translation",
                               "translation": channel_shift + [unit * translate[k]] * 2})
        datasets.append({"path": f"s{k}", "coordinateTransformations": transforms})
    return {"name": name, "axes": axes, "datasets": datasets, "type": kind, "metadata": {"method": method}}


def _check_colors(colors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for col in colors:
        rgba = [int(v) for v in col["rgba"]]
        if len(rgba) != 4 or not all(0 <= v <= 255 for v in rgba):
            raise ValueError(f"colour {col} needs rgba as 4 ints in 0..255")
        out.append({"label-value": int(col["label-value"]), "rgba": rgba})
    return out


def _omero(name: str) -> dict[str, Any]:
    """Rendering hints (NGFF transitional "omero"): show the three channels as RGB."""
    window = {"min": 0, "max": 255, "start": 0, "end": 255}
    return {"name": name, "rdefs": {"model": "color"},
            "channels": [{"label": label, "color": color, "window": window, "active": True,
                          "coefficient": 1, "family": "linear", "inverted": False}
                         for label, color in RGB_CHANNELS]}


def _coarse(per_px: float) -> float:
    """Centre shift (level-0 px) of a pixel that covers ``per_px`` level-0 pixels."""
    return (per_px - 1.0) / 2.0


def finalize(
    spec: LabelStoreSpec,
    *,
    name: str,
    colors: Sequence[Mapping[str, Any]] | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write the NGFF 0.5 metadata; call after all pixels are written (``write_image``
    is required, ``write_tissue`` optional).

    Order: ``labels/nuclei``, ``labels/tissue`` -> ``labels`` (with ``version``, formats.md
    gotcha 2) -> root. The root ``multiscales`` therefore appears last and marks the store
    complete. ``name`` names the root image (the slide id: viewers show it); ``colors``
    are optional NGFF ``{"label-value", "rgba"}`` entries for the nuclei (keep few: viewers
    colour instances themselves); ``extra_attrs`` go at the top level of the root
    attributes (not inside ``ome``).
    """
    if extra_attrs is not None and "ome" in extra_attrs:
        raise ValueError("extra_attrs must not contain the reserved key 'ome'")
    root = zarr.open_group(store=spec.path, mode="r+", zarr_format=3)
    info = root.attrs[STORE_ATTR]
    if "image_per_px" not in info:
        raise ValueError(f"{spec.path}: no RGB image (call write_image before finalize)")
    for k in range(spec.n_levels):  # fail early on a store that was not fully created
        if open_array(spec, spec.level_path(k), "r").shape != spec.level_shapes[k]:
            raise ValueError(f"{spec.path}/{spec.level_path(k)} does not match the spec")
        for group in ("", TISSUE_PATH) if "tissue_per_px" in info else ("",):
            if f"s{k}" not in (root[group] if group else root):
                raise ValueError(f"{spec.path}/{spec.level_path(k, group)} is missing")
    image_label: dict[str, Any] = {"version": NGFF_VERSION, "source": {"image": "../../"}}
    if colors:
        image_label["colors"] = _check_colors(colors)
    n = spec.n_levels
    for label in spec.labels:  # nuclei, and cells (the same ids) when made
        root[f"labels/{label}"].attrs["ome"] = {
            "version": NGFF_VERSION, "image-label": image_label,
            "multiscales": [_multiscale(spec, label, [2.0**k for k in range(n)])],
        }
    names = list(spec.labels)
    if "tissue_per_px" in info:
        d = float(info["tissue_per_px"])
        root[TISSUE_PATH].attrs["ome"] = {
            "version": NGFF_VERSION,
            "multiscales": [_multiscale(spec, TISSUE_NAME, [d * 2**k for k in range(n)],
                                        translate=[_coarse(d)] * n)],
            "image-label": {"version": NGFF_VERSION, "source": {"image": "../../"},
                            "colors": [{"label-value": 1, "rgba": [*TISSUE_RGB, 255]}],
                            "properties": [{"label-value": 1, "class": "tissue"}]},
        }
        names.append(TISSUE_NAME)
    root["labels"].attrs["ome"] = {"version": NGFF_VERSION, "labels": names}
    d = float(info["image_per_px"])
    image = _multiscale(spec, name, [d * 2**k for k in range(n)], rgb=True,
                        translate=[_coarse(d * 2**k) for k in range(n)], kind="mean",
                        method="2 x 2 box mean of the previous level")
    attrs: dict[str, Any] = dict(extra_attrs or {})
    attrs["ome"] = {"version": NGFF_VERSION, "multiscales": [image], "omero": _omero(name)}
    root.attrs.update(attrs)
    log.info("finalized OME-Zarr %s (%d levels)", spec.path, spec.n_levels)
