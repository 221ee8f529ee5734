"""Training targets on hand-made label maps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from models.targets import distance_map, instance_distance, semantic_mask


def two_touching_squares() -> np.ndarray:
    """Two 5x5 nuclei sharing an edge (no background between them)."""
    labels = np.zeros((9, 14), dtype=np.uint32)
    labels[2:7, 2:7] = 1
    labels[2:7, 7:12] = 2
    return labels


def test_semantic_mask() -> None:
    labels = two_touching_squares()
    mask = semantic_mask(labels)
    assert mask.dtype == np.float32
    assert mask.sum() == 50 and set(np.unique(mask)) == {0.0, 1.0}


def test_touching_nuclei_get_separate_peaks_of_one() -> None:
    labels = two_touching_squares()
    dist = distance_map(labels, "per_nucleus")
    # each 5x5 square: distance 3 at the centre, 1 on its rim (also on the shared edge)
    assert dist[4, 4] == pytest.approx(1.0) and dist[4, 9] == pytest.approx(1.0)
    assert dist[4, 6] == pytest.approx(1 / 3) and dist[4, 7] == pytest.approx(1 / 3)
    # exactly two regional maxima, one per nucleus
    peaks = (dist == ndi.maximum_filter(dist, size=3)) & (dist > 0.99)
    _, n = ndi.label(peaks)
    assert n == 2
    assert dist[labels == 0].max() == 0


def test_distance_is_per_instance_not_of_the_union() -> None:
    """The union's distance transform would peak on the shared edge; ours must not."""
    labels = two_touching_squares()
    raw = instance_distance(labels)
    union = ndi.distance_transform_edt(labels > 0)
    assert union[4, 6] > raw[4, 6]
    assert raw[4, 6] == 1.0


def test_nucleus_at_the_image_border_is_not_cut_by_it() -> None:
    """The image edge is not background: a nucleus cut by it keeps growing towards it."""
    labels = np.zeros((8, 9), dtype=np.uint32)
    labels[0:4, 2:7] = 1  # touches the top edge, 5 wide, 4 tall
    raw = instance_distance(labels)
    # distance to the side/bottom background only: top row counts as inside
    assert raw[0, 4] == 3.0  # 3 to the left/right background, top edge ignored
    assert raw[3, 4] == 1.0  # bottom rim
    assert raw[0, 2] == 1.0  # left rim
    dist = distance_map(labels)
    assert dist.max() == pytest.approx(1.0)
    assert dist[0, 4] == pytest.approx(1.0)


def test_one_pixel_nucleus() -> None:
    labels = np.zeros((5, 5), dtype=np.uint32)
    labels[2, 2] = 7
    assert instance_distance(labels)[2, 2] == 1.0
    for norm in ("per_nucleus", "per_image"):
        dist = distance_map(labels, norm)
        assert dist[2, 2] == pytest.approx(1.0)
        assert dist.sum() == pytest.approx(1.0)


def test_per_image_vs_per_nucleus() -> None:
    labels = np.zeros((20, 30), dtype=np.uint32)
    labels[2:13, 2:13] = 1  # 11x11: peak distance 6
    labels[4:7, 20:23] = 2  # 3x3: peak distance 2
    raw = instance_distance(labels)
    assert raw[labels == 1].max() == 6 and raw[labels == 2].max() == 2
    per_nucleus = distance_map(labels, "per_nucleus")
    per_image = distance_map(labels, "per_image")
    assert per_nucleus[labels == 1].max() == pytest.approx(1.0)
    assert per_nucleus[labels == 2].max() == pytest.approx(1.0)
    assert per_image[labels == 1].max() == pytest.approx(1.0)
    assert per_image[labels == 2].max() == pytest.approx(2 / 6)
    np.testing.assert_allclose(per_image, raw / 6, rtol=1e-6)
    # the per-nucleus value of a nucleus does not depend on the other nuclei
    alone = labels.copy()
    alone[labels == 1] = 0
    np.testing.assert_allclose(distance_map(alone)[labels == 2], per_nucleus[labels == 2])


def test_empty_and_unknown_norm() -> None:
    empty = np.zeros((4, 4), dtype=np.uint32)
    assert not distance_map(empty).any() and not distance_map(empty, "per_image").any()
    with pytest.raises(ValueError, match="unknown distance normalisation"):
        distance_map(empty, "per_cell")  # type: ignore[arg-type]


def test_non_consecutive_ids() -> None:
    labels = np.zeros((10, 10), dtype=np.uint32)
    labels[1:4, 1:4] = 5
    labels[6:9, 6:9] = 40
    dist = distance_map(labels)
    assert dist[2, 2] == pytest.approx(1.0) and dist[7, 7] == pytest.approx(1.0)
