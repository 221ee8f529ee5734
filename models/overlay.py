"""Pictures of truth beside prediction, to look at what a model misses.

Left: the image with the true nuclei outlined (green), those no prediction matches at
IoU > 0.5 (what recall counts as missed) tinted red. Right: the same image with the
predicted nuclei outlined (yellow), those that match no true nucleus tinted magenta.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from models.metrics import Overlap, matched_ids

TRUE_RGB = (0, 220, 0)
MISSED_RGB = (255, 0, 0)
PRED_RGB = (255, 230, 0)
FALSE_RGB = (255, 0, 255)
GAP_PX = 8


def _draw(image: np.ndarray, labels: np.ndarray, unmatched: np.ndarray, line: tuple,
          tint: tuple) -> np.ndarray:
    out = image.astype(np.float32).copy()
    lut = np.zeros(int(labels.max()) + 1, bool)
    lut[unmatched] = True
    lut[0] = False
    tinted = lut[labels]
    out[tinted] = 0.55 * out[tinted] + 0.45 * np.asarray(tint, np.float32)
    out[find_boundaries(labels, mode="inner")] = line
    return out.astype(np.uint8)


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, 2W + gap, 3) uint8: truth (missed in red) | prediction (unmatched in magenta)."""
    t_ids, p_ids = matched_ids(Overlap.of(truth, pred))
    missed = np.setdiff1d(np.unique(truth[truth > 0]), t_ids)
    false = np.setdiff1d(np.unique(pred[pred > 0]), p_ids)
    left = _draw(image, truth, missed, TRUE_RGB, MISSED_RGB)
    right = _draw(image, pred, false, PRED_RGB, FALSE_RGB)
    gap = np.full((image.shape[0], GAP_PX, 3), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def save_overlay(path: str | Path, image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(overlay(image[..., :3], truth, pred)).save(tmp)
    tmp.replace(path)  # atomic: never a half-written picture
    return path
