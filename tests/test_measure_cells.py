"""Cells grown from nuclei: the Voronoi split, the scaled-hull constraint, and tiled ==
whole image (a cell never depends on the tile seams)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.measure.cells import cell_margin, expand_nuclei


def nuclei_image(seed: int = 0, size: int = 300, n: int = 120) -> np.ndarray:
    """Disc and square nuclei on integer centres (many equidistant pixels: ties)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for i in range(1, n + 1):
        cy, cx = rng.integers(0, size, 2)
        r = int(rng.integers(2, 7))
        shape = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if i % 2 else (
            (abs(yy - cy) <= r) & (abs(xx - cx) <= r // 2 + 1))
        labels[shape & (labels == 0)] = i
    return labels


def test_cells_split_between_neighbours_and_keep_their_nuclei() -> None:
    nuclei = np.zeros((20, 41), np.int32)
    nuclei[10, 10] = 1
    nuclei[10, 30] = 2
    cells = expand_nuclei(nuclei, 15)
    assert (cells[nuclei > 0] == nuclei[nuclei > 0]).all()
    assert (cells[10, :20] == 1).all() and (cells[10, 21:] == 2).all()  # the bisector is x = 20
    assert cells[10, 0] == 1 and cells[0, 10] == 1  # 10 px away: inside the expansion
    far = expand_nuclei(nuclei, 5)
    assert far[10, 4] == 0 and far[10, 5] == 1


@pytest.mark.parametrize("expansion", [3.0, 7.5, 10.0])
def test_unconstrained_cells_equal_scikit_image_expand_labels(expansion: float) -> None:
    """Without a constraint a cell is scikit-image's ``expand_labels`` (the pixels within
    the distance, given to the nearest label), computed there from float distances."""
    from skimage.segmentation import expand_labels

    nuclei = nuclei_image(3, size=200, n=60)
    assert np.array_equal(expand_nuclei(nuclei, expansion), expand_labels(nuclei, expansion))


def test_scaled_hull_constraint_limits_cells() -> None:
    nuclei = np.zeros((60, 60), np.int32)
    nuclei[28:32, 20:40] = 1  # an elongated nucleus, 4 x 20 px
    free = expand_nuclei(nuclei, 10)
    capped = expand_nuclei(nuclei, 10, constrain_scale=1.5)
    # the hull of the pixel squares is rows 27.5..31.5, cols 19.5..39.5; 1.5x about its
    # centre (29.5, 29.5): rows 26.5..32.5, cols 14.5..44.5 (pixel centres inside it)
    assert free[30, 12] == 1 and free[20, 30] == 1
    assert capped[30, 12] == 0 and capped[30, 15] == 1 and capped[30, 44] == 1 and capped[30, 45] == 0
    assert capped[20, 30] == 0 and capped[27, 30] == 1 and capped[26, 30] == 0 and capped[32, 30] == 1
    assert (capped[nuclei > 0] == 1).all() and np.all((capped > 0) <= (free > 0))


@pytest.mark.parametrize("scale", [None, 1.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_tiled_cells_equal_whole_image_cells(seed: int, scale: float | None) -> None:
    nuclei = nuclei_image(seed)
    expansion = 10.0
    whole = expand_nuclei(nuclei, expansion, scale)
    margin = cell_margin(expansion, 14)  # nuclei are at most 13 px across
    tiled = np.zeros_like(whole)
    size = nuclei.shape[0]
    for y in range(0, size, 70):
        for x in range(0, size, 90):
            y0, x0 = max(0, y - margin), max(0, x - margin)
            y1, x1 = min(size, y + 70 + margin), min(size, x + 90 + margin)
            part = expand_nuclei(nuclei[y0:y1, x0:x1], expansion, scale)
            tiled[y:y + 70, x:x + 90] = part[y - y0:y - y0 + 70, x - x0:x - x0 + 90]
    assert np.array_equal(tiled, whole)
    assert (whole > 0).sum() > 2 * (nuclei > 0).sum()  # the cells did grow


@pytest.mark.parametrize("scale", [None, 1.5])
def test_only_some_cells_are_those_cells_of_all(scale: float | None) -> None:
    """``only``: the wanted cells exactly as when every cell is made (the others' hulls are
    not computed, and they are painted 0)."""
    nuclei = nuclei_image(2)
    every = expand_nuclei(nuclei, 10.0, scale)
    wanted = np.arange(3, 121, 4)
    some = expand_nuclei(nuclei, 10.0, scale, only=wanted)
    assert np.array_equal(some, np.where(np.isin(every, wanted), every, 0))
    assert (some > 0).sum() > 2 * np.isin(nuclei, wanted).sum()


def test_cell_features_reuse_the_nucleus_texts_exactly() -> None:
    """A cell's feature carries its nucleus's measurements as the tile task wrote them for
    the detection, renamed behind ``Nucleus: `` (``Detection probability`` unprefixed): the
    same text as formatting every nucleus measurement again, byte for byte."""
    import json

    from pipeline.measure.stain import StainVectors
    from pipeline.writers.cells import CELL_CLASS, NUCLEUS, cell_features, cell_measurements
    from pipeline.writers.features import feature_bodies, geometry_text
    from pipeline.writers.outlines import trace_tile
    from pipeline.writers.table import MEASUREMENT_COLUMNS, PROBABILITY, instance_measurements

    nuclei = nuclei_image(2, size=160, n=40)
    rng = np.random.default_rng(2)
    rgb = rng.integers(40, 250, (*nuclei.shape, 3)).astype(np.uint8)
    prob = rng.uniform(0.5, 1.0, nuclei.shape).astype(np.float32)
    stains, offset, mpp = StainVectors(), (32, 48), 0.5
    table = instance_measurements(nuclei, prob, offset, 1.0, mpp, outlines=trace_tile(nuclei, offset, 1.0),
                                  rgb=rgb, stains=stains)
    nucleus_columns = {k: table[k].to_numpy() for k in table}
    nucleus_bodies = feature_bodies(trace_tile(nuclei, offset, 1.0).polygons, nucleus_columns)
    cells = expand_nuclei(nuclei, 5.0)
    columns, polygons = cell_measurements(cells, nuclei, rgb, offset, 1.0, mpp, (0.0, 0.0), stains,
                                          nucleus_columns)
    reused = cell_features(polygons, columns, nucleus_bodies)
    again = {(n if n == PROBABILITY else NUCLEUS + n): nucleus_columns[n] for n in MEASUREMENT_COLUMNS}
    expected = feature_bodies(polygons, {**again, **columns}, CELL_CLASS,
                              nucleus_geometries=[geometry_text(b) for b in nucleus_bodies])
    assert len(reused) == len(np.unique(nuclei)) - 1 and reused == expected
    first = json.loads('{"type":"Feature",' + reused[0] + '"Nucleus id":1.0}}}')
    assert first["properties"]["objectType"] == "cell" and PROBABILITY in first["properties"]["measurements"]
    assert "Nucleus: Area µm^2" in first["properties"]["measurements"]
