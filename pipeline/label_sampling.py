"""Level-0 label painting from model-resolution instances, each nucleus in one piece.

Nuclei are segmented at the model's resolution; the level-0 label image samples them by
**nearest neighbour**: level-0 pixel ``y`` takes model pixel ``floor((y + 0.5) / scale)``
(:func:`block_rows`; ``scale`` = level-0 px per model px). For ``scale >= 1`` each model
pixel becomes a run of one or more level-0 pixels, so an instance that is 4-connected at
model resolution (the watershed contract) stays 4-connected. For ``scale < 1`` (a model
finer than level 0, e.g. 0.25 µm/px on a 0.5 µm/px slide) the sampling skips model rows
and columns, and a thin nucleus falls apart (113 of 3,284 nuclei of
CMU-1-Small-Region.svs with ``pruned80.pt``) or vanishes. So, for ``scale < 1`` only:

* **Cells** (:func:`cell_bounds`): level-0 pixel ``y`` covers the model pixels whose
  centre lies in it, ``floor((m + 0.5) * scale) == y``. Cells partition the model pixels
  into runs, each run holds its level-0 pixel's nearest sample, and the map
  ``m -> y`` is monotone with steps of 0 or 1: the cell image of a 4-connected set is
  4-connected.
* **Split nuclei** (:func:`split_nuclei`): those whose nearest-sampled image on the
  slide's level-0 grid is not exactly one 4-connected piece (split, or vanished). A tile
  holds its nuclei whole, so this is decided from one tile, identically by every block
  that paints it.
* **Bridging** (:func:`sample_block`): a level-0 pixel whose nearest sample is background
  and whose cell holds a pixel of a split nucleus takes that nucleus (the lowest id if
  several). Every other pixel is the nearest sample, as before: nuclei that sample into
  one piece keep exactly their nearest-neighbour pixels (no area bias), and no pixel of
  one nucleus is given to another.

A pixel's value depends only on its cell and on per-nucleus flags, never on the block
that paints it, so the label image does not depend on the chunk layout.

**Connectivity: 4** (:data:`CONNECTIVITY`, pixels sharing an edge). It is the watershed's
instance rule (each instance is its largest 4-connected part), the strongest one (a
4-connected set is 8-connected too) and the one every reader agrees on: a label traced as
pixel squares (QuPath's label-image import, ``rasterio.features.shapes``) is one polygon,
where an 8-only link (two pixels touching at a corner) gives a multi-part geometry;
napari's fill bucket and ``scipy.ndimage.label`` default to 4-connectivity, skimage's
``label`` to 8. The GeoJSON outlines do not depend on any of this: they are traced at model
resolution.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.types import Box

__all__ = [
    "CONNECTIVITY",
    "block_rows",
    "cell_bounds",
    "model_box",
    "paint_block",
    "sample_block",
    "sample_labels",
    "split_nuclei",
]

CONNECTIVITY = 1  # skimage's rank: 1 = 4-connected (edge neighbours) in 2-D


def block_rows(start: int, stop: int, scale: float, limit: int) -> np.ndarray:
    """Model pixel of each level-0 pixel centre: floor((y + 0.5) / scale)."""
    idx = np.floor((np.arange(start, stop) + 0.5) / scale).astype(np.int64)
    return np.clip(idx, 0, limit - 1)


def cell_bounds(start: int, stop: int, scale: float, limit: int) -> np.ndarray:
    """For ``scale < 1``: ``b`` (``stop - start + 1`` values) such that level-0 pixel
    ``start + i`` covers model pixels ``[b[i], b[i + 1])``.

    ``b(y) = ceil(y / scale - 0.5)``, the first model pixel whose centre maps to ``y`` or
    later, kept in ``(nearest(y - 1), nearest(y)]`` so that float rounding can never leave
    a level-0 pixel's nearest sample outside its cell nor a cell empty (exact arithmetic
    never needs that guard). A function of ``y`` alone: adjacent blocks share bounds."""
    if not scale < 1:
        raise ValueError(f"cells are defined for scale < 1, got {scale}")
    y = np.arange(start, stop + 1, dtype=np.float64)
    nearest = np.floor((y + 0.5) / scale)
    previous = np.floor((y - 0.5) / scale)
    bounds = np.minimum(np.maximum(np.ceil(y / scale - 0.5), previous + 1), nearest)
    return np.clip(bounds, 0, limit).astype(np.int64)


def model_box(block: Box, scale: float, model_shape: tuple[int, int]) -> Box:
    """The model pixels that painting the level-0 ``block`` reads: the nearest samples,
    and for ``scale < 1`` the cells (a superset)."""
    rows = block_rows(block.y0, block.y1, scale, model_shape[0])
    cols = block_rows(block.x0, block.x1, scale, model_shape[1])
    box = Box(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    if scale >= 1:
        return box
    rb = cell_bounds(block.y0, block.y1, scale, model_shape[0])
    cb = cell_bounds(block.x0, block.x1, scale, model_shape[1])
    return Box(min(box.y0, int(rb[0])), min(box.x0, int(cb[0])),
               max(box.y1, int(rb[-1])), max(box.x1, int(cb[-1])))


def split_nuclei(labels: np.ndarray, extent: Box, scale: float, level0_shape: tuple[int, int],
                 model_shape: tuple[int, int]) -> np.ndarray:
    """Ids of the instances of ``labels`` (a tile: whole instances, local ids, placed at
    ``extent`` in model pixels) whose nearest-neighbour image on the slide's level-0 grid
    is not one 4-connected piece: split into several, or sampled nowhere.

    Only nearest samples that fall inside ``extent`` matter (an instance lies whole in
    it), and only level-0 pixels of the slide (``level0_shape``) are painted. Empty for
    ``scale >= 1``, where nearest up-sampling keeps every 4-connected set connected."""
    from skimage.measure import label as connected_components  # heavy: only where needed

    n = int(labels.max()) if labels.size else 0
    if scale >= 1 or n == 0:
        return np.zeros(0, dtype=np.int64)
    axes = []
    for lo, hi, size, limit in ((extent.y0, extent.y1, level0_shape[0], model_shape[0]),
                                (extent.x0, extent.x1, level0_shape[1], model_shape[1])):
        start = max(0, int(np.floor(lo * scale)) - 1)
        stop = min(size, int(np.ceil(hi * scale)) + 1)
        idx = block_rows(start, stop, scale, limit) if stop > start else np.zeros(0, np.int64)
        axes.append(idx[(idx >= lo) & (idx < hi)] - lo)  # contiguous: the map is monotone
    sampled = labels[np.ix_(axes[0], axes[1])]
    pieces = np.zeros(n + 1, dtype=np.int64)
    if sampled.size:
        comps, count = connected_components(sampled, background=0, connectivity=CONNECTIVITY,
                                            return_num=True)
        owner = np.zeros(count + 1, dtype=np.int64)
        owner[comps.ravel()] = sampled.ravel()
        pieces += np.bincount(owner[1:], minlength=n + 1)
    return np.flatnonzero(pieces[1:] != 1) + 1


def sample_block(canvas: np.ndarray, splits: Sequence[tuple[int, Box]], origin: tuple[int, int],
                 block: Box, scale: float, model_shape: tuple[int, int]) -> np.ndarray:
    """The level-0 ``block`` of labels from the model-pixel ``canvas`` (global ids, array
    ``[0, 0]`` at model pixel ``origin``, covering :func:`model_box`): nearest samples,
    then each background pixel whose cell holds a split nucleus (``splits``: global id and
    model-pixel bounding box; ``scale < 1`` only) takes the lowest such id.

    Split nuclei are few (3 % on CMU-1-Small-Region), so cells are scanned only inside
    their boxes: the block costs about what nearest sampling costs."""
    rows = block_rows(block.y0, block.y1, scale, model_shape[0]) - origin[0]
    cols = block_rows(block.x0, block.x1, scale, model_shape[1]) - origin[1]
    labels = canvas[np.ix_(rows, cols)]
    if scale >= 1 or not splits:
        return labels
    rb = cell_bounds(block.y0, block.y1, scale, model_shape[0]) - origin[0]
    cb = cell_bounds(block.x0, block.x1, scale, model_shape[1]) - origin[1]
    for nucleus, box in sorted(splits, key=lambda s: s[0]):  # lowest id first: it wins ties
        box = box.shift(-origin[0], -origin[1])
        # cells i with rb[i] < box.y1 and rb[i + 1] > box.y0 (bounds strictly increase)
        i0, i1 = np.searchsorted(rb[1:], box.y0, "right"), np.searchsorted(rb[:-1], box.y1, "left")
        j0, j1 = np.searchsorted(cb[1:], box.x0, "right"), np.searchsorted(cb[:-1], box.x1, "left")
        if i0 >= i1 or j0 >= j1:
            continue
        hit = canvas[rb[i0]:rb[i1], cb[j0]:cb[j1]] == nucleus
        hit = np.logical_or.reduceat(hit, rb[i0:i1] - rb[i0], axis=0)
        hit = np.logical_or.reduceat(hit, cb[j0:j1] - cb[j0], axis=1)
        window = labels[i0:i1, j0:j1]
        window[hit & (window == 0)] = nucleus
    return labels


def paint_block(block: Box, scale: float, model_shape: tuple[int, int],
                level0_shape: tuple[int, int],
                sources: Iterable[tuple[np.ndarray, Box, int]],
                collisions: list[int] | None = None) -> np.ndarray:
    """Level-0 labels (uint32, global ids) of ``block`` from tiles ``(labels, extent,
    id offset)``: each tile's owned instances with local ids, consumed one at a time.
    Model pixels painted by two tiles (which exact stitching rules out) are counted into
    ``collisions`` when given."""
    mbox = model_box(block, scale, model_shape)
    origin = (mbox.y0, mbox.x0)
    canvas = np.zeros(mbox.shape, dtype=np.uint32)
    splits: list[tuple[int, Box]] = []
    for labels, extent, offset in sources:
        inter = extent.intersect(mbox)
        if inter.is_empty():
            continue
        src = labels[inter.slices((extent.y0, extent.x0))]
        dst = canvas[inter.slices(origin)]
        mask = src > 0
        if collisions is not None:
            collisions.append(int(np.count_nonzero(dst[mask])))
        dst[mask] = src[mask].astype(np.uint32) + np.uint32(offset)
        if scale < 1:
            splits += _split_boxes(labels, extent, offset, scale, level0_shape, model_shape)
    return sample_block(canvas, splits, origin, block, scale, model_shape)


def _split_boxes(labels: np.ndarray, extent: Box, offset: int, scale: float,
                 level0_shape: tuple[int, int], model_shape: tuple[int, int]) -> list[tuple[int, Box]]:
    """Global id and model-pixel bounding box of each split nucleus of one tile."""
    from scipy import ndimage as ndi

    split = split_nuclei(labels, extent, scale, level0_shape, model_shape)
    if not split.size:
        return []
    objects = ndi.find_objects(labels.astype(np.int64, copy=False), max_label=int(split[-1]))
    return [(int(k) + offset, Box(sy.start, sx.start, sy.stop, sx.stop).shift(extent.y0, extent.x0))
            for k in split for sy, sx in [objects[k - 1]] if sy is not None]


def sample_labels(labels: np.ndarray, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """A whole model-resolution label image on a level-0 grid of ``shape``, painted as the
    pipeline paints a slide (one block, one tile at the origin)."""
    model_shape = (int(labels.shape[0]), int(labels.shape[1]))
    extent = Box(0, 0, *model_shape)
    return paint_block(Box(0, 0, *shape), scale, model_shape, shape, [(labels, extent, 0)])
