"""Quick-look PNG: the slide thumbnail with nucleus outlines and the tissue contour.

Why: a pathologist (or a failing-run post-mortem) should see in one glance whether the
segmentation covers the tissue, without opening QuPath or napari. The label thumbnail must
be made by *striding* (nearest), never by averaging, so each pixel is a real label value.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from pipeline.atomic import atomic_path

log = logging.getLogger(__name__)

__all__ = ["NUCLEUS_RGB", "PREVIEW_SIDE", "TISSUE_RGB", "write_preview"]

PREVIEW_SIDE = 2048  # px, the preview's long side (at most)

NUCLEUS_RGB = (0, 255, 0)  # green: visible on pink/purple H&E
TISSUE_RGB = (0, 90, 255)  # blue tissue contour


def _fit(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to ``shape`` (labels stay labels)."""
    if image.shape == shape:
        return image
    log.debug("preview: resampling %s to %s", image.shape, shape)
    iy = np.minimum(((np.arange(shape[0]) + 0.5) * image.shape[0] / shape[0]).astype(int), image.shape[0] - 1)
    ix = np.minimum(((np.arange(shape[1]) + 0.5) * image.shape[1] / shape[1]).astype(int), image.shape[1] - 1)
    return image[np.ix_(iy, ix)]


def write_preview(
    path: str | os.PathLike[str],
    thumbnail_rgb: np.ndarray,
    labels_thumb: np.ndarray,
    tissue_mask_thumb: np.ndarray | None,
) -> None:
    """Write ``path`` (PNG, atomic): thumbnail + nucleus outlines + tissue contour.

    ``labels_thumb`` and ``tissue_mask_thumb`` are resampled (nearest) to the thumbnail
    size if they differ by rounding. Outlines use ``find_boundaries(mode="inner")`` so
    they sit on the nucleus pixels; the tissue contour is two pixels wide to stay visible.
    """
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"thumbnail must be (H, W, 3|4), got {rgb.shape}")
    out = np.ascontiguousarray(rgb[..., :3]).astype(np.uint8, copy=True)
    shape = out.shape[:2]
    if tissue_mask_thumb is not None:
        tissue = _fit(np.asarray(tissue_mask_thumb) != 0, shape)
        edge = find_boundaries(tissue, mode="inner")
        out[ndi.binary_dilation(edge) & tissue] = TISSUE_RGB
    labels = _fit(np.asarray(labels_thumb), shape)
    out[find_boundaries(labels, mode="inner")] = NUCLEUS_RGB
    with atomic_path(path) as tmp:
        Image.fromarray(out).save(tmp, format="PNG")
    log.info("preview %s (%dx%d)", path, shape[1], shape[0])
