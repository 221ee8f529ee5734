"""The stitching guarantee: tiled instances == whole-image instances, each exactly once."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from models.config import WatershedParams
from models.targets import distance_map
from models.watershed import postprocess
from pipeline.stitch.grown import subwindow_predictor
from pipeline.stitch.tile import segment_tile
from pipeline.tiling import plan_tiles
from pipeline.types import Box

PARAMS = WatershedParams(fg_threshold=0.5, marker_threshold=0.5, min_marker_size=2, min_size=8)
MULTIPLE = 16


def synthetic_maps(shape: tuple[int, int], seed: int, n: int = 220) -> tuple[np.ndarray, np.ndarray]:
    """Probability and distance maps of discs: isolated, touching pairs, a long chain
    of touching nuclei (a cluster much larger than a tile halo) and a ring."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    next_id = 1

    def disc(cy: float, cx: float, r: float) -> None:
        nonlocal next_id
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = next_id
        next_id += 1

    for _ in range(n):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        r = rng.uniform(3, 9)
        disc(cy, cx, r)
        if rng.random() < 0.3:  # a touching neighbour
            a = rng.uniform(0, 2 * np.pi)
            disc(cy + 1.6 * r * np.sin(a), cx + 1.6 * r * np.cos(a), r * rng.uniform(0.7, 1.1))
    for i in range(40):  # a chain of touching nuclei across several tiles
        disc(shape[0] * 0.5 + 8 * np.sin(i / 3), 10 + i * 11.0, 7)
    for a in np.linspace(0, 2 * np.pi, 24, endpoint=False):  # a ring enclosing background
        disc(shape[0] * 0.25 + 45 * np.sin(a), shape[1] * 0.7 + 45 * np.cos(a), 7)
    mask = (labels > 0).astype(np.float32)
    prob = ndi.gaussian_filter(mask, 1.0) + rng.normal(0, 0.02, shape).astype(np.float32)
    dist = distance_map(labels) + rng.normal(0, 0.02, shape).astype(np.float32)
    return prob.astype(np.float32), dist.astype(np.float32)


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """A window of ``array``; outside the image the values are garbage on purpose (the
    stitcher must never use them)."""
    out = np.full(box.shape, 0.77, dtype=array.dtype)
    inter = box.intersect(Box(0, 0, *array.shape))
    if not inter.is_empty():
        out[inter.slices((box.y0, box.x0))] = array[inter.slices()]
    return out


def edge_garbage_predictor(prob: np.ndarray, dist: np.ndarray, margin: int, calls: list[Box]):
    """Like a network: exact in the window minus ``margin``, garbage in that ring."""

    def predict(box: Box) -> tuple[np.ndarray, np.ndarray]:
        calls.append(box)
        p, d = crop(prob, box), crop(dist, box)
        ring = np.ones(box.shape, bool)
        ring[margin:box.height - margin, margin:box.width - margin] = False
        p[ring], d[ring] = 0.93, 5.0
        return p, d

    return predict


def tiled(prob: np.ndarray, dist: np.ndarray, tile_size: int, halo: int,
          margin: int, max_side: int | None = None, edge_halo: int | None = None,
          calls: list[Box] | None = None, giants: list[Box] | None = None) -> tuple[np.ndarray, int]:
    """Tiled instances and the count of recomputed clusters; ``calls`` and ``giants``, when
    given, collect the predicted windows and the giant components the tiles met."""
    image = Box(0, 0, *prob.shape)
    calls = [] if calls is None else calls
    predict = edge_garbage_predictor(prob, dist, margin, calls)
    if max_side:
        predict = subwindow_predictor(predict, margin, MULTIPLE, max_side, image)
    out = np.zeros(prob.shape, dtype=np.int64)
    offset = recomputed = 0
    for tile in plan_tiles(prob.shape, tile_size, halo, MULTIPLE, edge_halo):
        result = segment_tile(tile.core, tile.window, crop(prob, tile.window), crop(dist, tile.window),
                              image, PARAMS, margin, MULTIPLE, predict)
        recomputed += result.recomputed
        if giants is not None:
            giants += result.giants
        region = result.extent.intersect(image)
        src = result.labels[region.slices((result.extent.y0, result.extent.x0))]
        dst = out[region.slices()]
        assert not (dst[src > 0] > 0).any(), "a pixel was claimed by two tiles"
        dst[src > 0] = src[src > 0] + offset
        offset += result.count
    return out, recomputed


def assert_same_instances(a: np.ndarray, b: np.ndarray) -> None:
    """Same partition into instances, up to id numbering."""
    assert ((a > 0) == (b > 0)).all(), "foreground differs"
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1], "one instance maps to several"
    assert len(np.unique(pairs[1])) == pairs.shape[1], "several instances merged"
    assert len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


@pytest.mark.parametrize("tile_size,halo,margin", [(64, 32, 16), (96, 48, 16), (160, 32, 16), (512, 64, 32)])
def test_tiled_equals_whole_image(tile_size: int, halo: int, margin: int) -> None:
    prob, dist = synthetic_maps((300, 470), seed=1)
    whole = postprocess(prob, dist, PARAMS)
    out, recomputed = tiled(prob, dist, tile_size, halo, margin)
    assert whole.max() > 150
    assert_same_instances(out, whole)
    if tile_size < 300:
        assert recomputed > 0, "the chain of nuclei should have needed a larger window"


def test_every_instance_exactly_once_with_offset_image() -> None:
    """An image whose size is not a multiple of the tile size, nuclei on every seam."""
    prob, dist = synthetic_maps((257, 333), seed=7, n=300)
    whole = postprocess(prob, dist, PARAMS)
    out, _ = tiled(prob, dist, 80, 32, 16)
    assert_same_instances(out, whole)
    assert len(np.unique(out)) - 1 == whole.max()


def test_subwindow_predictor_equals_one_window_inside_the_margin() -> None:
    prob, dist = synthetic_maps((300, 470), seed=3)
    margin = 16
    calls: list[Box] = []
    direct = edge_garbage_predictor(prob, dist, margin, [])
    pieces = subwindow_predictor(edge_garbage_predictor(prob, dist, margin, calls), margin,
                                 MULTIPLE, max_side=96)
    for window in (Box(-32, -48, 336, 512), Box(16, 32, 208, 160), Box(0, 0, 96, 96)):
        calls.clear()
        p1, d1 = direct(window)
        p2, d2 = pieces(window)
        inner = window.grow(-margin).slices((window.y0, window.x0))
        np.testing.assert_array_equal(p2[inner], p1[inner])
        np.testing.assert_array_equal(d2[inner], d1[inner])
        assert calls and max(max(b.height, b.width) for b in calls) <= 96
        assert all(b.y0 % MULTIPLE == 0 and b.x0 % MULTIPLE == 0 for b in calls)


def test_grown_clusters_in_pieces_still_equal_whole_image() -> None:
    """Clusters larger than a tile are recomputed on windows assembled from small pieces."""
    prob, dist = synthetic_maps((300, 470), seed=1)
    whole = postprocess(prob, dist, PARAMS)
    out, recomputed = tiled(prob, dist, 64, 32, 16, max_side=96)
    assert recomputed > 0
    assert_same_instances(out, whole)


@pytest.mark.parametrize("tile_size,halo,margin", [(64, 32, 16), (160, 48, 16), (512, 64, 32)])
def test_border_windows_trimmed_and_still_exact(tile_size: int, halo: int, margin: int) -> None:
    """Past the image border a window needs only the receptive-field margin, and the last
    row/column's window ends at its core (rounded to the grid): fewer pixels, same result."""
    shape = (300, 470)
    tiles = plan_tiles(shape, tile_size, halo, MULTIPLE, margin)
    full = plan_tiles(shape, tile_size, halo, MULTIPLE)
    assert sum(t.window.height * t.window.width for t in tiles) < sum(
        t.window.height * t.window.width for t in full)
    for t in tiles:
        assert t.window.y0 % MULTIPLE == 0 and t.window.x0 % MULTIPLE == 0
        assert t.window.height % MULTIPLE == 0 and t.window.width % MULTIPLE == 0
        assert t.window.grow(-margin).contains(t.core.y0, t.core.x0)
        assert t.window.y1 - margin >= t.core.y1 and t.window.x1 - margin >= t.core.x1
        if t.core.y1 == shape[0]:
            assert t.window.y1 == -(-shape[0] // MULTIPLE) * MULTIPLE + margin
        if t.core.x0 == 0:
            assert t.window.x0 == -margin
    prob, dist = synthetic_maps(shape, seed=1)
    whole = postprocess(prob, dist, PARAMS)
    out, _ = tiled(prob, dist, tile_size, halo, margin, edge_halo=margin)
    assert_same_instances(out, whole)


@pytest.mark.parametrize("max_window,tile_size,halo", [(160, 64, 32), (192, 96, 48), (256, 64, 32)])
def test_giant_components_dropped_the_same_by_every_tile(monkeypatch, max_window: int, tile_size: int,
                                                         halo: int) -> None:
    """With a tiny MAX_WINDOW the chain and the ring are giants: no tile segments them, so
    nothing is split, doubled or claimed twice; the rest equals whole-image processing,
    and no window ever exceeds MAX_WINDOW (checked before predicting)."""
    from pipeline.stitch import grown
    from pipeline.stitch.components import drop_giants

    monkeypatch.setattr(grown, "MAX_WINDOW", max_window)
    margin = 16
    prob, dist = synthetic_maps((300, 470), seed=1)
    whole = drop_giants(postprocess(prob, dist, PARAMS), prob, PARAMS, grown.giant_side(margin, MULTIPLE))
    assert (whole == 0).sum() > (postprocess(prob, dist, PARAMS) == 0).sum() + 1000, "no giant"
    calls: list[Box] = []
    giants: list[Box] = []
    out, _ = tiled(prob, dist, tile_size, halo, margin, calls=calls, giants=giants)
    assert giants
    assert max(max(b.height, b.width) for b in calls) <= max_window
    assert_same_instances(out, whole)


def test_a_seed_that_vanishes_in_a_grown_window_does_not_crash() -> None:
    """Outputs of windows of other shapes differ by ~1e-7: the seed pixel of a grown
    component may fall below threshold there; the component is found by its box."""
    from pipeline.stitch.grown import _seed_component

    comps = np.zeros((20, 20), np.int32)
    comps[5:10, 5:15] = 3
    comps[6, 6] = 0  # the seed pixel, now background
    assert _seed_component(comps, (6, 6), Box(5, 5, 10, 15), Box(0, 0, 20, 20)) == 3
    assert _seed_component(np.zeros((20, 20), np.int32), (6, 6), Box(5, 5, 10, 15), Box(0, 0, 20, 20)) == 0


@pytest.mark.parametrize("max_window", [None, 192])
def test_windows_planned_without_watershed_replay_the_live_segmentation(monkeypatch, max_window) -> None:
    """The GPU/CPU split: the inference worker grows every cluster a tile's segmentation
    will ask for (``predict_grown_windows``, no watershed), the CPU worker segments from
    that plan alone, after a pickle round trip (as Dask ships it). Per tile, both must give
    the live result (labels, probability, extent, counts, giants), the planned windows
    must be exactly the ones the live run predicts, and the slide must have grown
    clusters (and, with a small MAX_WINDOW, giants) to replay."""
    import pickle

    import pipeline.stitch.tile as stitch
    from pipeline.stitch import grown

    if max_window:
        monkeypatch.setattr(grown, "MAX_WINDOW", max_window)
    margin = 16
    prob, dist = synthetic_maps((300, 470), seed=1)
    image = Box(0, 0, *prob.shape)
    grown = giants = 0
    for tile in plan_tiles(prob.shape, 64, 32, MULTIPLE):
        p, d = crop(prob, tile.window), crop(dist, tile.window)
        live_calls: list[Box] = []
        live = stitch.segment_tile(tile.core, tile.window, p, d, image, PARAMS, margin, MULTIPLE,
                                   edge_garbage_predictor(prob, dist, margin, live_calls))
        planned = stitch.predict_grown_windows(tile.core, tile.window, p, d, image, PARAMS, margin,
                                               MULTIPLE, edge_garbage_predictor(prob, dist, margin, []))
        assert list(planned.windows) == live_calls
        shipped = pickle.loads(pickle.dumps(planned))
        replayed = stitch.segment_tile(tile.core, tile.window, p, d, image, PARAMS, margin, MULTIPLE, shipped)
        assert replayed.extent == live.extent and (replayed.labels == live.labels).all()
        assert (replayed.prob == live.prob).all()
        assert (replayed.recomputed, replayed.giants) == (live.recomputed, live.giants)
        grown += bool(planned)
        giants += len(live.giants)
    assert grown > 3
    assert (giants > 0) == bool(max_window)


def test_replay_refuses_a_cluster_that_was_not_grown() -> None:
    """A plan made for another tile (or none) is refused, never silently half-used."""
    from pipeline.stitch import tile as stitch
    from pipeline.stitch.grown import GrownPlan

    margin = 16
    prob, dist = synthetic_maps((300, 470), seed=1)
    image = Box(0, 0, *prob.shape)
    plans = []
    for tile in plan_tiles(prob.shape, 64, 32, MULTIPLE):
        p, d = crop(prob, tile.window), crop(dist, tile.window)
        plan = stitch.predict_grown_windows(tile.core, tile.window, p, d, image, PARAMS, margin,
                                            MULTIPLE, edge_garbage_predictor(prob, dist, margin, []))
        plans.append((tile, p, d, plan))
    (tile, p, d, plan), (_, _, _, other) = [entry for entry in plans if entry[3]][:2]
    with pytest.raises(RuntimeError, match="not grown on the inference worker"):
        stitch.segment_tile(tile.core, tile.window, p, d, image, PARAMS, margin, MULTIPLE, GrownPlan())
    with pytest.raises(RuntimeError, match="not grown on the inference worker"):
        stitch.segment_tile(tile.core, tile.window, p, d, image, PARAMS, margin, MULTIPLE, other)
    extra = GrownPlan(plan.clusters + other.clusters)
    with pytest.raises(RuntimeError, match="not asked for"):
        stitch.segment_tile(tile.core, tile.window, p, d, image, PARAMS, margin, MULTIPLE, extra)

def blob_maps(side: int, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One foreground disc far larger than a tile (a fold, a smear), with a few nuclei
    around it: probability, distance map and the disc's mask."""
    yy, xx = np.mgrid[:side, :side]
    disc = (yy - side / 2) ** 2 + (xx - side / 2 - 3) ** 2 <= radius**2
    labels = disc.astype(np.int32)
    for i, (cy, cx) in enumerate([(20, 20), (30, side - 25), (side - 22, 40)]):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = i + 2
    rng = np.random.default_rng(5)
    prob = ndi.gaussian_filter((labels > 0).astype(np.float32), 1.0) + rng.normal(0, 0.02, disc.shape)
    dist = distance_map(labels) + rng.normal(0, 0.02, disc.shape)
    return prob.astype(np.float32), dist.astype(np.float32), disc


def test_what_a_grown_cluster_sends_to_the_pool_is_bounded_by_the_tile() -> None:
    """The inference worker hands the CPU pool, per tile, what its segmentation reads of
    the grown windows: a tile that touches a large blob but does not own it gets a
    tile-sized answer (it shipped every grown window's full outputs, 8 bytes per window
    pixel, per tile: 1.7 GiB for a 7,000-px blob), and the owner gets the blob's own
    pixels (8 bytes each) and little more."""
    import pickle

    from pipeline.stitch import tile as stitch

    margin, side = 16, 480
    prob, dist, disc = blob_maps(side, radius=170)
    image = Box(0, 0, side, side)
    first = tuple(int(v) for v in np.argwhere(disc)[0])
    disc_px = int(disc.sum())
    grown = owners = 0
    for tile in plan_tiles(prob.shape, 64, 32, MULTIPLE):
        p, d = crop(prob, tile.window), crop(dist, tile.window)
        planned = stitch.predict_grown_windows(tile.core, tile.window, p, d, image, PARAMS, margin,
                                               MULTIPLE, edge_garbage_predictor(prob, dist, margin, []))
        if not planned:
            continue
        grown += 1
        sent = len(pickle.dumps(planned, protocol=pickle.HIGHEST_PROTOCOL))
        window_px = tile.window.height * tile.window.width
        if tile.core.contains(*first):
            owners += 1
            assert sent <= 8 * disc_px + 2 * window_px, (tile.index, sent, disc_px)
        else:
            assert sent <= window_px, (tile.index, sent, window_px)
    assert grown > 20 and owners == 1


def test_rivals_are_the_whole_image_instances_and_unknown_is_the_rest() -> None:
    """What a tile reports of the nuclei it does not own (for the cells it makes): each
    rival is exactly a whole-image instance, and every foreground pixel of the valid box
    that is neither owned nor a rival is marked unknown (never an instance taken for
    background)."""
    prob, dist = synthetic_maps((300, 340), seed=3)
    image = Box(0, 0, *prob.shape)
    whole = postprocess(prob, dist, PARAMS)
    margin, reach = 8, 9
    predict = edge_garbage_predictor(prob, dist, margin, [])
    seen_rivals = seen_unknown = 0
    for tile in plan_tiles(prob.shape, 96, 32, MULTIPLE):
        result = segment_tile(tile.core, tile.window, crop(prob, tile.window), crop(dist, tile.window),
                              image, PARAMS, margin, MULTIPLE, predict, rival_reach=reach)
        plain = segment_tile(tile.core, tile.window, crop(prob, tile.window), crop(dist, tile.window),
                             image, PARAMS, margin, MULTIPLE, predict)
        assert np.array_equal(result.labels, plain.labels) and result.extent == plain.extent
        rivals = result.rivals
        valid = rivals.valid
        truth = whole[valid.slices()]
        mine = np.zeros(valid.shape, bool)
        inter = valid.intersect(result.extent)
        mine[inter.slices((valid.y0, valid.x0))] = result.labels[inter.slices((result.extent.y0,
                                                                               result.extent.x0))] > 0
        r = rivals.labels
        assert not (r[mine] > 0).any() and not rivals.unknown[mine].any()
        for rid in np.unique(r[r > 0]):
            ids = np.unique(truth[r == rid])
            assert len(ids) == 1 and ids[0] > 0 and np.array_equal(truth == ids[0], r == rid)
        assert not (truth[(r == 0) & ~mine & ~rivals.unknown] > 0).any()
        seen_rivals += len(np.unique(r[r > 0]))
        seen_unknown += int(rivals.unknown.any())
    assert seen_rivals > 50 and seen_unknown > 5
