"""Marker-controlled watershed: (nucleus probability, distance map) -> instance labels.

Implements the decomposition contract of ``docs/design.md``: every step is a function of
one foreground component alone, so that a window containing a whole component (with the
same network outputs) yields the same instances for it as the whole image. The stitcher
relies on that and calls the steps (:func:`foreground_components`,
:func:`split_components`) on windows directly.

Steps:

1. foreground = ``prob > fg_threshold`` (no hole filling: a ring of nuclei around a
   lumen must not swallow it); 8-connected components;
2. markers = 8-connected parts of ``dist > marker_threshold`` inside the foreground,
   parts smaller than ``min_marker_size`` dropped;
3. a component with zero or one marker is one instance; a component with several is
   split by ``skimage.segmentation.watershed(-dist, markers, mask=component)`` run on the
   component's bounding box only (8-connected flooding, so every component pixel is
   assigned, just as a one-marker component is assigned whole);
4. each instance is reduced to its largest 4-connected part (one polygon per nucleus;
   ties go to the part whose first pixel comes first in raster order);
5. each hole of an instance (background 4-connected, as ``binary_fill_holes``) is filled
   if it holds no foreground pixel at all;
6. instances smaller than ``min_size`` (after filling) are removed; ids become ``1..n``
   in raster order of each instance's first pixel.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as label_regions
from skimage.segmentation import watershed

from models.config import WatershedParams

log = logging.getLogger(__name__)

EIGHT = np.ones((3, 3), dtype=bool)


def foreground_components(prob: np.ndarray, params: WatershedParams) -> tuple[np.ndarray, int]:
    """8-connected components (int32, 0 = background) of ``prob > fg_threshold``."""
    comps, n = ndi.label(np.asarray(prob) > params.fg_threshold, structure=EIGHT,
                         output=np.int32)
    return comps, int(n)


def find_markers(dist: np.ndarray, foreground: np.ndarray,
                 params: WatershedParams) -> tuple[np.ndarray, int]:
    """Watershed seeds: 8-connected parts of ``dist > marker_threshold`` inside the
    foreground with at least ``min_marker_size`` pixels, numbered ``1..n`` (int32)."""
    parts, n = ndi.label((np.asarray(dist) > params.marker_threshold) & foreground,
                         structure=EIGHT, output=np.int32)
    if n == 0:
        return parts, 0
    sizes = np.bincount(parts.ravel(), minlength=n + 1)
    keep = sizes >= max(params.min_marker_size, 1)
    keep[0] = False
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[parts], int(keep.sum())


def split_components(dist: np.ndarray, component_labels: np.ndarray,
                     params: WatershedParams, prob: np.ndarray | None = None) -> np.ndarray:
    """Instances (int32, ids ``1..n`` in raster order) of the given components.

    ``component_labels`` are the components of :func:`foreground_components`; any subset
    of them may be passed (others set to 0), ids need not be consecutive. ``prob`` decides
    which instance holes hold foreground (and so stay open); without it the foreground is
    taken to be the given components, which is exact only if no component was left out
    (a left-out component lying in a hole of a kept instance would be painted over).
    """
    comps = np.asarray(component_labels)
    if comps.shape != np.shape(dist):
        raise ValueError(f"distance map {np.shape(dist)} and components {comps.shape} differ")
    comps = comps.astype(np.int64, copy=False)
    foreground = comps > 0
    if not foreground.any():
        return np.zeros(comps.shape, dtype=np.int32)
    dist = np.asarray(dist, dtype=np.float32)
    markers, n_markers = find_markers(dist, foreground, params)

    n_comps = int(comps.max())
    # one instance per component unless it holds two or more markers
    instances = comps.copy()
    if n_markers > 1:
        # a marker lies inside one component: read the component at any of its pixels
        marker_comp = np.zeros(n_markers + 1, dtype=np.int64)
        marker_comp[markers.ravel()] = comps.ravel()
        marker_count = np.bincount(marker_comp[1:], minlength=n_comps + 1)
        marker_count[0] = 0
        multi = np.flatnonzero(marker_count > 1)
        if multi.size:
            # one call per component, not one for all: skimage queues every marker pixel
            # at age 0, so ties between them pop in an order that depends on the whole
            # queue; components flooded together split differently than alone, and a
            # tile's crop would not give the whole image's instances (tried: fails
            # tests/test_watershed.py::test_decomposition_crop_gives_same_instances)
            objects = ndi.find_objects(comps, max_label=int(multi[-1]))
            for cid in multi.tolist():
                box = objects[cid - 1]
                mask = comps[box] == cid
                seeds = np.where(mask, markers[box], 0)
                split = watershed(-dist[box], seeds, mask=mask, connectivity=2)
                # marker ids are unique image-wide; shift them past the component ids
                region = instances[box]
                region[mask] = split[mask].astype(np.int64) + n_comps
    if prob is None:
        open_foreground = foreground
    else:
        if np.shape(prob) != comps.shape:
            raise ValueError(f"probability {np.shape(prob)} and components {comps.shape} differ")
        open_foreground = np.asarray(prob) > params.fg_threshold
    return _finalise(instances, open_foreground, params.min_size)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes(mask)`` (holes: background 4-connected parts that do not
    touch the border), by one labelling of the background instead of iterated dilations
    from the border: equal output, ~3x faster on a tile."""
    mask = np.asarray(mask, dtype=bool)
    background, n = ndi.label(~mask)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, dtype=bool)
    outside[0] = True  # the mask itself
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        outside[edge] = True
    return mask | ~outside[background]


def _fill_holes(parts: np.ndarray, foreground: np.ndarray) -> None:
    """Fill, in place, each hole of each part that holds no foreground pixel.

    Such a hole is background enclosed by one part, so it is also enclosed in the union
    of all parts: the image-wide fill finds the few parts worth looking at.
    """
    enclosed = fill_holes(parts > 0) & ~foreground
    if not enclosed.any():
        return
    near = ndi.binary_dilation(enclosed) & (parts > 0)
    candidates = np.unique(parts[near])
    objects = ndi.find_objects(parts, max_label=int(candidates[-1]))
    for pid in candidates.tolist():
        box = objects[pid - 1]
        mask = parts[box] == pid
        holes = fill_holes(mask) & ~mask
        if not holes.any():
            continue
        hole_ids, n = ndi.label(holes)
        has_fg = np.bincount(hole_ids[foreground[box]], minlength=n + 1) > 0
        has_fg[0] = True
        fill = ~has_fg[hole_ids]
        if fill.any():
            parts[box][fill] = pid


def _finalise(instances: np.ndarray, foreground: np.ndarray, min_size: int) -> np.ndarray:
    """Largest 4-connected part of each instance, hole filling, size filter, ids.

    ``skimage.measure.label`` numbers regions of equal value in raster order of their
    first pixel, so part ids already carry the raster order the contract asks for (and
    filling a hole never adds a pixel before the first one).
    """
    parts = label_regions(instances, background=0, connectivity=1)
    n_parts = int(parts.max())
    if n_parts == 0:
        return np.zeros(instances.shape, dtype=np.int32)
    flat = parts.ravel()
    sizes = np.bincount(flat, minlength=n_parts + 1)
    owner = np.zeros(n_parts + 1, dtype=np.int64)
    owner[flat] = instances.ravel()
    ids = np.arange(1, n_parts + 1)
    # per instance: largest part first, then the earliest in raster order
    order = np.lexsort((ids, -sizes[1:], owner[1:]))
    first_of_owner = np.ones(order.size, dtype=bool)
    first_of_owner[1:] = owner[1:][order[1:]] != owner[1:][order[:-1]]
    largest = np.zeros(n_parts + 1, dtype=np.int32)
    chosen = ids[order[first_of_owner]]
    largest[chosen] = chosen
    parts = largest[parts]
    _fill_holes(parts, foreground)
    sizes = np.bincount(parts.ravel(), minlength=n_parts + 1)
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    lut = np.zeros(n_parts + 1, dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[parts]


def postprocess(prob: np.ndarray, dist: np.ndarray, params: WatershedParams) -> np.ndarray:
    """Instance labels (int32, ``1..n`` in raster order) from the network outputs."""
    if np.shape(prob) != np.shape(dist):
        raise ValueError(f"probability {np.shape(prob)} and distance {np.shape(dist)} differ")
    comps, _ = foreground_components(prob, params)
    labels = split_components(dist, comps, params)
    log.debug("watershed: %d instances", int(labels.max()))
    return labels
