"""Nucleus label image as OME-Zarr (NGFF 0.5 on Zarr v3), written chunk by chunk.

Format choice: **NGFF 0.5 / Zarr v3**. It is what ome-zarr-py >= 0.12 writes and reads by
default, what napari-ome-zarr reads, and Zarr v3 allows sharding later for HPC file
counts. The price: QuPath (Bio-Formats OMEZarrReader) cannot open 0.5 stores yet and does
not show labels anyway, so QuPath users get the GeoJSON; this store is the napari /
analysis artefact (docs formats.md §2.2-2.4).

Store layout (``<out>/nuclei.zarr``)::

    zarr.json            root = an NGFF *image*: the slide, RGB uint8 (c, y, x) at reduced
                         resolution (long side <= IMAGE_SIDE), "omero" R/G/B channels with
                         windows 0-255; written LAST by finalize()
    s0 .. sN             RGB levels, each a 2 x 2 box mean of the one before
    labels/zarr.json     ome: {version: "0.5", labels: ["nuclei", ("cells",) "tissue"]}
    labels/nuclei/       ome: {version, multiscales, image-label{version, source, colors?}}
      s0 .. sN           uint32 instance ids (0 = background), level 0 = slide level 0
    labels/cells/        with --cell-expansion: the cells, each with its nucleus's id, as nuclei
    labels/tissue/       the tissue mask (uint8, 1 = tissue) at its own coarse resolution
      s0 .. sN           strided [::2, ::2]
    tables/nuclei/       AnnData table, one row per label id, SpatialData table attributes
                         (region "nuclei", instance_key "id"; pipeline.writers.table)

Why an RGB root image: viewers open an NGFF store at its image and show the labels on top
(napari-ome-zarr, ome-zarr-py's ``Reader``), so the image must be the slide, not a mask:
with the tissue mask as the root, napari drew a black 0/1 canvas over the slide. The
pixels are a reduced copy (a few tens of MB at most, ``IMAGE_SIDE``): the full-resolution
slide stays in its own file (``wsi-nuclei view`` reads it from there). The layout follows
ome-zarr-py's own RGB example (``ome_zarr.data.create_zarr``): channel axis first, labels
without it.

NGFF rules and how they are met: each label image has **as many levels as the image**
(a MUST; ome-zarr-models checks it), so the RGB and tissue pyramids get the nuclei
pyramid's level count. The spec's *should* that a label has the image's shape is not met
on purpose: the nuclei are at level-0 resolution, the image and the tissue mask coarser;
the coordinate transforms place every array in the same physical space, so they overlay.

Coordinates: **level-0 pixel centres sit at integer indices** (level-0 pixel y covers
``[y - 0.5, y + 0.5) * mpp``). Nuclei levels are made by **striding** ``[::2, ::2]``
(never averaging: label values must survive): level k pixel i *is* level-0 pixel i * 2^k,
so their transform is ``scale = mpp * 2^k`` with no translation. An array whose pixel i
covers level-0 pixels ``[i * d, (i + 1) * d)`` (the RGB overview, box-averaged, and each
tissue mask pixel) has its centre at level-0 index ``i * d + (d - 1) / 2``: ``scale =
mpp * d`` and ``translation = mpp * (d - 1) / 2``, where d doubles per RGB level; strided
tissue levels keep the translation of their level 0. The unit is the micrometre: a slide
without a pixel size is refused before any output is made (``slide.plan_read``).

Writing protocol (Dask friendly, no locks): ``create_store`` once (groups and empty
nuclei arrays, no OME metadata) -> ``write_block`` per chunk-aligned box, any order, from
any process (each chunk has exactly one writer) -> ``build_pyramid`` (or, in parallel,
``build_pyramid_block`` per ``pyramid_blocks`` box, then ``build_pyramid(first_level=
PYRAMID_BLOCK_LEVELS + 1)``) -> ``write_tissue``
and ``write_image`` -> ``writers.ngff.finalize`` (metadata, root last). A store without
root ``multiscales`` is incomplete.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.types import Box

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SIDE",
    "LABEL_PATH",
    "LabelStoreSpec",
    "TISSUE_PATH",
    "build_pyramid",
    "build_pyramid_block",
    "create_store",
    "open_store",
    "pyramid_blocks",
    "pyramid_shapes",
    "read_image",
    "write_block",
    "write_image",
    "write_tissue",
]

NGFF_VERSION = "0.5"
LABEL_NAME = "nuclei"
LABEL_PATH = f"labels/{LABEL_NAME}"
CELL_NAME = "cells"  # cells grown from the nuclei (--cell-expansion): same ids as the nuclei
TISSUE_NAME = "tissue"
TISSUE_PATH = f"labels/{TISSUE_NAME}"
DIMS = ("y", "x")
RGB_DIMS = ("c", "y", "x")  # NGFF: the channel axis before the spatial ones
IMAGE_SIDE = 4096  # px, the root RGB image's long side (at most): ~50 MB raw, a few MB stored
STORE_ATTR = "wsi_nuclei_store"  # non-OME root attribute: what open_store / finalize need
# the omero rendering hints that make viewers compose the three channels as RGB
RGB_CHANNELS = (("Red", "FF0000"), ("Green", "00FF00"), ("Blue", "0000FF"))


def _compressor(clevel: int = 5) -> BloscCodec:
    # Blosc/zstd with byte shuffle: the NGFF ecosystem default; label runs compress well. The
    # RGB image takes level 1: as small (10.36 vs 10.31 MB for a 2300^2 overview), 2x faster
    return BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle")


@dataclass(frozen=True)
class LabelStoreSpec:
    """Where and how the label store is laid out. Pixel-free, so it pickles to workers."""

    path: str
    shape: tuple[int, int]  # level 0 (height, width)
    chunk: int
    level_shapes: tuple[tuple[int, int], ...]
    mpp: float  # level-0 micrometres per pixel
    dtype: str = "uint32"
    labels: tuple[str, ...] = (LABEL_NAME,)  # instance label images: nuclei, and cells if made

    @property
    def n_levels(self) -> int:
        return len(self.level_shapes)

    def level_path(self, level: int, group: str = LABEL_PATH) -> str:
        """Path of a level array inside the store (``group=""`` for the RGB image)."""
        return f"{group}/s{level}" if group else f"s{level}"

    def chunk_boxes(self) -> list[Box]:
        """The level-0 chunk grid as boxes (the natural unit for ``write_block``)."""
        h, w = self.shape
        c = self.chunk
        return [Box(y, x, min(y + c, h), min(x + c, w)) for y in range(0, h, c) for x in range(0, w, c)]


def pyramid_shapes(
    shape: tuple[int, int], chunk: int, n_levels: int | None = None
) -> tuple[tuple[int, int], ...]:
    """Level shapes by 2x striding (``ceil(n / 2)`` per step).

    Without ``n_levels``: halve until the level fits in 2 x 2 chunks (a viewer then needs
    at most 4 chunk reads for an overview).
    """
    if n_levels is not None and n_levels < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels}")
    shapes = [(int(shape[0]), int(shape[1]))]
    while (len(shapes) < n_levels) if n_levels is not None else (max(shapes[-1]) > 2 * chunk):
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return tuple(shapes)


def open_array(spec: LabelStoreSpec, path: str, mode: str = "r+") -> zarr.Array:
    return zarr.open_array(store=spec.path, path=path, mode=mode, zarr_format=3)


def _create_level_arrays(group: zarr.Group, spec: LabelStoreSpec, dtype: str,
                         shapes: Sequence[tuple[int, ...]] | None = None) -> list[zarr.Array]:
    """Empty level arrays ``s0..`` (replacing any); 3-D shapes are (c, y, x) images,
    chunked one channel at a time (napari shows each channel as its own layer)."""
    arrays = []
    for k, shp in enumerate(spec.level_shapes if shapes is None else shapes):
        rgb = len(shp) == 3
        arrays.append(group.create_array(
            f"s{k}", shape=shp, chunks=(1, spec.chunk, spec.chunk) if rgb else (spec.chunk, spec.chunk),
            dtype=dtype, fill_value=0, dimension_names=list(RGB_DIMS if rgb else DIMS),
            compressors=_compressor(1 if rgb else 5), overwrite=True,
        ))
    return arrays


def create_store(
    path: str | os.PathLike[str],
    shape: tuple[int, int],
    chunk: int,
    mpp: float,
    n_levels: int | None = None,
    dtype: str = "uint32",
    labels: tuple[str, ...] = (LABEL_NAME,),
) -> LabelStoreSpec:
    """Create a fresh store (an existing one at ``path`` is deleted) with empty arrays.

    No OME metadata is written here (see ``finalize``), so a crash mid-run leaves a store
    that no reader mistakes for a finished one. The RGB image and the tissue mask are
    created by ``write_image`` and ``write_tissue``, whose shapes depend on their inputs.
    """
    if chunk < 1 or min(shape) < 1:
        raise ValueError(f"need a positive shape and chunk, got shape={shape} chunk={chunk}")
    if np.dtype(dtype).kind != "u":
        raise ValueError(f"label dtype must be unsigned (uint32/uint64), got {dtype}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive finite number, got {mpp}")
    p = Path(path)
    if p.exists():
        log.info("replacing existing label store %s", p)
        shutil.rmtree(p)
    spec = LabelStoreSpec(
        path=str(p), shape=(int(shape[0]), int(shape[1])), chunk=int(chunk),
        level_shapes=pyramid_shapes(shape, chunk, n_levels), mpp=mpp, dtype=str(np.dtype(dtype)),
        labels=tuple(labels),
    )
    root = zarr.open_group(store=spec.path, mode="w", zarr_format=3)
    root.attrs[STORE_ATTR] = {"mpp": mpp, "chunk": spec.chunk}
    for name in spec.labels:
        _create_level_arrays(root.require_group("labels").require_group(name), spec, spec.dtype)
    log.debug("created label store %s: %d levels %s, chunk %d", p, spec.n_levels, spec.level_shapes, chunk)
    return spec


def open_store(path: str | os.PathLike[str]) -> LabelStoreSpec:
    """The spec of an existing store made by ``create_store`` (e.g. to resume writing
    blocks after a crash); nothing is modified."""
    p = Path(path)
    root = zarr.open_group(store=str(p), mode="r", zarr_format=3)
    info = root.attrs.get(STORE_ATTR)
    if not isinstance(info, dict):
        raise ValueError(f"{p} was not created by create_store (no '{STORE_ATTR}' attribute)")
    nuclei = root[LABEL_PATH]
    shapes = []
    while f"s{len(shapes)}" in nuclei:
        shapes.append(tuple(int(n) for n in nuclei[f"s{len(shapes)}"].shape))
    if not shapes:
        raise ValueError(f"{p} has no {LABEL_PATH}/s0 array")
    s0 = nuclei["s0"]
    names = tuple(n for n in (LABEL_NAME, CELL_NAME) if f"labels/{n}/s0" in root)
    return LabelStoreSpec(path=str(p), shape=shapes[0], chunk=int(info["chunk"]),
                          level_shapes=tuple(shapes), mpp=float(info["mpp"]), dtype=str(s0.dtype),
                          labels=names)


def _check_aligned(spec: LabelStoreSpec, box: Box) -> None:
    h, w = spec.shape
    c = spec.chunk
    ok = (
        0 <= box.y0 < box.y1 <= h and 0 <= box.x0 < box.x1 <= w
        and box.y0 % c == 0 and box.x0 % c == 0
        and (box.y1 % c == 0 or box.y1 == h) and (box.x1 % c == 0 or box.x1 == w)
    )
    if not ok:
        raise ValueError(f"{box} is not aligned to the {c}-px chunk grid of a {h}x{w} image")


def write_block(spec: LabelStoreSpec, box: Box, labels: np.ndarray, name: str = LABEL_NAME) -> None:
    """Write level-0 ``labels`` into the chunk-aligned ``box`` of label image ``name``.

    The box must start on the chunk grid and end on it or at the image edge, so it covers
    whole chunks: concurrent writers of different boxes never share a chunk, hence no locks.
    """
    _check_aligned(spec, box)
    if labels.shape != box.shape:
        raise ValueError(f"labels shape {labels.shape} != box shape {box.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if labels.size and labels.dtype.kind == "i" and labels.min() < 0:
        raise ValueError("negative label values")
    if labels.size and int(labels.max()) > np.iinfo(spec.dtype).max:
        raise ValueError(f"label value {int(labels.max())} does not fit {spec.dtype}")
    arr = open_array(spec, spec.level_path(0, f"labels/{name}"))
    arr[box.y0:box.y1, box.x0:box.x1] = labels.astype(spec.dtype, copy=False)


PYRAMID_BLOCK_LEVELS = 2  # levels 1..2 are made per level-0 block of 4 x 4 chunks, in parallel


def pyramid_blocks(spec: LabelStoreSpec, regions: Iterable[Box] | None = None,
                   levels: int = PYRAMID_BLOCK_LEVELS) -> list[Box]:
    """The level-0 blocks of ``2^levels x 2^levels`` chunks (aligned, clipped to the image)
    that meet ``regions`` (``None``: all). Every chunk of levels ``1..levels`` lies inside
    exactly one block, so :func:`build_pyramid_block` tasks never share a chunk."""
    side = spec.chunk * 2**levels
    h0, w0 = spec.level_shapes[0]
    boxes = [Box(0, 0, h0, w0)] if regions is None else [b for b in regions if not b.is_empty()]
    keys = {(by, bx) for b in boxes
            for by in range(b.y0 // side, (min(b.y1, h0) - 1) // side + 1)
            for bx in range(b.x0 // side, (min(b.x1, w0) - 1) // side + 1)}
    return [Box(by * side, bx * side, min((by + 1) * side, h0), min((bx + 1) * side, w0))
            for by, bx in sorted(keys)]


def build_pyramid_block(spec: LabelStoreSpec, block: Box,
                        levels: int = PYRAMID_BLOCK_LEVELS) -> None:
    """Levels ``1..levels`` over one block of :func:`pyramid_blocks`, from its level-0
    labels read once (level k = level 0 ``[::2^k, ::2^k]``; memory: one block), for each
    label image of the store."""
    for group in (f"labels/{name}" for name in spec.labels):
        src = open_array(spec, spec.level_path(0, group), "r")[block.y0:block.y1, block.x0:block.x1]
        for k in range(1, min(levels, spec.n_levels - 1) + 1):
            f = 2**k
            part = src[::f, ::f]
            y0, x0 = block.y0 // f, block.x0 // f
            open_array(spec, spec.level_path(k, group))[y0:y0 + part.shape[0], x0:x0 + part.shape[1]] = part


def build_pyramid(spec: LabelStoreSpec, regions: Iterable[Box] | None = None,
                  first_level: int = 1) -> int:
    """Fill label levels ``first_level..N``, each the ``[::2, ::2]`` stride of the previous
    one (``first_level = PYRAMID_BLOCK_LEVELS + 1`` after :func:`build_pyramid_block` ran on
    every block: the coarse rest).

    ``regions``: the level-0 boxes that may hold labels (the label blocks that were
    painted); only the chunks of each level that can see them are computed, so the cost
    follows the tissue, not the slide's extent (a 130k-px-wide slide with a little tissue
    would otherwise read and write thousands of empty chunks). ``None``: everything.
    Memory bounded: each output chunk reads one (2C, 2C) window of the level below.
    Returns the number of chunks computed.
    """
    c = spec.chunk
    h0, w0 = spec.level_shapes[0]
    boxes = [Box(0, 0, h0, w0)] if regions is None else [b for b in regions if not b.is_empty()]
    computed = 0
    for k in range(max(1, first_level), spec.n_levels):
        h, w = spec.level_shapes[k]
        f = 2**k  # level-k pixel i is level-0 pixel i * f
        chunks: set[tuple[int, int]] = set()
        for b in boxes:
            rows = range(-(-b.y0 // f) // c, (min(h, -(-b.y1 // f)) - 1) // c + 1)
            cols = range(-(-b.x0 // f) // c, (min(w, -(-b.x1 // f)) - 1) // c + 1)
            chunks.update((cy, cx) for cy in rows for cx in cols)
        for group in (f"labels/{name}" for name in spec.labels):
            src = open_array(spec, spec.level_path(k - 1, group), "r")
            dst = open_array(spec, spec.level_path(k, group))
            for cy, cx in sorted(chunks):
                y0, x0 = cy * c, cx * c
                y1, x1 = min(y0 + c, h), min(x0 + c, w)
                dst[y0:y1, x0:x1] = src[2 * y0:2 * y1:2, 2 * x0:2 * x1:2]
        computed += len(chunks)
        log.debug("pyramid level %d %s: %d chunk(s)", k, spec.level_shapes[k], len(chunks))
    return computed


def _record(spec: LabelStoreSpec, key: str, value: float) -> None:
    """Remember a layer's level-0 px per pixel in the store, for ``finalize``."""
    root = zarr.open_group(store=spec.path, mode="r+", zarr_format=3)
    root.attrs[STORE_ATTR] = {**root.attrs[STORE_ATTR], key: float(value)}


def _check_per_pixel(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"level0_per_pixel must be positive, got {value}")


def write_tissue(spec: LabelStoreSpec, mask: np.ndarray, level0_per_pixel: float) -> None:
    """Write the tissue mask as the label image ``labels/tissue`` (1 = tissue).

    ``mask`` pixel (i, j) covers level-0 ``[i*d, (i+1)*d)`` with ``d = level0_per_pixel``;
    it is stored at that resolution (its transform places it over the slide, see the
    module docstring), level k being ``mask[::2^k, ::2^k]``, with as many levels as the
    nuclei (the NGFF rule). Idempotent: the arrays are re-created.
    """
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"tissue mask must be a non-empty 2-D array, got shape {mask.shape}")
    _check_per_pixel(level0_per_pixel)
    m = (np.asarray(mask) != 0).astype(np.uint8)
    root = zarr.open_group(store=spec.path, mode="r+", zarr_format=3)
    group = root.require_group("labels").require_group(TISSUE_NAME)
    shapes = pyramid_shapes(m.shape, spec.chunk, spec.n_levels)
    for k, arr in enumerate(_create_level_arrays(group, spec, "uint8", shapes)):
        arr[...] = m[::2**k, ::2**k]
    _record(spec, "tissue_per_px", level0_per_pixel)
    log.debug("tissue label %s at %.3g level-0 px per pixel", m.shape, level0_per_pixel)


def write_image(spec: LabelStoreSpec, overview: np.ndarray, level0_per_pixel: float) -> None:
    """Write the slide overview as the root RGB image (c, y, x), one level per nuclei level.

    ``overview`` is (h, w, 3) uint8 whose pixel (i, j) is the mean of level-0 ``[i*d,
    (i+1)*d)`` with ``d = level0_per_pixel`` (``pipeline.overview.slide_overview``); level k
    is level k-1 box-averaged 2 x 2 (pixel size ``d * 2^k``). Idempotent.
    """
    rgb = np.asarray(overview)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"overview must be a non-empty (h, w, 3) RGB image, got {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise TypeError(f"overview must be uint8, got {rgb.dtype}")
    _check_per_pixel(level0_per_pixel)
    from pipeline.overview import box_reduce

    rgb = rgb[..., :3]
    root = zarr.open_group(store=spec.path, mode="r+", zarr_format=3)
    shapes = [(3, *hw) for hw in pyramid_shapes(rgb.shape[:2], spec.chunk, spec.n_levels)]
    for k, arr in enumerate(_create_level_arrays(root, spec, "uint8", shapes)):
        if k:
            rgb = box_reduce(rgb, 2)
        arr[...] = np.moveaxis(rgb, 2, 0)
    _record(spec, "image_per_px", level0_per_pixel)
    log.debug("RGB image %s at %.3g level-0 px per pixel, %d levels", shapes[0], level0_per_pixel,
              len(shapes))


def read_image(spec: LabelStoreSpec, level: int = 0) -> tuple[np.ndarray, float]:
    """A level of the root RGB image as written by :func:`write_image` (default the finest):
    (h, w, 3) uint8 and its level-0 px per pixel (the preview is made from it in a later task)."""
    root = zarr.open_group(store=spec.path, mode="r", zarr_format=3)
    rgb = np.moveaxis(root[f"s{level}"][...], 0, 2)
    return np.ascontiguousarray(rgb), float(root.attrs[STORE_ATTR]["image_per_px"]) * 2**level

