"""Cells made in the tile task (``--cell-expansion``) wherever the tile already knows
every nucleus a cell depends on; phase 1b (``slide_run.cells``) makes the others.

Why: a cell made here costs no second read of the slide's pixels, no load of the
neighbours' labels and no wait for the last tile of the slide.

When a cell is final here: a pixel joins nucleus ``n``'s cell when it lies within the
expansion ``e`` of ``n`` and no nucleus is nearer (with ``--cell-constrain-scale``, also
only inside ``n``'s scaled hull). So ``n``'s cell depends only on the nuclei with a pixel
within ``2e`` of ``n``, and on no other nucleus's hull. Besides its own
nuclei, a tile knows the final instances of every foreground component lying whole
inside its valid box near them (``stitch.tile.Rivals``: their owners compute the same
instances, and the tissue rule drops the same of them), and it knows where foreground of
unknown instances lies (components cut by the valid box's edge that another tile owns).
Where neither unknown foreground nor any pixel outside the valid box comes within
``2 * reach + 1`` of ``n``'s box, ``n``'s cell here equals phase 1b's (tested: tiled ==
whole image, with cells made in both places). A tile's other cells are left to phase 1b.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.slide_run.cells import CellSettings, cell_box, extent_of, measure_cells, object_boxes
from pipeline.slide_run.tile_file import TileCells
from pipeline.types import Box


def lookahead(settings: CellSettings) -> int:
    """Model px around a nucleus's box within which every nucleus must be known for its
    cell: twice the reach (a rival of a cell pixel lies within ``e`` of it, the pixel
    within ``e`` of the nucleus), plus one."""
    return 2 * settings.reach + 1


def cells_in_tile(instances: Any, settings: CellSettings, image: Box, scale: float, tissue: Any,
                  pixels: Callable[[Box], np.ndarray], measure: Mapping[str, Any],
                  nucleus_columns: Mapping[str, np.ndarray], nucleus_bodies: Sequence[str]
                  ) -> TileCells | None:
    """The final cells of the tile's own nuclei (``instances``: ``segment_tile``'s result
    with its ``rivals``, off-tissue nuclei already dropped; ``tissue``: the job's mask or
    None), measured on ``pixels(box)``; None when none is final. ``measure``: the keyword
    arguments of :func:`slide_run.cells.measure_cells` that describe the slide."""
    t0 = time.perf_counter()
    grown = _final_cells(instances, settings, image, scale, tissue)
    if grown is None:
        return None
    box, cells, nuclei, ids = grown
    columns, bodies = measure_cells(box, cells, nuclei, pixels(box), ids, nucleus_columns,
                                    nucleus_bodies, **measure)
    return TileCells(box, cells, ids, columns, bodies, time.perf_counter() - t0)


def _final_cells(instances: Any, settings: CellSettings, image: Box, scale: float, tissue: Any
                 ) -> tuple[Box, np.ndarray, np.ndarray, np.ndarray] | None:
    """(box, cells, own nuclei, ids) of the cells that are final in this tile."""
    from pipeline.measure.cells import expand_nuclei
    from pipeline.tissue import keep_in_tissue

    rivals, extent, count = instances.rivals, instances.extent, instances.count
    look = lookahead(settings)
    canvas_box = extent.grow(look).intersect(image)
    origin = (canvas_box.y0, canvas_box.x0)
    canvas = np.zeros(canvas_box.shape, np.int32)
    unknown = np.ones(canvas_box.shape, bool)  # outside the valid box: unknown
    valid = rivals.valid.intersect(canvas_box)
    at_valid = valid.slices(origin)
    from_valid = valid.slices((rivals.valid.y0, rivals.valid.x0))
    unknown[at_valid] = rivals.unknown[from_valid]
    others = rivals.labels
    if tissue is not None and others.any():  # the owners drop the same nuclei (judged whole)
        others, _ = keep_in_tissue(others, (rivals.valid.y0, rivals.valid.x0), scale, tissue)
    others = others[from_valid]
    canvas[at_valid] = np.where(others > 0, others + count, 0)
    own = instances.labels.astype(np.int32, copy=False)
    at_own = extent.slices(origin)
    np.copyto(canvas[at_own], own, where=own > 0)
    unknown[at_own] &= own == 0

    boxes = object_boxes(own)
    present = boxes[:, 2] > boxes[:, 0]
    # each nucleus's box grown by ``look``, in canvas coordinates, clipped to the canvas
    # (what lies past it lies past the image: no nucleus there in the whole image either)
    shift = np.array([extent.y0 - origin[0], extent.x0 - origin[1]] * 2)
    grow = np.array([-look, -look, look, look])
    near = np.clip(boxes + shift + grow, 0, [canvas.shape[0], canvas.shape[1]] * 2)
    table = np.zeros((canvas.shape[0] + 1, canvas.shape[1] + 1), np.int32)  # unknown px in the box up to
    np.cumsum(unknown.cumsum(axis=0, dtype=np.int32), axis=1, out=table[1:, 1:])
    y0, x0, y1, x1 = near.T
    unknown_near = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    final = present & (unknown_near == 0)
    if not final.any():
        return None
    ids = np.flatnonzero(final).astype(np.int64) + 1

    cells = expand_nuclei(canvas, settings.expansion_px, settings.constrain_scale, only=ids)
    box = cell_box(extent_of(boxes[final]).shift(extent.y0, extent.x0), settings.reach, image)
    lut = np.zeros(max(int(canvas.max()), count) + 1, np.int32)
    lut[ids] = ids
    crop = box.slices(origin)
    return box, cells[crop], lut[canvas[crop]], ids

