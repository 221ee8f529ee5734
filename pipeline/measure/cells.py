"""Cells grown from nuclei, as QuPath's ``cellExpansion`` makes them: every pixel within
the expansion distance of a nucleus joins the nearest nucleus (a Voronoi split between
neighbours), optionally only inside that nucleus's convex hull scaled by
``constrain_scale`` about its centroid (``cellConstrainScale``), so that a small nucleus
in empty stroma does not claim a disc of stroma as its cytoplasm.

Exactness (a cell never depends on where the tile seams fall): a pixel's cell depends only
on the nuclei within ``expansion`` of it, and, with a constraint, on the whole of those
nuclei (their hulls). So the cells of a core region computed from a window that adds
:func:`cell_margin` pixels on every side equal those computed from the whole image:
:func:`expand_nuclei` on the window, cropped to the core. Ties (a pixel at the same
distance from two nuclei) are resolved by ``scipy.ndimage.distance_transform_edt``'s
nearest-feature choice, which depends on the features' relative positions only, not on
the window's origin (tested: tiled == whole image).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon as fill_polygon


def cell_margin(expansion_px: float, max_nucleus_px: int) -> int:
    """The context a window needs around its core for exact cells: the expansion, plus the
    largest nucleus (its hull decides the constraint), plus one pixel."""
    return int(math.ceil(expansion_px)) + int(max_nucleus_px) + 1


def expand_nuclei(nuclei: np.ndarray, expansion_px: float,
                  constrain_scale: float | None = None, only: np.ndarray | None = None) -> np.ndarray:
    """Cell labels (the nucleus's id) of the nuclei in ``nuclei`` grown by ``expansion_px``
    pixels; nuclei keep their own pixels. ``only``: the ids whose cells are wanted (the
    others are painted 0): the other nuclei still bound them, but their hulls are not
    computed (a pixel nearest to a nucleus belongs to its cell or to none, so no other
    nucleus's hull decides a wanted cell)."""
    nuclei = np.asarray(nuclei)
    if only is not None:
        wanted = np.zeros(int(nuclei.max()) + 1 if nuclei.size else 1, bool)
        wanted[np.asarray(only, np.intp)] = True
    if expansion_px <= 0 or not nuclei.any():
        return np.where(wanted[nuclei], nuclei, 0) if only is not None else nuclei.copy()
    # the nearest nucleus pixel of every pixel; its distance from the indices in integers
    # (a third cheaper than scipy's float distances beside them)
    iy, ix = ndi.distance_transform_edt(nuclei == 0, return_distances=False, return_indices=True)
    cells = nuclei[iy, ix]
    iy -= np.arange(nuclei.shape[0], dtype=iy.dtype)[:, None]
    ix -= np.arange(nuclei.shape[1], dtype=ix.dtype)[None, :]
    cells[iy * iy + ix * ix > expansion_px * expansion_px] = 0
    if only is not None:
        cells[~wanted[cells]] = 0
    if constrain_scale is not None:
        reach = int(math.ceil(expansion_px)) + 1
        hulls_of = nuclei if only is None else np.where(wanted[nuclei], nuclei, 0)
        cells[~within_scaled_hulls(hulls_of, cells, constrain_scale, reach)] = 0
        cells[hulls_of > 0] = hulls_of[hulls_of > 0]
    return cells


def within_scaled_hulls(nuclei: np.ndarray, cells: np.ndarray, scale: float,
                        reach: int) -> np.ndarray:
    """Whether each pixel of ``cells`` lies inside the convex hull of its own nucleus
    (the hull of its pixel squares) scaled by ``scale`` about the nucleus's centroid.

    Each hull is filled in a frame fixed to its nucleus (the nucleus's box grown by
    ``reach``, which holds the whole cell), so that a cell cut by a window edge is filled
    with exactly the same arithmetic as in the whole image."""
    from scipy.spatial import ConvexHull, QhullError

    inside = np.zeros(cells.shape, bool)
    h, w = cells.shape
    square = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    for i, box in enumerate(ndi.find_objects(nuclei), start=1):
        if box is None:
            continue
        ys, xs = np.nonzero(nuclei[box] == i)
        pts = np.c_[ys, xs].astype(np.float64) + reach  # the nucleus frame
        corners = (pts[:, None, :] + square).reshape(-1, 2)
        try:
            hull = corners[ConvexHull(corners).vertices]
        except QhullError:  # a line of pixels: its corners are the hull
            hull = corners
        centre = pts.mean(axis=0)
        ring = centre + (hull - centre) * scale
        size = (box[0].stop - box[0].start + 2 * reach, box[1].stop - box[1].start + 2 * reach)
        rr, cc = fill_polygon(ring[:, 0], ring[:, 1], shape=size)
        rr, cc = rr + box[0].start - reach, cc + box[1].start - reach
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        rr, cc = rr[ok], cc[ok]
        inside[rr, cc] |= cells[rr, cc] == i
    return inside
