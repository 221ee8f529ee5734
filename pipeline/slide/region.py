"""The read plan of a slide for a model, and region reads at model resolution.

``read_region`` turns a model-pixel box into RGB pixels such that a model pixel's value does
not depend on the box it was read with (bit-identical overlaps); the exact stitcher relies
on it. Out-of-image pixels mirror the image (``numpy`` ``reflect``).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.errors import MissingMppError
from pipeline.slide.reader import SlideReader
from pipeline.types import Box, Level, ReadPlan, SlideInfo

# A slide at most this much coarser than the model is upsampled (a 10x scan for a 40x model);
# coarser ones are refused: beyond it nuclei are a few pixels wide, and a wrong pixel size
# (a 72-dpi TIFF tag: 352.8 µm/px) would otherwise plan hundreds of thousands of tiles.
MAX_UPSAMPLE = 4.0
SCREEN_DPI = (72, 96, 150, 300, 600)  # resolution-tag defaults of image editors, not scanners


def plan_read(info: SlideInfo, model_mpp: float) -> ReadPlan:
    """Level to read and model-pixel image size for a model trained at ``model_mpp``.

    The level is the coarsest one whose downsample (``nominal_downsample``) does not
    exceed the scale (0.1 % tolerance for vendor downsamples such as 4.0003), so the
    model never sees upsampled pixels beyond that tolerance.
    """
    if info.mpp is None:
        raise MissingMppError(f"{info.path}: the slide has no pixel size (mpp); pass --mpp "
                              "with the level-0 micrometres per pixel")
    if not model_mpp > 0:
        raise ValueError(f"model mpp must be positive, got {model_mpp}")
    scale = model_mpp / info.mpp
    if scale < 1 / MAX_UPSAMPLE:
        raise MissingMppError(_too_coarse(info, model_mpp))
    nominal = [nominal_downsample(info, i) for i in range(len(info.levels))]
    level = 0
    for i, ds in enumerate(nominal):
        if ds <= scale * (1 + 1e-3) and ds >= nominal[level]:
            level = i
    shape = (max(1, math.ceil(info.height / scale - 1e-9)),
             max(1, math.ceil(info.width / scale - 1e-9)))
    return ReadPlan(level=level, level_downsample=nominal[level],
                    scale=float(scale), mpp=float(model_mpp), shape=shape)


def _too_coarse(info: SlideInfo, model_mpp: float) -> str:
    """Why a slide this coarse is refused, and what to do (a pathologist reads this)."""
    assert info.mpp is not None
    text = (f"{info.path}: {info.mpp:.4g} µm per pixel is {info.mpp / model_mpp:.1f}x coarser than "
            f"the model's {model_mpp:g} µm/px (at most {MAX_UPSAMPLE:g}x is segmented: nuclei "
            f"are a few pixels wide there)")
    dpi = 25400 / info.mpp
    if round(dpi) in SCREEN_DPI and abs(dpi - round(dpi)) < 0.01:
        text += (f"; the file's resolution tag says {round(dpi)} dpi, an image editor's default "
                 "rather than a scanner's")
    return text + "; if the pixel size is wrong, pass the true one with --mpp"


def nominal_downsample(info: SlideInfo, level: int) -> float:
    """The integer downsample k of a level whose size is level 0's divided by k and
    rounded (either way); otherwise the reported one.

    Readers report dimension ratios (OpenSlide averages width and height ratios: 4.016
    for a 75 x 62 level of 300 x 250), but such a level's pixel j covers level-0
    [j*k, (j+1)*k): using k keeps residuals integer and reads exact.
    """
    lv = info.levels[level]
    k = max(1, int(round(lv.downsample)))
    fits = (lv.width in (info.width // k, -(-info.width // k))
            and lv.height in (info.height // k, -(-info.height // k)))
    return float(k) if fits else float(lv.downsample)


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """``numpy`` ``reflect`` padding as an index map: -k -> k, n-1+k -> n-1-k (any k)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    k = np.mod(idx, period)
    return np.where(k >= n, period - k, k)


def _residual(plan: ReadPlan) -> tuple[float, int | None]:
    """Resampling factor level -> model, and its integer value when it is one in effect
    (the drift over the whole image stays below half a model pixel)."""
    r = plan.scale / plan.level_downsample
    k = int(round(r))
    if k >= 1 and abs(r - k) * max(plan.shape) < 0.5:
        return r, k
    return r, None


def read_region(reader: SlideReader, plan: ReadPlan, box: Box) -> np.ndarray:
    """RGB uint8 ``(box.height, box.width, 3)`` at model resolution for a model-pixel box
    that may reach outside the image (mirrored there).

    Every model pixel is a fixed function of fixed source pixels (global index maps), so
    overlapping boxes agree bit for bit: residual 1 copies, integer residual k averages the
    k x k source pixels, other residuals sample level coordinate (i + 0.5) * r - 0.5
    bilinearly (source indices clamped to the level).
    """
    if box.is_empty():
        raise ValueError(f"empty box {box}")
    H, W = plan.shape
    lv = reader.info.levels[plan.level]
    r, k = _residual(plan)
    if k == 1 and box.y0 >= 0 and box.x0 >= 0 and box.y1 <= min(H, lv.height) \
            and box.x1 <= min(W, lv.width):
        return reader.read_level(plan.level, box)  # hot path: a plain read
    rows = reflect_index(np.arange(box.y0, box.y1), H)
    cols = reflect_index(np.arange(box.x0, box.x1), W)
    r0, c0 = int(rows.min()), int(cols.min())
    hull = Box(r0, c0, int(rows.max()) + 1, int(cols.max()) + 1)
    if k is not None:
        image = _read_integer(reader, plan.level, hull, k, lv)
    else:
        image = _read_bilinear(reader, plan.level, hull, r, lv)
    return np.ascontiguousarray(image[np.ix_(rows - r0, cols - c0)])


def _read_integer(reader: SlideReader, level: int, hull: Box, k: int, lv: Level) -> np.ndarray:
    """Model pixels of ``hull``: mean of level pixels [i*k, (i+1)*k) (indices clamped)."""
    ys = np.clip(np.arange(hull.y0 * k, hull.y1 * k), 0, lv.height - 1)
    xs = np.clip(np.arange(hull.x0 * k, hull.x1 * k), 0, lv.width - 1)
    src_box = Box(int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1)
    src = reader.read_level(level, src_box)
    if src.shape[:2] != (len(ys), len(xs)):  # clamped indices at the level's far edges
        src = src[np.ix_(ys - src_box.y0, xs - src_box.x0)]
    if k == 1:
        return src
    s = src.reshape(hull.height, k, hull.width, k, 3).astype(np.uint32).sum(axis=(1, 3))
    n = k * k
    return ((s + n // 2) // n).astype(np.uint8)


def _axis_weights(start: int, stop: int, r: float, n: int) -> tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """Bilinear source indices (clamped) and weight of the second one, per model index."""
    c = (np.arange(start, stop, dtype=np.float64) + 0.5) * r - 0.5
    i0 = np.floor(c)
    f = c - i0
    i0 = i0.astype(np.int64)
    return np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1), f


def _read_bilinear(reader: SlideReader, level: int, hull: Box, r: float, lv: Level) -> np.ndarray:
    """Model pixels of ``hull`` sampled bilinearly at (i + 0.5) * r - 0.5 of the level."""
    y0, y1, fy = _axis_weights(hull.y0, hull.y1, r, lv.height)
    x0, x1, fx = _axis_weights(hull.x0, hull.x1, r, lv.width)
    src_box = Box(int(y0.min()), int(x0.min()), int(y1.max()) + 1, int(x1.max()) + 1)
    # float32 halves memory; still the same operations on the same inputs for each pixel
    src = reader.read_level(level, src_box).astype(np.float32)
    y0, y1 = y0 - src_box.y0, y1 - src_box.y0
    x0, x1 = x0 - src_box.x0, x1 - src_box.x0
    fy = fy.astype(np.float32)[:, None, None]
    fx = fx.astype(np.float32)[None, :, None]
    # rows first, then columns: the same operations in the same order for every pixel
    top = src[y0]
    bottom = src[y1]
    rowmix = top * (np.float32(1) - fy) + bottom * fy
    out = rowmix[:, x0] * (np.float32(1) - fx) + rowmix[:, x1] * fx
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
