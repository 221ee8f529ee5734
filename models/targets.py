"""Training targets from instance-label maps (uint, 0 = background).

Pure NumPy/SciPy so that they are cheap to test on hand-made label maps.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from models.config import DistanceNorm


def semantic_mask(labels: np.ndarray) -> np.ndarray:
    """Nucleus (1) vs background (0) as float32."""
    return (labels > 0).astype(np.float32)


def instance_distance(labels: np.ndarray) -> np.ndarray:
    """Euclidean distance of every nucleus pixel to the border of *its own* nucleus.

    Computed per instance, so touching nuclei get separate peaks (the pixel-wise max over
    nuclei of the authors' MATLAB code). A pixel at the image border counts as inside,
    i.e. the border is not treated as background: a nucleus cut by the border keeps its
    off-image part implicit rather than getting a false edge.
    """
    out = np.zeros(labels.shape, dtype=np.float32)
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        # pad by one pixel of background inside the image, replicate at the image edge
        lo = [max(s.start - 1, 0) for s in box]
        hi = [min(s.stop + 1, n) for s, n in zip(box, labels.shape)]
        crop = labels[lo[0]:hi[0], lo[1]:hi[1]] == index
        pad = [(int(s.start - 1 < 0), int(s.stop + 1 > n)) for s, n in zip(box, labels.shape)]
        padded = np.pad(crop, pad, mode="edge")
        dist = ndi.distance_transform_edt(padded)
        dist = dist[pad[0][0]:dist.shape[0] - pad[0][1], pad[1][0]:dist.shape[1] - pad[1][1]]
        region = out[lo[0]:hi[0], lo[1]:hi[1]]
        region[crop] = dist[crop]
    return out


def distance_map(labels: np.ndarray, norm: DistanceNorm = "per_nucleus") -> np.ndarray:
    """Normalised distance map in [0, 1].

    ``per_nucleus``: each nucleus divided by its own maximum, so every nucleus peaks at 1
    whatever its size and whatever else is in the image (tiling-invariant).
    ``per_image``: divided by the image maximum, as in the authors' code; the value of a
    nucleus then depends on the largest nucleus in the same image.
    """
    dist = instance_distance(labels)
    if norm == "per_image":
        peak = dist.max()
        return dist / peak if peak > 0 else dist
    if norm != "per_nucleus":
        raise ValueError(f"unknown distance normalisation {norm!r}")
    n = int(labels.max())
    if n == 0:
        return dist
    peaks = ndi.maximum(dist, labels, index=np.arange(1, n + 1))
    lut = np.zeros(n + 1, dtype=np.float32)
    lut[1:] = np.where(np.asarray(peaks) > 0, 1.0 / np.maximum(peaks, 1e-6), 0.0)
    return dist * lut[labels]
