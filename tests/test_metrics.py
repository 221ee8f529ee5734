"""Segmentation scores on hand-computed cases, against a naive reference, and for speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from models.metrics import Overlap, aji, detection_scores, dice, instance_scores, panoptic_quality


def box(shape: tuple[int, int], *regions: tuple[int, int, int, int]) -> np.ndarray:
    """Label map with rectangles (y0, y1, x0, x1) numbered 1, 2, ... in order."""
    out = np.zeros(shape, dtype=np.int32)
    for i, (y0, y1, x0, x1) in enumerate(regions, start=1):
        out[y0:y1, x0:x1] = i
    return out


def test_one_nucleus_overlapping() -> None:
    true = box((4, 8), (0, 2, 0, 2))  # area 4
    pred = box((4, 8), (0, 2, 0, 3))  # area 6, contains the truth: IoU 4/6
    assert aji(true, pred) == pytest.approx(4 / 6)
    assert panoptic_quality(true, pred) == pytest.approx((2 / 3, 1.0, 2 / 3))
    assert detection_scores(true, pred) == pytest.approx((1.0, 1.0, 1.0))
    assert dice(pred, true) == pytest.approx(2 * 4 / 10)


def test_hit_miss_and_false_positive() -> None:
    true = box((4, 8), (0, 2, 0, 2), (0, 2, 4, 6))  # G1, G2 (missed)
    pred = box((4, 8), (0, 2, 0, 3), (3, 4, 0, 4))  # P1 on G1, P2 nowhere near truth
    # AJI: G1-P1 I=4 U=6; G2 unmatched U+=4; P2 unused U+=4
    assert aji(true, pred) == pytest.approx(4 / 14)
    pq, dq, sq = panoptic_quality(true, pred)
    assert dq == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert sq == pytest.approx(2 / 3) and pq == pytest.approx(1 / 3)
    assert detection_scores(true, pred) == pytest.approx((0.5, 0.5, 0.5))
    assert dice(pred, true) == pytest.approx(2 * 4 / (10 + 8))


def test_merge_counts_the_prediction_twice_in_aji() -> None:
    true = box((2, 4), (0, 2, 0, 2), (0, 2, 2, 4))
    pred = box((2, 4), (0, 2, 0, 4))  # one prediction over both: IoU 0.5 each
    assert aji(true, pred) == pytest.approx((4 + 4) / (8 + 8))
    assert panoptic_quality(true, pred) == (0.0, 0.0, 0.0)  # 0.5 is not > 0.5
    assert detection_scores(true, pred) == (0.0, 0.0, 0.0)
    # below 0.5 matches must still be one-to-one: one of the two truths is found
    assert detection_scores(true, pred, iou=0.3) == pytest.approx((1.0, 0.5, 2 / 3))
    assert dice(pred, true) == 1.0


def test_split_adds_the_unused_piece_to_the_aji_union() -> None:
    true = box((2, 4), (0, 2, 0, 4))  # area 8
    pred = box((2, 4), (0, 2, 0, 3), (0, 2, 3, 4))  # 6 + 2
    assert aji(true, pred) == pytest.approx(6 / (8 + 2))
    assert panoptic_quality(true, pred) == pytest.approx((0.75 * 2 / 3, 2 / 3, 0.75))
    precision, recall, f1 = detection_scores(true, pred)
    assert (precision, recall, f1) == pytest.approx((0.5, 1.0, 2 / 3))


def test_aji_takes_max_iou_not_max_intersection() -> None:
    true = box((4, 20), (0, 4, 0, 4))  # 16
    pred = np.zeros((4, 20), dtype=np.int32)
    pred[0:4, 0:13] = 2  # I=10, U=52: the larger intersection, the smaller IoU
    pred[0:3, 0:2] = 1  # I=6, U=16: chosen
    assert aji(true, pred) == pytest.approx(6 / (16 + 46))


def test_perfect_prediction_scores_one_whatever_the_ids() -> None:
    rng = np.random.default_rng(0)
    true, _ = ndi.label(rng.random((40, 50)) > 0.6)
    pred = np.where(true > 0, true.astype(np.int64) * 7919 + 10**9, 0)  # huge, sparse ids
    scores = instance_scores(true, pred)
    rates = {"split_rate", "merge_rate"}
    assert set(scores) == {"dice", "aji", "pq", "dq", "sq", "precision", "recall", "f1"} | rates
    assert all(v == pytest.approx(0.0 if k in rates else 1.0) for k, v in scores.items())


def test_empty_cases() -> None:
    empty = np.zeros((5, 5), dtype=np.int32)
    one = box((5, 5), (1, 3, 1, 3))
    assert all(v == (0.0 if k.endswith("_rate") else 1.0)
               for k, v in instance_scores(empty, empty).items())
    for true, pred in ((empty, one), (one, empty)):
        scores = instance_scores(true, pred)
        assert all(v == 0.0 for v in scores.values()), scores
    with pytest.raises(ValueError, match="differ"):
        aji(empty, np.zeros((5, 6), dtype=np.int32))


def test_split_and_merge_rates_count_pieces_of_a_fifth_or_more() -> None:
    true = np.zeros((20, 40), dtype=np.int32)
    true[0:10, 0:10] = 1  # cut in two halves by the prediction: split
    true[0:10, 12:22] = 2  # a 5 % sliver of another prediction: not split
    true[12:20, 0:8] = 3  # fused with nucleus 4 by one prediction: merged
    true[12:20, 8:16] = 4
    pred = np.zeros_like(true)
    pred[0:10, 0:5], pred[0:10, 5:10] = 1, 2
    pred[0:10, 12:22], pred[0:5, 21:22] = 3, 4
    pred[12:20, 0:16] = 5
    split, merge = Overlap.of(true, pred).split_merge()
    assert split == pytest.approx(1 / 4)
    assert merge == pytest.approx(1 / 5)


def reference_aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Kumar et al. 2017, literally: loops over nuclei."""
    inter = union = 0
    used: set[int] = set()
    for g in np.unique(true[true > 0]):
        gm = true == g
        best, best_iou = 0, -1.0
        for s in np.unique(pred[pred > 0]):
            sm = pred == s
            iou = (gm & sm).sum() / (gm | sm).sum()
            if iou > best_iou:
                best, best_iou = s, iou
        if best_iou > 0:
            sm = pred == best
            inter += (gm & sm).sum()
            union += (gm | sm).sum()
            used.add(int(best))
        else:
            union += gm.sum()
    for s in np.unique(pred[pred > 0]):
        if int(s) not in used:
            union += (pred == s).sum()
    return inter / union


def reference_pq(true: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    tp, iou_sum = 0, 0.0
    ts, ps = np.unique(true[true > 0]), np.unique(pred[pred > 0])
    for g in ts:
        for s in ps:
            iou = ((true == g) & (pred == s)).sum() / ((true == g) | (pred == s)).sum()
            if iou > 0.5:
                tp += 1
                iou_sum += iou
    fp, fn = len(ps) - tp, len(ts) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0
    return dq * sq, dq, sq


@pytest.mark.parametrize("seed", range(4))
def test_against_naive_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    true, _ = ndi.label(ndi.binary_opening(rng.random((30, 40)) > 0.45))
    noisy = ndi.binary_opening(rng.random((30, 40)) > 0.4) | ((true > 0) & (rng.random((30, 40)) > 0.3))
    pred, _ = ndi.label(noisy)
    assert true.max() > 5 and pred.max() > 5
    assert aji(true, pred) == pytest.approx(reference_aji(true, pred))
    assert panoptic_quality(true, pred) == pytest.approx(reference_pq(true, pred))


def test_without_pred_equals_relabelling() -> None:
    rng = np.random.default_rng(1)
    true, _ = ndi.label(rng.random((30, 30)) > 0.5)
    pred, n = ndi.label(rng.random((30, 30)) > 0.5)
    drop = np.zeros(n + 1, dtype=bool)
    drop[1::3] = True
    table = Overlap.of(true, pred).without_pred(drop)
    direct = Overlap.of(true, np.where(drop[pred], 0, pred))
    assert table.scores() == pytest.approx(direct.scores())


def test_1000x1000_with_1000_nuclei_is_fast() -> None:
    rng = np.random.default_rng(0)
    seeds = np.zeros((1000, 1000), dtype=np.int32)
    cy, cx = rng.integers(0, 1000, size=(2, 1000))
    seeds[cy, cx] = np.arange(1, 1001)
    true = ndi.grey_dilation(seeds, footprint=np.ones((13, 13), bool))
    pred = np.roll(ndi.grey_dilation(seeds, footprint=np.ones((11, 11), bool)), 2, axis=1)
    start = time.perf_counter()
    scores = instance_scores(true, pred)
    elapsed = time.perf_counter() - start
    assert 0.3 < scores["aji"] < 1.0
    assert elapsed < 2.0, f"scoring took {elapsed:.2f} s"


def test_overlay_marks_missed_and_false_nuclei(tmp_path) -> None:
    from PIL import Image

    from models.overlay import FALSE_RGB, GAP_PX, MISSED_RGB, save_overlay

    truth = np.zeros((30, 40), np.int32)
    truth[2:10, 2:10], truth[15:25, 15:25] = 1, 2  # 2 is missed
    pred = np.zeros_like(truth)
    pred[2:10, 2:10], pred[2:8, 30:38] = 5, 6  # 6 matches nothing
    image = np.full((30, 40, 3), 200, np.uint8)
    out = np.asarray(Image.open(save_overlay(tmp_path / "a" / "x.png", image, truth, pred)))
    assert out.shape == (30, 80 + GAP_PX, 3)
    left, right = out[:, :40].astype(int), out[:, 40 + GAP_PX:].astype(int)
    tinted = (0.55 * 200 + 0.45 * np.array(MISSED_RGB)).astype(int)
    assert (left[20, 20] == tinted).all() and (left[5, 5] == 200).all()
    assert (right[5, 34] == (0.55 * 200 + 0.45 * np.array(FALSE_RGB)).astype(int)).all()
    assert (right[5, 5] == 200).all()
