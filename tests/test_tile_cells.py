"""Cells made in the tile task (``slide_run.tile_cells``): which are final there, and that
nuclei the tissue rule drops do not bound them (their owners drop them too)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from pipeline.measure.cells import expand_nuclei
from pipeline.slide_run.cells import CellSettings
from pipeline.slide_run.tile_cells import _final_cells
from pipeline.stitch.tile import Rivals
from pipeline.tissue import TissueMask
from pipeline.types import Box

SIZE = 160
SETTINGS = CellSettings(expansion_px=12.0, constrain_scale=None)


def disc(labels: np.ndarray, cy: int, cx: int, r: int, value: int) -> None:
    yy, xx = np.mgrid[:labels.shape[0], :labels.shape[1]]
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value


def tile(own: np.ndarray, rivals: np.ndarray, unknown: np.ndarray) -> SimpleNamespace:
    """A tile whose valid box is the whole image, owning ``own``."""
    whole = Box(0, 0, SIZE, SIZE)
    return SimpleNamespace(rivals=Rivals(whole, rivals, unknown), extent=whole, count=int(own.max()),
                           labels=own)


def test_a_dropped_rival_does_not_bound_a_cell_and_unknown_defers_one() -> None:
    own = np.zeros((SIZE, SIZE), np.int32)
    disc(own, 40, 60, 4, 1)
    disc(own, 120, 60, 4, 2)
    rivals = np.zeros_like(own)
    disc(rivals, 40, 84, 4, 7)  # 24 px from nucleus 1: within twice the expansion
    unknown = np.zeros(own.shape, bool)
    unknown[110:130, 85:90] = True  # foreground of unknown instances 20 px from nucleus 2
    image = Box(0, 0, SIZE, SIZE)

    box, cells, nuclei, ids = _final_cells(tile(own, rivals, unknown), SETTINGS, image, 1.0, None)
    assert ids.tolist() == [1]  # nucleus 2 has unknown foreground within its look-ahead
    everything = expand_nuclei(np.where(rivals > 0, rivals, own), SETTINGS.expansion_px)
    expected = np.where(everything == 1, 1, 0)[box.slices()]
    assert np.array_equal(cells, expected)
    assert cells[40 - box.y0, 71 - box.x0] == 1 and cells[40 - box.y0, 73 - box.x0] == 0  # the bisector
    assert np.array_equal(nuclei, np.where(own == 1, 1, 0)[box.slices()])

    # tissue only left of x = 64 (its mask grows by one 16 px pixel: x < 80): the rival,
    # centred at x = 84, is dropped by its owner, so nucleus 1's cell is a whole disc
    mask = np.zeros((SIZE // 16, SIZE // 16), bool)
    mask[:, :4] = True
    tissue = TissueMask(mask, 16.0)
    box, cells, _, ids = _final_cells(tile(own, rivals, unknown), SETTINGS, image, 1.0, tissue)
    alone = expand_nuclei(np.where(own == 1, 1, 0), SETTINGS.expansion_px)
    assert ids.tolist() == [1] and np.array_equal(cells, alone[box.slices()])
    assert cells[40 - box.y0, 73 - box.x0] == 1
