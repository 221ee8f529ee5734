"""Block planning finds, for every level-0 label block, every tile whose nuclei it paints."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.label_sampling import model_box
from pipeline.slide_run.blocks import _tiles_by_block
from pipeline.slide_run.tile_file import TileSummary
from pipeline.types import Box


def _brute_force(tiles, step, scale, shape, model_shape):
    """Blocks x tiles, exactly as a block job decides what it paints."""
    found = {}
    for y0 in range(0, shape[0], step):
        for x0 in range(0, shape[1], step):
            block = Box(y0, x0, min(y0 + step, shape[0]), min(x0 + step, shape[1]))
            mbox = model_box(block, scale, model_shape)  # what the block's painting reads
            hits = {s.index for s in tiles if s.count and not s.extent.intersect(mbox).is_empty()}
            if hits:
                found[(y0 // step, x0 // step)] = hits
    return found


@pytest.mark.parametrize("scale", [1.0, 2.0, 2.0000874, 0.5, 3.7, 0.37, 0.9901])
def test_index_is_a_superset_of_the_exact_intersections(scale: float) -> None:
    rng = np.random.default_rng(int(scale * 1000))
    shape = (1900, 2300)  # level 0
    model_shape = (int(np.ceil(shape[0] / scale)), int(np.ceil(shape[1] / scale)))
    tiles = []
    for i in range(60):
        y0 = int(rng.integers(0, model_shape[0] - 1))
        x0 = int(rng.integers(0, model_shape[1] - 1))
        h, w = (int(v) for v in rng.integers(1, 300, size=2))
        extent = Box(y0, x0, min(y0 + h, model_shape[0]), min(x0 + w, model_shape[1]))
        tiles.append(TileSummary(i, int(rng.integers(0, 3)), extent, 0, 0, 0.0, False))
    step = 256
    index = _tiles_by_block([(s.index, s.extent) for s in tiles if s.count], step, scale, shape)
    exact = _brute_force(tiles, step, scale, shape, model_shape)
    assert exact, "the random tiles should touch some blocks"
    for key, hits in exact.items():
        assert hits <= {i for i, _ in index.get(key, [])}, key
    # and the index stays local: no tile is listed for a block far from it
    assert sum(len(v) for v in index.values()) < 4 * sum(len(v) for v in exact.values()) + 200
