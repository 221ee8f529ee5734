"""What a tile decides of a foreground component by itself: whether a valid box's edge cuts
it, its first pixel (ownership), its box, the instances of the components it keeps; and
the giant rule applied to a whole image (``drop_giants``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from models.config import WatershedParams
from models.watershed import foreground_components, split_components
from pipeline.types import Box


def drop_giants(instances: np.ndarray, prob: np.ndarray, params: WatershedParams,
                side: int) -> np.ndarray:
    """``instances`` without the pixels of foreground components whose bounding box has a
    side above ``side``: the whole-image counterpart of the tiled rule."""
    comps, _ = foreground_components(prob, params)
    giants = [i + 1 for i, o in enumerate(ndi.find_objects(comps))
              if o is not None and box_side(o) > side]
    if not giants:
        return instances
    return np.where(np.isin(comps, giants), 0, instances)


def box_side(obj: tuple[slice, slice]) -> int:
    """The longer side of a component's box (``ndimage.find_objects`` slices)."""
    return max(obj[0].stop - obj[0].start, obj[1].stop - obj[1].start)


@dataclass
class Piece:
    box: Box  # global box of ``labels``/``prob``
    labels: np.ndarray
    prob: np.ndarray


def interior_edges(valid: Box, image: Box) -> tuple[bool, bool, bool, bool]:
    """Which sides of the valid box are cuts through the image (top, left, bottom, right)."""
    return (valid.y0 > image.y0, valid.x0 > image.x0, valid.y1 < image.y1, valid.x1 < image.x1)


def edge_ids(comps: np.ndarray, edges: tuple[bool, bool, bool, bool]) -> set[int]:
    sides = []
    if edges[0]:
        sides.append(comps[0, :])
    if edges[1]:
        sides.append(comps[:, 0])
    if edges[2]:
        sides.append(comps[-1, :])
    if edges[3]:
        sides.append(comps[:, -1])
    if not sides:
        return set()
    ids = np.unique(np.concatenate(sides))
    return set(ids[ids > 0].tolist())


def first_pixel(comps: np.ndarray, cid: int, obj: tuple[slice, slice]) -> tuple[int, int]:
    """First pixel of component ``cid`` in raster order (local coordinates)."""
    row = obj[0].start
    cols = np.flatnonzero(comps[row, obj[1]] == cid)
    return row, obj[1].start + int(cols[0])

def kept_instances(prob: np.ndarray, dist: np.ndarray, comps: np.ndarray, keep: list[int],
               params: WatershedParams, watershed: bool = True) -> np.ndarray:
    """Instances of the kept components only (valid by the decomposition contract: on
    any crop that holds them whole); none at all without ``watershed`` (the planning pass
    of :func:`predict_grown_windows`, whose decisions do not depend on instances)."""
    if not keep or not watershed:
        return np.zeros(prob.shape, dtype=np.int32)
    selected = np.isin(comps, np.asarray(keep, dtype=comps.dtype))
    return split_components(dist, np.where(selected, comps, 0), params, prob=prob)


def global_box(obj: tuple[slice, slice], valid: Box) -> Box:
    return Box(obj[0].start + valid.y0, obj[1].start + valid.x0,
               obj[0].stop + valid.y0, obj[1].stop + valid.x0)
