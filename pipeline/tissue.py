"""Tissue mask from a low-resolution level, so tiles on bare glass are never run.

H&E tissue is coloured (pink/purple) while glass is white or grey, so the mask thresholds
the HSV saturation with hysteresis: tissue is every pixel above SAT_FLOOR that is connected
to a pixel above Otsu's threshold clamped to [SAT_FLOOR, SAT_CEIL]. The floor keeps
white/grey background (and JPEG noise on it) out even on an all-white slide, where Otsu
would split noise; the ceiling keeps an all-tissue slide whole, where Otsu would split
the tissue itself; the hysteresis keeps pale, thin and loose stroma that touches stained
tissue (fibroblasts in loose strands sit at a saturation far below Otsu's, which splits
glass from dense tissue). Small specks (dust) and small holes (lumina, fat) are then
cleaned up.
Marker pen and dye are not tissue though saturated: pixels whose hue is green to cyan
(``PEN_HUE_DEG``, far from eosin's pink and haematoxylin's purple-blue) or that are nearly
black (``DARK_VALUE``: ink, dye, dirt) count as unsaturated (``tissue_signal``).

The mask is made at ~4 µm/px (a 10 µm strand of stroma still fills half a mask pixel;
slides longer than 16 mm get coarser masks, at most 4096 px long), from the coarsest pyramid level that is at
least that fine, box-averaged further: a gigapixel slide costs a few reads of its low
levels, never a level-0 pass.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from pipeline.overview import reduced_level
from pipeline.types import Box, SlideInfo

if TYPE_CHECKING:
    from pipeline.slide.reader import SlideReader

log = logging.getLogger(__name__)

TARGET_UM_PER_PX = 4.0  # mask resolution when the mpp is known
TARGET_WIDTH_PX = 2048  # mask width when it is not
MAX_MASK_SIDE = 4096  # huge slides get a coarser mask (18 µm/px for 75 mm)
SAT_FLOOR = 0.07
SAT_CEIL = 0.20
MIN_OBJECT_UM2 = 2_000.0  # ~45 x 45 µm: smaller bits are dust or debris
GROW_UM = 8.0  # nuclei and tiles are judged by the mask grown by this much (its coarse edge)
MIN_HOLE_UM2 = 10_000.0
PEN_HUE_DEG = (70.0, 200.0)  # green..cyan: marker pen, never H&E (pink ~330, purple ~280)
DARK_VALUE = 0.15  # HSV value below this (8 µm averages): ink, dye or dirt, not stained tissue
MIN_OBJECT_PX = 16  # the same in mask pixels when the mpp is unknown
MIN_HOLE_PX = 16


@dataclass
class TissueMask:
    """Boolean mask on a coarse grid: mask pixel (i, j) covers level-0
    [i*s, (i+1)*s) x [j*s, (j+1)*s), s = ``level0_per_pixel``."""

    mask: np.ndarray
    level0_per_pixel: float
    origin: tuple[int, int] = (0, 0)  # mask-pixel index of mask[0, 0] (crops: see ``crop``)
    grow: int = 1  # mask pixels by which ``contains`` and ``covers`` grow the mask
    _integral: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _grown: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.ndim != 2:
            raise ValueError(f"tissue mask must be 2-D, got {self.mask.shape}")
        if not self.level0_per_pixel > 0:
            raise ValueError(f"level0_per_pixel must be positive, got {self.level0_per_pixel}")

    def _dilated(self) -> np.ndarray:
        """The mask grown by ``grow`` pixels (8-neighbourhood): what tiles and nuclei are
        judged by, so that the mask's coarse border never cuts tissue off."""
        if self._grown is None:
            self._grown = ndimage.binary_dilation(self.mask, structure=np.ones((3, 3), bool),
                                                  iterations=self.grow)
        return self._grown

    def crop(self, box_level0: Box) -> TissueMask:
        """The part of the mask around a level-0 box (with the pixels its dilation needs),
        small enough to travel with a tile task; ``contains`` answers as the whole mask's
        for points inside the box."""
        s = self.level0_per_pixel
        h, w = self.mask.shape
        m = self.grow + 1
        y0 = min(h, max(0, math.floor(box_level0.y0 / s) - m - self.origin[0]))
        x0 = min(w, max(0, math.floor(box_level0.x0 / s) - m - self.origin[1]))
        y1 = max(y0, min(h, math.ceil(box_level0.y1 / s) + m - self.origin[0]))
        x1 = max(x0, min(w, math.ceil(box_level0.x1 / s) + m - self.origin[1]))
        part = TissueMask(self.mask[y0:y1, x0:x1], s, (self.origin[0] + y0, self.origin[1] + x0),
                          self.grow)
        part._grown = self._dilated()[y0:y1, x0:x1]  # exact, unlike re-dilating the crop
        return part

    def contains(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Whether level-0 points (pixel-index coordinates, as the table's centroids) lie
        on (dilated) tissue; points off the slide are not."""
        s = self.level0_per_pixel
        iy = np.floor((np.asarray(y, np.float64) + 0.5) / s).astype(np.int64) - self.origin[0]
        ix = np.floor((np.asarray(x, np.float64) + 0.5) / s).astype(np.int64) - self.origin[1]
        h, w = self.mask.shape
        inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
        out = np.zeros(iy.shape, bool)
        out[inside] = self._dilated()[iy[inside], ix[inside]]
        return out

    def _table(self) -> np.ndarray:
        """Summed-area table of the mask dilated by one pixel (8-neighbourhood), so that
        ``covers`` is O(1) per tile and tiles touching the mask border are kept."""
        if self._integral is None:
            dilated = self._dilated()
            # int32 counts are exact up to 2^31 mask pixels and halve the table (128 MiB
            # as int64 for a 4k x 4k mask, found by bench.scaling)
            dtype = np.int32 if dilated.size < 2**31 else np.int64
            table = np.zeros((dilated.shape[0] + 1, dilated.shape[1] + 1), dtype=dtype)
            table[1:, 1:] = dilated.cumsum(0, dtype=dtype).cumsum(1, dtype=dtype)
            self._integral = table
        return self._integral

    def covers(self, box_level0: Box) -> bool:
        """Whether any (dilated) tissue lies inside a level-0 box."""
        s = self.level0_per_pixel
        h, w = self.mask.shape
        oy, ox = self.origin
        y0 = max(0, math.floor(box_level0.y0 / s) - oy)
        x0 = max(0, math.floor(box_level0.x0 / s) - ox)
        y1 = min(h, math.ceil(box_level0.y1 / s) - oy)
        x1 = min(w, math.ceil(box_level0.x1 / s) - ox)
        if y1 <= y0 or x1 <= x0:
            return False
        t = self._table()
        return bool(t[y1, x1] - t[y0, x1] - t[y1, x0] + t[y0, x0] > 0)

    @property
    def fraction(self) -> float:
        """Share of mask pixels that are tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_um2(self, mpp: float) -> float:
        """Tissue area in µm² given the level-0 mpp."""
        return float(self.mask.sum()) * (self.level0_per_pixel * mpp) ** 2

    def __getstate__(self) -> dict[str, object]:
        return {"mask": self.mask, "level0_per_pixel": self.level0_per_pixel,
                "origin": self.origin, "grow": self.grow,
                "grown": self._grown if self.origin != (0, 0) else None}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.mask = state["mask"]  # type: ignore[assignment]
        self.level0_per_pixel = state["level0_per_pixel"]  # type: ignore[assignment]
        self.origin = tuple(state.get("origin", (0, 0)))  # type: ignore[assignment, arg-type]
        self.grow = int(state.get("grow", 1))  # type: ignore[call-overload]
        self._integral = None
        self._grown = state.get("grown")  # type: ignore[assignment]


def full_mask(info: SlideInfo) -> TissueMask:
    """Everything is tissue (``--no-tissue-mask``), on a grid of at most ~1k pixels."""
    step = 1
    while max(info.width, info.height) / step > 1024:
        step *= 2
    shape = (max(1, math.ceil(info.height / step)), max(1, math.ceil(info.width / step)))
    return TissueMask(np.ones(shape, dtype=bool), float(step))


def mask_resolution(info: SlideInfo, target_um_per_px: float = TARGET_UM_PER_PX,
                    target_width: int = TARGET_WIDTH_PX, max_side: int = MAX_MASK_SIDE) -> float:
    """Level-0 pixels per mask pixel wanted: ``target_um_per_px`` when the mpp is known,
    otherwise ``target_width`` pixels wide; coarser when the mask's long side would exceed
    ``max_side`` (a 75 mm slide gets ~18 µm/px: the mask stays a few MB)."""
    if info.mpp is not None:
        target = target_um_per_px / info.mpp
    else:
        target = info.width / target_width
    return max(1.0, target, max(info.width, info.height) / max_side)


def _saturation(mx: np.ndarray, mn: np.ndarray) -> np.ndarray:
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0).astype(np.float32)


def _hue(x: np.ndarray, mx: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) (0 where the pixel is grey), from RGB and its max/min."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return np.where(mx > mn, 60.0 * h, 0.0).astype(np.float32)


def tissue_signal(rgb: np.ndarray) -> np.ndarray:
    """Saturation, with marker pen (green-cyan hues) and near-black pixels set to 0
    (one max and one min per pixel serve saturation, hue and value)."""
    x = rgb[..., :3].astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]  # channel-wise: far faster than a reduce over 3
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    sat = _saturation(mx, mn)
    hue = _hue(x, mx, mn)
    pen = (hue >= PEN_HUE_DEG[0]) & (hue <= PEN_HUE_DEG[1]) & (sat > SAT_FLOOR)
    return np.where(pen | (mx < DARK_VALUE * 255.0), 0.0, sat).astype(np.float32)


def remove_small_components(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` without its 4-connected components of at most ``max_size`` pixels.

    (scikit-image renamed ``min_size`` to ``max_size`` with a shift by one in 0.26; this
    keeps one meaning for every supported version.)
    """
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    keep = sizes > max_size
    keep[0] = False
    return keep[labels]


def tissue_mask(reader: SlideReader, target_um_per_px: float = TARGET_UM_PER_PX,
                target_width: int = TARGET_WIDTH_PX, max_side: int = MAX_MASK_SIDE) -> TissueMask:
    """Tissue of a slide at about ``target_um_per_px`` (``target_width`` px wide when the
    slide has no mpp), at most ``max_side`` px long (see ``mask_resolution``)."""
    from skimage.filters import apply_hysteresis_threshold, threshold_otsu

    info = reader.info
    target = mask_resolution(info, target_um_per_px, target_width, max_side)
    sat, per_px = reduced_level(reader, target, max_side, tissue_signal)  # chunked reads
    sat = ndimage.uniform_filter(sat, size=3, mode="nearest")
    if float(sat.max() - sat.min()) > 1e-3:
        otsu = float(threshold_otsu(sat))
    else:
        otsu = SAT_FLOOR
    threshold = min(max(otsu, SAT_FLOOR), SAT_CEIL)
    # pale tissue connected to stained tissue ("> threshold" at both ends, as before)
    mask = apply_hysteresis_threshold(sat, SAT_FLOOR, threshold)
    grow = 1
    if info.mpp is not None:
        px_um2 = (per_px * info.mpp) ** 2
        min_object = max(1, int(MIN_OBJECT_UM2 / px_um2))
        min_hole = max(1, int(MIN_HOLE_UM2 / px_um2))
        grow = max(1, round(GROW_UM / (per_px * info.mpp)))
    else:
        min_object, min_hole = MIN_OBJECT_PX, MIN_HOLE_PX
    if mask.any():
        mask = remove_small_components(mask, min_object)  # dust, debris
        mask = ~remove_small_components(~mask, min_hole)  # small holes (as scikit-image)
    result = TissueMask(mask, float(per_px), grow=grow)
    log.info("%s: tissue %.1f %% of the slide (saturation threshold %.3f, Otsu %.3f, "
             "%.1f level-0 px per mask px)", info.path, 100 * result.fraction, threshold,
             otsu, per_px)
    return result


def keep_in_tissue(labels: np.ndarray, offset: tuple[int, int], scale: float,
                   tissue: TissueMask) -> tuple[np.ndarray, int]:
    """``labels`` (model pixels, local ids 1..n in raster order, crop at ``offset``) without
    the nuclei whose centroid lies off the tissue (keratin flakes, dye and debris on the
    glass), renumbered 1..k in the same order; and how many were dropped.

    Centroids map to level 0 as the table's do: ``(c + offset + 0.5) * scale - 0.5``. Each
    nucleus is judged alone, by its own pixels, so the result does not depend on tiling.
    """
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return labels, 0
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    count = np.bincount(ids, minlength=n + 1)[1:].astype(np.float64)
    cy = np.bincount(ids, weights=ys, minlength=n + 1)[1:] / np.maximum(count, 1)
    cx = np.bincount(ids, weights=xs, minlength=n + 1)[1:] / np.maximum(count, 1)
    keep = tissue.contains((cy + offset[0] + 0.5) * scale - 0.5, (cx + offset[1] + 0.5) * scale - 0.5)
    keep &= count > 0
    if keep.all():
        return labels, 0
    lut = np.zeros(n + 1, labels.dtype)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    return lut[labels], int(n - keep.sum())
