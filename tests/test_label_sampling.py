"""Level-0 label painting (pipeline.label_sampling): nearest sampling keeps nuclei whole
when the model is finer than level 0, painting does not depend on the block layout, and
the vectorised code equals a pixel-by-pixel reading of the rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from models.evaluate import upsample_labels
from pipeline.label_sampling import (
    block_rows,
    cell_bounds,
    model_box,
    paint_block,
    sample_labels,
    split_nuclei,
)
from pipeline.types import Box

FOUR = ndi.generate_binary_structure(2, 1)
SCALES = [0.5, 0.9901, 0.37, 0.75, 1 / 3]


def thin_nuclei() -> np.ndarray:
    """Model-resolution instances that nearest down-sampling tears apart: 4-connected
    one-pixel-wide staircases, a ring, a U, an L and a blob; none touch each other."""
    lab = np.zeros((130, 160), np.int32)
    for k, x0 in enumerate((3, 24, 45), start=1):  # diagonals of different slopes
        for i in range(40):
            x = x0 + (i * k) // 3
            lab[5 + i, x:x + 2] = k
    yy, xx = np.mgrid[:130, :160]
    r = np.hypot(yy - 85, xx - 30)
    lab[(r >= 14) & (r < 15.5)] = 4  # a thin ring
    lab[60:100, 70] = 5  # a U
    lab[60:100, 90] = 5
    lab[99, 70:91] = 5
    lab[10:50, 110] = 6  # an L, one pixel wide
    lab[49, 110:150] = 6
    lab[(yy - 110) ** 2 + (xx - 130) ** 2 <= 64] = 7  # a blob: never split
    for v in range(1, 8):
        assert ndi.label(lab == v, FOUR)[1] == 1, v
    return lab


def nearest(lab: np.ndarray, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """Plain nearest sampling: the label image before this module."""
    return lab[np.ix_(block_rows(0, shape[0], scale, lab.shape[0]),
                      block_rows(0, shape[1], scale, lab.shape[1]))]


def pieces(lab: np.ndarray, n: int) -> np.ndarray:
    """4-connected pieces of each id 1..n (0: absent)."""
    return np.array([ndi.label(lab == v, FOUR)[1] for v in range(1, n + 1)])


def level0_shape(model_shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """A slide whose model grid (``plan_read``: ceil(H / scale)) is ``model_shape``."""
    return (math.floor(model_shape[0] * scale), math.floor(model_shape[1] * scale))


def as_tiles(lab: np.ndarray, cut: tuple[int, int]) -> list[tuple[np.ndarray, Box, int]]:
    """The instances dealt to four tiles (by the quadrant of their first pixel, as a tile
    owns a nucleus), each with local ids 1..n on the bounding box of its nuclei and the id
    offset that restores the global ids."""
    ids = np.arange(1, int(lab.max()) + 1)
    first = ndi.minimum_position(np.arange(lab.size).reshape(lab.shape), lab, ids)
    quadrant = {int(v): (y >= cut[0], x >= cut[1]) for v, (y, x) in zip(ids, first)}
    tiles, offset = [], 0
    for q in sorted(set(quadrant.values())):
        members = [v for v in ids if quadrant[int(v)] == q]
        mask = np.isin(lab, members)
        sl = ndi.find_objects(mask.astype(np.int32))[0]
        local = np.zeros(lab.shape, np.int32)
        for k, v in enumerate(members, start=1):
            local[lab == v] = k
        extent = Box(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
        tiles.append((local[sl], extent, offset))
        offset += len(members)
    return tiles


def paint_slide(tiles: list[tuple[np.ndarray, Box, int]], scale: float, model_shape: tuple[int, int],
                shape: tuple[int, int], step: int) -> np.ndarray:
    """The whole level-0 image, block by block, each block reading only the tiles that
    intersect its model box (as ``pipeline.slide_run.blocks.write_blocks`` plans them)."""
    out = np.zeros(shape, np.uint32)
    for y0 in range(0, shape[0], step):
        for x0 in range(0, shape[1], step):
            block = Box(y0, x0, min(y0 + step, shape[0]), min(x0 + step, shape[1]))
            mbox = model_box(block, scale, model_shape)
            sources = [t for t in tiles if not t[1].intersect(mbox).is_empty()]
            out[block.slices()] = paint_block(block, scale, model_shape, shape, sources)
    return out


def global_ids(tiles: list[tuple[np.ndarray, Box, int]], model_shape: tuple[int, int]) -> np.ndarray:
    canvas = np.zeros(model_shape, np.int64)
    for labels, extent, offset in tiles:
        mask = labels > 0
        canvas[extent.slices()][mask] = labels[mask] + offset
    return canvas


def reference(lab: np.ndarray, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """The rule read literally, pixel by pixel: level-0 pixel y covers the model pixels
    with floor((m + 0.5) * scale) == y; a nucleus whose nearest-sampled image is not one
    4-connected piece lends its id to background pixels whose cover holds it (lowest id)."""
    near = nearest(lab, scale, shape)
    n = int(lab.max())
    split = {v for v, p in enumerate(pieces(near, n), start=1) if p != 1}
    owner_r = np.floor((np.arange(lab.shape[0]) + 0.5) * scale).astype(int)
    owner_c = np.floor((np.arange(lab.shape[1]) + 0.5) * scale).astype(int)
    out = near.astype(np.int64)
    for y in range(shape[0]):
        for x in range(shape[1]):
            if out[y, x]:
                continue
            cover = lab[np.ix_(owner_r == y, owner_c == x)]
            found = sorted(set(cover[cover > 0].tolist()) & split)
            if found:
                out[y, x] = found[0]
    return out


@pytest.mark.parametrize("scale", SCALES + [0.999999, 0.25, 0.1])
def test_cells_partition_the_model_pixels_around_the_nearest_samples(scale: float) -> None:
    model = 400
    h = math.floor(model * scale)
    bounds = cell_bounds(0, h, scale, model)
    near = block_rows(0, h, scale, model)
    assert (np.diff(bounds) > 0).all()  # no empty cell
    assert ((bounds[:-1] <= near) & (near < bounds[1:])).all()  # each holds its sample
    # the cells are the centre rule: floor((m + 0.5) * scale) == y
    owner = np.floor((np.arange(bounds[0], bounds[-1]) + 0.5) * scale).astype(int)
    np.testing.assert_array_equal(owner, np.repeat(np.arange(h), np.diff(bounds)))
    # a function of y alone: any split of the rows gives the same bounds
    for cut in (1, h // 3, h - 1):
        joined = np.concatenate([cell_bounds(0, cut, scale, model)[:-1], cell_bounds(cut, h, scale, model)])
        np.testing.assert_array_equal(joined, bounds)
    box = model_box(Box(0, 0, h, h), scale, (model, model))
    assert box == Box(int(bounds[0]), int(bounds[0]), int(bounds[-1]), int(bounds[-1]))
    with pytest.raises(ValueError):
        cell_bounds(0, 4, 1.0, 4)


@pytest.mark.parametrize("scale", SCALES)
def test_thin_nuclei_stay_in_one_piece(scale: float) -> None:
    lab = thin_nuclei()
    n = int(lab.max())
    shape = level0_shape(lab.shape, scale)
    before = nearest(lab, scale, shape)
    assert (pieces(before, n) != 1).any(), "nearest sampling should split some nucleus here"
    after = sample_labels(lab, scale, shape)
    assert (pieces(after, n) == 1).all(), pieces(after, n)
    # only background pixels change; nuclei that sampled into one piece are untouched
    changed = after != before
    assert (before[changed] == 0).all()
    whole = [v for v, p in enumerate(pieces(before, n), start=1) if p == 1]
    assert np.isin(after[changed], whole).sum() == 0
    np.testing.assert_array_equal(np.isin(after, whole), np.isin(before, whole))
    assert split_nuclei(lab, Box(0, 0, *lab.shape), scale, shape, lab.shape).tolist() == \
        [v for v in range(1, n + 1) if v not in whole]


@pytest.mark.parametrize("scale", SCALES)
def test_output_does_not_depend_on_blocks_or_tiles(scale: float) -> None:
    lab = thin_nuclei()
    shape = level0_shape(lab.shape, scale)
    whole = sample_labels(lab, scale, shape)
    tiles = as_tiles(lab, (60, 80))
    assert len(tiles) == 4
    canvas = global_ids(tiles, lab.shape)
    renumbered = sample_labels(canvas, scale, shape)  # the same nuclei, the tiles' global ids
    for step in (7, 16, 33, 64, max(shape)):
        painted = paint_slide(tiles, scale, lab.shape, shape, step)
        np.testing.assert_array_equal(painted, renumbered, err_msg=f"step {step}")
    pairs = np.unique(np.stack([whole.ravel(), renumbered.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))  # a renumbering


def worms(seed: int, shape: tuple[int, int] = (210, 230), n: int = 150) -> np.ndarray:
    """Random one- or two-pixel-wide 4-connected walks that touch and cross each other
    (later ones paint over earlier ones): crowded thin nuclei."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    for v in range(1, n + 1):
        y, x = (int(rng.integers(0, s)) for s in shape)
        width = int(rng.integers(1, 3))
        for _ in range(int(rng.integers(5, 40))):
            lab[y:y + width, x:x + width] = v
            if rng.random() < 0.5:
                y = int(np.clip(y + rng.choice((-1, 1)), 0, shape[0] - 1))
            else:
                x = int(np.clip(x + rng.choice((-1, 1)), 0, shape[1] - 1))
    return lab


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_the_rule_read_pixel_by_pixel(scale: float, seed: int) -> None:
    lab = worms(seed)
    shape = level0_shape(lab.shape, scale)
    expected = reference(lab, scale, shape)
    assert (expected != nearest(lab, scale, shape)).any()
    np.testing.assert_array_equal(sample_labels(lab, scale, shape), expected)
    # crowded worms may block each other, but bridging never makes things worse
    n = int(lab.max())
    assert (pieces(expected, n) != 1).sum() < (pieces(nearest(lab, scale, shape), n) != 1).sum()


def test_model_not_finer_than_level0_is_plain_nearest_sampling() -> None:
    lab = thin_nuclei()
    for scale in (1.0, 1.5, 2.0):
        shape = (math.floor(lab.shape[0] * scale), math.floor(lab.shape[1] * scale))
        np.testing.assert_array_equal(sample_labels(lab, scale, shape), nearest(lab, scale, shape))
        assert split_nuclei(lab, Box(0, 0, *lab.shape), scale, shape, lab.shape).size == 0
        assert (pieces(sample_labels(lab, scale, shape), int(lab.max())) == 1).all()


def test_split_nuclei_only_sees_the_slide() -> None:
    """A U whose bottom lies past the slide's last level-0 row is two pieces on the slide."""
    lab = np.zeros((12, 12), np.int32)
    lab[2:12, 3] = 1  # odd rows and columns: the samples at scale 0.5
    lab[2:12, 9] = 1
    lab[11, 3:10] = 1
    extent = Box(0, 0, 12, 12)
    assert split_nuclei(lab, extent, 0.5, (6, 6), (12, 12)).tolist() == []
    assert split_nuclei(lab, extent, 0.5, (5, 6), (12, 12)).tolist() == [1]


def test_evaluation_labels_like_the_pipeline() -> None:
    lab = thin_nuclei()
    shape = level0_shape(lab.shape, 0.5)
    up = upsample_labels(lab, 0.5, shape)
    assert up.dtype == lab.dtype
    np.testing.assert_array_equal(up, sample_labels(lab, 0.5, shape))
    assert (pieces(up, int(lab.max())) == 1).all()


def test_paint_block_counts_pixels_claimed_by_two_tiles() -> None:
    a = np.zeros((8, 8), np.int32)
    a[2:5, 2:5] = 1
    b = np.zeros((8, 8), np.int32)
    b[4:6, 4:6] = 1  # overlaps tile a's nucleus in one pixel (4, 4)
    collisions: list[int] = []
    paint_block(Box(0, 0, 8, 8), 1.0, (8, 8), (8, 8),
                [(a, Box(0, 0, 8, 8), 0), (b, Box(0, 0, 8, 8), 1)], collisions)
    assert sum(collisions) == 1
    collisions.clear()
    paint_block(Box(0, 0, 8, 8), 1.0, (8, 8), (8, 8), [(a, Box(0, 0, 8, 8), 0)], collisions)
    assert sum(collisions) == 0
