"""The marker watershed and its decomposition contract (docs/design.md)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from models.config import WatershedParams
from models.targets import distance_map
from models.watershed import find_markers, foreground_components, postprocess, split_components

PARAMS = WatershedParams(fg_threshold=0.5, marker_threshold=0.5, min_marker_size=2, min_size=5)
EIGHT = np.ones((3, 3), dtype=bool)


def discs(shape: tuple[int, int], centres: list[tuple[float, float, float]]) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i, (cy, cx, r) in enumerate(centres, start=1):
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels == 0)] = i
    return labels


def maps(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ideal network outputs for a label map."""
    return (labels > 0).astype(np.float32) * 0.9, distance_map(labels)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Same instances up to id numbering."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return (len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1])))


def test_two_touching_discs_give_two_instances() -> None:
    truth = discs((40, 50), [(20, 15, 9), (20, 31, 8)])
    assert ndi.label(truth > 0)[1] == 1  # one foreground component
    out = postprocess(*maps(truth), PARAMS)
    assert out.dtype == np.int32 and out.max() == 2
    for t in (1, 2):
        p = np.bincount(out[truth == t]).argmax()
        iou = ((out == p) & (truth == t)).sum() / ((out == p) | (truth == t)).sum()
        assert p > 0 and iou > 0.9
    # every component pixel is assigned (8-connected flooding)
    assert np.array_equal(out > 0, truth > 0)


def test_component_without_markers_is_one_instance() -> None:
    truth = discs((40, 50), [(20, 15, 9), (20, 31, 8)])
    prob, _ = maps(truth)
    flat = np.where(truth > 0, 0.3, 0.0).astype(np.float32)  # below marker_threshold
    out = postprocess(prob, flat, PARAMS)
    assert out.max() == 1 and np.array_equal(out > 0, truth > 0)
    # a marker smaller than min_marker_size does not count either
    flat[20, 15] = 0.9
    assert postprocess(prob, flat, PARAMS).max() == 1
    flat[20, 31] = 0.9
    assert postprocess(prob, flat, PARAMS).max() == 1  # two 1-pixel markers, both dropped
    assert postprocess(prob, flat, WatershedParams(min_marker_size=1, min_size=5)).max() == 2


def test_a_single_marker_keeps_the_whole_component() -> None:
    truth = discs((40, 50), [(20, 15, 9), (20, 31, 8)])
    prob, dist = maps(truth)
    dist[truth == 2] = 0.2  # only the first disc has a marker
    out = postprocess(prob, dist, PARAMS)
    assert out.max() == 1 and np.array_equal(out > 0, truth > 0)


def test_find_markers_drops_small_parts() -> None:
    dist = np.zeros((10, 10), dtype=np.float32)
    dist[1:3, 1:3] = 0.9  # 4 px
    dist[6, 6] = 0.9  # 1 px
    markers, n = find_markers(dist, np.ones_like(dist, dtype=bool), PARAMS)
    assert n == 1 and markers[1, 1] == 1 and markers[6, 6] == 0
    _, n = find_markers(dist, dist < 0.5, PARAMS)  # markers only inside the foreground
    assert n == 0


def test_min_size_removes_small_instances() -> None:
    truth = discs((30, 40), [(10, 10, 5), (20, 30, 1.5)])  # areas 81 and 9
    prob, dist = maps(truth)
    big = postprocess(prob, dist, WatershedParams(min_marker_size=1, min_size=10))
    assert big.max() == 1 and np.array_equal(big > 0, truth == 1)
    both = postprocess(prob, dist, WatershedParams(min_marker_size=1, min_size=9))
    assert both.max() == 2
    assert not postprocess(prob, dist, WatershedParams(min_marker_size=1, min_size=82)).any()


def test_ids_are_in_raster_order_of_first_pixel() -> None:
    rng = np.random.default_rng(3)
    truth = discs((80, 90), [(rng.uniform(0, 80), rng.uniform(0, 90), rng.uniform(3, 7))
                             for _ in range(25)])
    out = postprocess(*maps(truth), PARAMS)
    ids, first = np.unique(out.ravel(), return_index=True)
    assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, out.max() + 1))
    assert np.all(np.diff(first[1:]) > 0)


def test_instance_is_reduced_to_its_largest_4_connected_part() -> None:
    prob = np.zeros((12, 12), dtype=np.float32)
    prob[0:5, 0:5] = 0.9
    prob[5:8, 5:8] = 0.9  # touches the big block only diagonally: one 8-connected component
    dist = np.zeros_like(prob)  # no markers: one instance
    comps, n = foreground_components(prob, PARAMS)
    assert n == 1
    out = postprocess(prob, dist, WatershedParams(min_size=1))
    assert out.max() == 1
    assert np.array_equal(out > 0, np.pad(np.ones((5, 5), bool), ((0, 7), (0, 7))))


def test_flooding_is_8_connected() -> None:
    """A block attached only diagonally is flooded from a marker of its component, and
    can then be the largest 4-connected part of that instance."""
    prob = np.zeros((30, 30), dtype=np.float32)
    prob[2:8, 2:14] = 0.9  # block A, 6x12
    prob[8:18, 14:24] = 0.9  # block B, 10x10, touches A only at a corner
    dist = np.where(prob > 0, 0.2, 0.0).astype(np.float32)
    dist[4:6, 3:5] = 0.9  # marker at the left end of A
    dist[4:6, 11:13] = 0.9  # marker at the right end of A
    out = postprocess(prob, dist, WatershedParams(min_marker_size=2, min_size=5))
    block_b = np.zeros_like(prob, dtype=bool)
    block_b[8:18, 14:24] = True
    assert out.max() == 2
    assert np.unique(out[block_b]).size == 1 and out[block_b][0] > 0
    assert out[5, 3] > 0 and out[5, 3] != out[10, 20]


def ring(shape: tuple[int, int], cy: float, cx: float, r_out: float, r_in: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    return (d2 <= r_out**2) & (d2 > r_in**2)


def test_instance_holes_are_filled_only_when_empty() -> None:
    shape = (40, 70)
    prob = np.zeros(shape, dtype=np.float32)
    prob[ring(shape, 20, 18, 12, 5)] = 0.9  # empty hole: filled
    prob[ring(shape, 20, 50, 12, 5)] = 0.9
    prob[19:22, 49:52] = 0.9  # a speck of foreground inside the second hole: stays open
    dist = np.zeros(shape, dtype=np.float32)
    dist[ring(shape, 20, 18, 10, 7)] = 0.9
    dist[ring(shape, 20, 50, 10, 7)] = 0.9
    out = postprocess(prob, dist, WatershedParams(min_marker_size=2, min_size=5))
    filled = ndi.binary_fill_holes(ring(shape, 20, 18, 12, 5))
    first = out[20, 6]
    assert np.array_equal(out == first, filled)
    second = out[20, 38]
    assert second != first and out[20, 45] == 0  # background between speck and ring
    assert np.array_equal(out == second, ring(shape, 20, 50, 12, 5))
    assert out[20, 50] not in (0, first, second)  # the speck is its own nucleus


def test_a_ring_of_nuclei_does_not_swallow_the_lumen() -> None:
    centres = [(30 + 18 * np.sin(a), 30 + 18 * np.cos(a), 6)
               for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)]
    truth = discs((60, 60), centres)
    prob, dist = maps(truth)
    assert ndi.label(truth > 0, structure=EIGHT)[1] == 1
    out = postprocess(prob, dist, PARAMS)
    assert out[30, 30] == 0 and out.max() == 12


def random_maps(shape: tuple[int, int], seed: int, quantize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Noisy blob maps with touching clusters, rings with and without islands; quantized
    distances create plateaus (ties) in the watershed."""
    rng = np.random.default_rng(seed)
    centres = []
    for _ in range(40):
        cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(3, 8)
        centres.append((cy, cx, r))
        for _ in range(int(rng.integers(0, 3))):
            a = rng.uniform(0, 2 * np.pi)
            centres.append((cy + 1.5 * r * np.sin(a), cx + 1.5 * r * np.cos(a), r * 0.9))
    truth = discs(shape, centres)
    prob = ndi.gaussian_filter((truth > 0).astype(np.float32), 1.0)
    prob += rng.normal(0, 0.05, shape).astype(np.float32)
    for cy, cx in rng.uniform(15, min(shape) - 15, size=(3, 2)):
        prob[ring(shape, cy, cx, 11, 5)] = 0.9
        if rng.random() < 0.5:
            prob[int(cy), int(cx)] = 0.9  # island inside the ring
    gain = rng.uniform(0.6, 1.8, size=int(truth.max()) + 1)  # uneven peak heights
    dist = distance_map(truth) * gain[truth] + rng.normal(0, 0.08, shape).astype(np.float32)
    if quantize:
        dist = np.round(dist * 4) / 4
    return prob.astype(np.float32), dist.astype(np.float32)


@pytest.mark.parametrize("seed,quantize", [(0, False), (1, True), (2, True), (3, False)])
def test_decomposition_crop_gives_same_instances(seed: int, quantize: bool) -> None:
    """Any crop that contains a whole component (with margin) gives that component the
    same instances as the whole image: what the tile stitcher relies on."""
    prob, dist = random_maps((120, 150), seed, quantize)
    params = WatershedParams(fg_threshold=0.5, marker_threshold=0.5, min_marker_size=3,
                             min_size=6)
    whole = postprocess(prob, dist, params)
    comps, n = foreground_components(prob, params)
    assert n > 10
    rng = np.random.default_rng(seed)
    checked = 0
    for cid, box in enumerate(ndi.find_objects(comps), start=1):
        lo = [max(s.start - int(rng.integers(1, 12)), 0) for s in box]
        hi = [min(s.stop + int(rng.integers(1, 12)), dim) for s, dim in zip(box, comps.shape)]
        window = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
        part = postprocess(prob[window], dist[window], params)
        inside = comps[window] == cid
        assert same_partition(np.where(inside, part, 0), np.where(inside, whole[window], 0)), cid
        # an instance of this component never leaves the component (holes are its own)
        ids = np.unique(part[inside])
        ids = ids[ids > 0]
        assert np.array_equal(np.isin(part, ids), np.isin(whole[window], np.unique(
            whole[window][inside & (whole[window] > 0)])))
        checked += 1
    assert checked == n


def test_split_components_on_a_subset() -> None:
    """The stitcher passes only the components it owns: same instances for those."""
    prob, dist = random_maps((100, 120), 5, False)
    whole = postprocess(prob, dist, PARAMS)
    comps, n = foreground_components(prob, PARAMS)
    keep = np.arange(1, n + 1)[::2]
    subset = np.where(np.isin(comps, keep), comps, 0)
    out = split_components(dist, subset, PARAMS, prob=prob)
    region = np.isin(whole, np.unique(whole[(subset > 0) & (whole > 0)]))
    assert same_partition(out, np.where(region, whole, 0))


def test_left_out_island_keeps_the_hole_open_only_with_prob() -> None:
    shape = (30, 30)
    prob = np.zeros(shape, dtype=np.float32)
    prob[ring(shape, 15, 15, 10, 4)] = 0.9
    prob[14:17, 14:17] = 0.9  # island: a separate component in the hole
    dist = np.where(prob > 0, 0.2, 0.0).astype(np.float32)  # no markers
    comps, n = foreground_components(prob, PARAMS)
    assert n == 2
    ring_only = np.where(comps == comps[15, 5], comps, 0)
    with_prob = split_components(dist, ring_only, PARAMS, prob=prob)
    assert with_prob[15, 15] == 0 and with_prob[15, 12] == 0  # hole stays open
    without = split_components(dist, ring_only, PARAMS)
    assert without[15, 15] == 1  # documented: foreground taken from the given components


def test_empty_and_shape_errors() -> None:
    zeros = np.zeros((8, 8), dtype=np.float32)
    out = postprocess(zeros, zeros, PARAMS)
    assert out.dtype == np.int32 and not out.any()
    with pytest.raises(ValueError, match="differ"):
        postprocess(zeros, np.zeros((8, 9), dtype=np.float32), PARAMS)


def test_large_image_is_fast() -> None:
    """1000x1000 with ~1000 nuclei: vectorised, well under a few seconds on one core."""
    import time

    rng = np.random.default_rng(0)
    labels = np.zeros((1000, 1000), dtype=np.int32)
    cy, cx = rng.integers(0, 1000, size=(2, 1100))
    labels[cy, cx] = np.arange(1, 1101)
    labels = ndi.grey_dilation(labels, footprint=np.ones((11, 11), bool))
    prob, dist = maps(labels)
    start = time.perf_counter()
    out = postprocess(prob, dist, PARAMS)
    elapsed = time.perf_counter() - start
    assert out.max() > 700
    assert elapsed < 3.0, f"postprocess took {elapsed:.2f} s"


def test_fill_holes_equals_scipy() -> None:
    """The watershed's hole filling is ``ndi.binary_fill_holes``, exactly, on random masks
    of every density and shape (one row or column, all foreground, all background)."""
    from scipy import ndimage as ndi

    from models.watershed import fill_holes

    rng = np.random.default_rng(3)
    masks = [np.zeros((5, 7), bool), np.ones((5, 7), bool), np.ones((1, 9), bool), np.zeros((9, 1), bool)]
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        masks.append(rng.random((h, w)) < rng.uniform(0.1, 0.9))
    for m in masks:
        assert np.array_equal(fill_holes(m), ndi.binary_fill_holes(m))
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    assert fill_holes(ring)[4, 4] and not fill_holes(ring)[0, 0]
