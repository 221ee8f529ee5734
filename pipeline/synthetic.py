"""Synthetic H&E images and slides with known nucleus truth (tests, demo, benchmarks).

Why synthetic: the pipeline's hard guarantees (exact stitching, box-invariant reads,
resumable writes, throughput on gigapixel slides) are about geometry and bookkeeping, not
about the model. They need images whose truth is known exactly, of any size, generated in
seconds and never stored. MoNuSeg tiles give realism; ``monuseg_mosaic`` lays them out as a
small "slide" so that evaluation on a slide can be compared with evaluation per tile.

Rendering model (shared by :func:`synthetic_he` and :func:`synthetic_region`):

* Colours are made in optical-density space (Beer–Lambert): ``OD = cH * H + cE * E + b``
  (haematoxylin vector of Ruifrok & Johnston, eosin of Macenko's reference, see
  ``E_STAIN``), ``RGB = 255 * 10**-OD``. So nuclei and
  stroma have the hue relations of real H&E and colour-deconvolution code behaves as on
  real slides.
* Nuclei centres come from a hashed grid of cells (16 µm, 64 px at 0.25 µm/px); each
  cell's random generator is seeded from ``(seed, cell_y, cell_x)``, so the nuclei of any
  region are known without generating the rest of the slide. Cells hold single nuclei and
  sometimes a cluster whose members are placed touching (slightly overlapping) each other.
* Nuclei are painted in the order of a per-nucleus random priority (later wins). A nucleus
  is dropped (neither painted nor in the truth) if the largest connected part of its
  ellipse left uncovered by the nuclei above it is < 30 % of the ellipse; because this test
  uses *all* higher nuclei, it depends only on the nucleus' neighbours, never on the region
  asked for, and every kept nucleus keeps >= 30 % of its ellipse visible, as one
  4-connected region (slivers cut off by a nucleus on top are painted as stroma). Truth
  labels are exactly the painted nucleus pixels.
* Stroma texture and tissue/background fields are hashed value noise and sinusoids, pixel
  noise comes from fixed random tables indexed by ``(y mod p, x mod p)``; the Gaussian
  blur is applied with a margin. Hence ``synthetic_region`` gives bit-identical pixels and
  labels for a pixel whatever box it is read with (and ``synthetic_he`` renders its
  per-pixel fields in row strips, for speed, with the same exactness).
* Nucleus sizes follow MoNuSeg at 0.25 µm/px (equivalent radius median 3.2 µm, 95th
  percentile 5.2 µm), not textbook 3–9 µm radii, because the images feed the model trained
  on MoNuSeg; sizes are given in µm and converted with ``mpp``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.synthetic_noise import noise_tables, pixel_noise, value_noise_grid, value_noise_points
from pipeline.synthetic_nuclei import MAX_ASPECT, RADIUS_RANGE_UM, nuclei_for, paint_nuclei
from pipeline.types import Box

log = logging.getLogger(__name__)

__all__ = ["monuseg_mosaic", "synthetic_he", "synthetic_region", "synthetic_region_labels",
           "synthetic_region_with_labels", "H_STAIN", "E_STAIN"]

# Stain optical-density vectors (unit length): haematoxylin from Ruifrok & Johnston; eosin
# from Macenko's reference matrix, because Ruifrok's eosin (0.07, 0.99, 0.11) absorbs only
# green and renders magenta, whereas real (e.g. MoNuSeg) stroma is red-pink.
H_STAIN = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E_STAIN = np.array([0.2159, 0.8012, 0.5581]) / np.linalg.norm([0.2159, 0.8012, 0.5581])
BACKGROUND_OD = np.array([0.035, 0.045, 0.03])  # glass + mounting medium: near white

BLUR_SIGMA = 0.7
BLUR_MARGIN = 4
TISSUE_EDGE = 0.04  # width of the tissue/background transition in tissue-field units
MAX_DENSITY = 3.0  # beyond, cells run out of per-cell ids (16) and nuclei mostly cover each other


# ----------------------------------------------------------------- composition

STRIP_ROWS = 256  # per-pixel work in row strips: temporaries stay in cache (4096²: 6.6 -> 3.5 s CPU)
TissueAt = Callable[[np.ndarray, np.ndarray], np.ndarray]
TissueGrid = Callable[[Box], np.ndarray]


def _stain_strip(sub: Box, idx: np.ndarray, rad: np.ndarray, tissue: np.ndarray, dark_lut: np.ndarray,
                 *, seed: int, mpp: float, edge: float) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin concentrations (float32) of the pixels of ``sub``, before blur.

    Every term is a pure function of the absolute pixel coordinates (value noise,
    sinusoids) and of the painted nucleus maps, so any strip or box gives the same values.
    """
    is_nuc = idx > 0
    # tissue alpha and stroma eosin / haematoxylin
    alpha = np.where(is_nuc, np.float32(1), np.clip(tissue / edge, 0.0, 1.0).astype(np.float32))
    fib = value_noise_grid(sub, 6.0 / (mpp / 0.25) * 1.0, seed * 7 + 1)
    coarse = value_noise_grid(sub, 40.0 * 0.25 / mpp, seed * 7 + 2)
    streak = value_noise_grid(sub, 14.0 * 0.25 / mpp, seed * 7 + 3)
    ys = np.arange(sub.y0, sub.y1, dtype=np.float32)[:, None]
    xs = np.arange(sub.x0, sub.x1, dtype=np.float32)[None, :]
    phase = (seed % 97) * 0.37
    wave = np.sin((xs * 0.045 + ys * 0.02) * (0.25 / mpp) + 6.0 * streak + phase)
    eosin = (0.16 + 0.2 * coarse + 0.07 * fib + 0.07 * wave * (coarse > 0.45)).astype(np.float32)
    hema = (0.03 + 0.03 * fib).astype(np.float32)
    # nuclei: haematoxylin from per-nucleus darkness, chromatin texture, darker rim
    dark = dark_lut[idx]
    chrom = value_noise_grid(sub, 2.5 * 0.25 / mpp, seed * 7 + 4)
    rim = np.clip((rad - 0.62) / 0.38, 0, 1) ** 2
    nuc_h = dark * (0.65 + 0.6 * chrom) * (1.0 + 0.45 * rim) + 0.08
    nuc_e = 0.16 + 0.1 * coarse
    hema = np.where(is_nuc, nuc_h, hema)
    eosin = np.where(is_nuc, nuc_e, eosin)
    return hema * alpha, eosin * alpha


def _colour_strip(sub: Box, conc_h: np.ndarray, conc_e: np.ndarray, tables: list[np.ndarray],
                  out: np.ndarray) -> None:
    """Beer–Lambert: optical density of the stains + glass + pixel noise -> uint8 RGB in ``out``."""
    grain = pixel_noise(sub, tables, 0) * np.float32(0.018)
    for ch in range(3):
        od = (conc_h * np.float32(H_STAIN[ch]) + conc_e * np.float32(E_STAIN[ch])
              + np.float32(BACKGROUND_OD[ch]) + grain
              + pixel_noise(sub, tables, ch + 1) * np.float32(0.012))
        val = 255.0 * np.power(np.float32(10.0), -od)
        out[..., ch] = np.clip(val + 0.5, 0, 255).astype(np.uint8)


def _render(box: Box, *, seed: int, mpp: float, tissue_grid: TissueGrid, tissue_at: TissueAt,
            edge: float = TISSUE_EDGE, density: float = 1.0,
            blur: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB of ``box``, its painting-index map (int32, 0 = no nucleus, i + 1 = i-th painted
    nucleus) and the global ids of the painted nuclei (uint32, index i).

    ``tissue_grid(box)`` is the tissue field (> 0 = tissue) on any box and
    ``tissue_at(ys, xs)`` the same field at points (where nuclei may exist); ``edge`` is the
    width of the tissue/glass transition in field units (a few pixels, as a real section
    edge). Nuclei are painted once on a domain that holds every nucleus reaching the box
    and everything that can cover it; the per-pixel fields and the colour are computed in
    row strips (fast: temporaries of a strip stay in cache; exact: all fields are pure
    functions of absolute coordinates).
    """
    m = BLUR_MARGIN if blur else 0
    dom = box.grow(m)
    # visibility (and so the set of kept nuclei) is box-independent: see paint_nuclei
    amax = RADIUS_RANGE_UM[1] * math.sqrt(MAX_ASPECT) / mpp
    paint_dom = dom.grow(2 * int(math.ceil(amax + 1)) + 2)
    nuc = nuclei_for(paint_dom, seed, mpp, density)
    # nuclei only where there is tissue (decided at the centre, box-independently)
    if len(nuc):
        nuc = nuc.take(np.nonzero(tissue_at(nuc.cy, nuc.cx) > edge)[0])
    idx_big, rad_big, nuc = paint_nuclei(paint_dom, nuc)
    inner = dom.slices((paint_dom.y0, paint_dom.x0))
    idx, rad = idx_big[inner], rad_big[inner]
    dark_lut = np.concatenate([[0.0], nuc.hematoxylin]).astype(np.float32)

    conc_h = np.empty(dom.shape, np.float32)
    conc_e = np.empty(dom.shape, np.float32)
    for r0 in range(0, dom.height, STRIP_ROWS):
        r1 = min(r0 + STRIP_ROWS, dom.height)
        sub = Box(dom.y0 + r0, dom.x0, dom.y0 + r1, dom.x1)
        conc_h[r0:r1], conc_e[r0:r1] = _stain_strip(sub, idx[r0:r1], rad[r0:r1], tissue_grid(sub), dark_lut,
                                                    seed=seed, mpp=mpp, edge=edge)
    if blur:
        truncate = BLUR_MARGIN / BLUR_SIGMA - 0.01
        conc_h = ndimage.gaussian_filter(conc_h, BLUR_SIGMA, truncate=truncate)
        conc_e = ndimage.gaussian_filter(conc_e, BLUR_SIGMA, truncate=truncate)

    tables = noise_tables(seed)
    rgb = np.empty(box.shape + (3,), np.uint8)
    for r0 in range(0, box.height, STRIP_ROWS):
        r1 = min(r0 + STRIP_ROWS, box.height)
        sub = Box(box.y0 + r0, box.x0, box.y0 + r1, box.x1)
        sl = sub.slices((dom.y0, dom.x0))
        _colour_strip(sub, conc_h[sl], conc_e[sl], tables, rgb[r0:r1])
    return rgb, idx[box.slices((dom.y0, dom.x0))], nuc.gid


def _check_common(mpp: float, density: float, tissue_fraction: float | None) -> None:
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be positive, got {mpp}")
    if not (0 <= density <= MAX_DENSITY):
        raise ValueError(f"density must be in [0, {MAX_DENSITY}], got {density}")
    if tissue_fraction is not None and not (0 <= tissue_fraction <= 1):
        raise ValueError(f"tissue_fraction must be in [0, 1], got {tissue_fraction}")



def _field_offset(samples: np.ndarray, tissue_fraction: float | None, edge: float) -> float:
    """Level to subtract from a tissue field so that ``tissue_fraction`` of ``samples``
    lie above it (0.0 for None: the generator's own field)."""
    if tissue_fraction is None:
        return 0.0
    if tissue_fraction >= 1:
        return float(samples.min()) - 2.0 * edge - 1.0  # everything saturated tissue
    if tissue_fraction <= 0:
        return float(samples.max()) + 2.0 * edge + 1.0
    return float(np.quantile(samples, 1.0 - tissue_fraction))


def _shifted(at: TissueAt, grid: TissueGrid, offset: float) -> tuple[TissueAt, TissueGrid]:
    if offset == 0.0:
        return at, grid
    off32 = np.float32(offset)
    return (lambda ys, xs: at(ys, xs) - offset), (lambda box: grid(box) - off32)


def _image_tissue(height: int, width: int, seed: int) -> tuple[TissueAt, TissueGrid]:
    """Tissue field of a finite image: an irregular blob covering most of the image,
    touching its edges, with background in (some) corners."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x7155])
    cy, cx = height * rng.uniform(0.45, 0.55), width * rng.uniform(0.45, 0.55)
    ry, rx = height * rng.uniform(0.6, 0.7), width * rng.uniform(0.6, 0.7)
    scale = max(height, width) / 3.0
    key = seed * 7 + 5

    def at(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        base = 1 - ((ys - cy) / ry) ** 2 - ((xs - cx) / rx) ** 2
        return base + 0.5 * (value_noise_points(ys, xs, scale, key) - 0.5)

    def grid(box: Box) -> np.ndarray:
        ys = (np.arange(box.y0, box.y1) + 0.0)[:, None]
        xs = (np.arange(box.x0, box.x1) + 0.0)[None, :]
        base = (1 - ((ys - cy) / ry) ** 2 - ((xs - cx) / rx) ** 2).astype(np.float32)
        return base + 0.5 * (value_noise_grid(box, scale, key) - 0.5)

    return at, grid


def synthetic_he(height: int, width: int, *, seed: int, mpp: float = 0.25, density: float = 1.0,
                 tissue_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic H&E image ``(rgb uint8 (H, W, 3), labels uint32 (H, W))``.

    Pink stroma, white background outside an irregular tissue region that reaches the image
    edges, purple nuclei (equivalent radius 2.3–6 µm, median 3.3 µm, as measured on MoNuSeg
    (median 3.2 µm, 95th percentile 5.2 µm) so that the trained model sees familiar sizes;
    some elongated up to 3:1) with chromatin texture and a darker rim, clusters of touching
    and overlapping nuclei, nuclei cut by the image borders. Labels are ``1..n``
    (consecutive, in painting order), exactly the painted nucleus pixels.

    ``density`` (0–3) scales the number of nuclei: at 1.0 about 6500 per mm² of tissue
    (~420 in 1024² px at 0.25 µm/px, ~22 % of the pixels), 2.0 gives ~1.8x as many.
    ``tissue_fraction`` (0–1) sets the share of the image covered by tissue (within ~1 %);
    None keeps the default blob (~96–99 % tissue, glass in some corners; the images used by
    tests and benchmarks). Deterministic in all arguments; 4096x4096 takes ~3.5 s of CPU.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    _check_common(mpp, density, tissue_fraction)
    at, grid = _image_tissue(height, width, seed)
    if tissue_fraction is not None:
        ys, xs = np.meshgrid(np.linspace(0, height - 1, 128), np.linspace(0, width - 1, 128), indexing="ij")
        at, grid = _shifted(at, grid, _field_offset(at(ys, xs), tissue_fraction, TISSUE_EDGE))
    box = Box(0, 0, height, width)
    rgb, local, _ = _render(box, seed=seed, mpp=mpp, tissue_grid=grid, tissue_at=at, density=density)
    # consecutive ids in painting order (a lookup table: np.unique would sort 16M pixels)
    present = np.bincount(local.ravel()) > 0
    present[0] = False
    lut = np.zeros(present.size, np.uint32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.uint32)
    return rgb, lut[local]


# ----------------------------------------------------------------- infinite slide

SLIDE_TISSUE_SCALE_UM = 400.0  # tissue islands / background gaps of the infinite slide
SLIDE_TISSUE_EDGE = 0.006  # the slide's tissue field is flatter: ~10 px transition


def _slide_tissue(seed: int, mpp: float, tissue_fraction: float | None = None) -> tuple[TissueAt, TissueGrid]:
    """Tissue field of the infinite slide: large-scale value noise plus slow sinusoids;
    about a fifth of the area is background. For a given ``tissue_fraction`` the field is
    shifted by its quantile over a fixed 48 x 48 tissue-scale window (the field is
    stationary, so that window stands for the whole slide; box-independent)."""
    scale = SLIDE_TISSUE_SCALE_UM / mpp
    key = seed * 7 + 6
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x511DE])
    k1, k2 = rng.uniform(0.5, 1.5, 2) * (2 * math.pi / (4 * scale))
    p1, p2 = rng.uniform(0, 2 * math.pi, 2)

    def at(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return (value_noise_points(ys, xs, scale, key) - 0.32
                + 0.12 * np.sin(np.asarray(ys) * k1 + p1) * np.cos(np.asarray(xs) * k2 + p2))

    def grid(box: Box) -> np.ndarray:
        ys = np.arange(box.y0, box.y1, dtype=np.float64)[:, None]
        xs = np.arange(box.x0, box.x1, dtype=np.float64)[None, :]
        sines = (0.12 * np.sin(ys * k1 + p1) * np.cos(xs * k2 + p2)).astype(np.float32)
        return value_noise_grid(box, scale, key) - np.float32(0.32) + sines

    if tissue_fraction is None:
        return at, grid
    ys, xs = np.meshgrid(*[np.linspace(0, 48 * scale, 192)] * 2, indexing="ij")
    return _shifted(at, grid, _field_offset(at(ys, xs), tissue_fraction, SLIDE_TISSUE_EDGE))


def _region(box: Box, seed: int, mpp: float, density: float,
            tissue_fraction: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if box.is_empty():
        raise ValueError(f"empty box {box}")
    _check_common(mpp, density, tissue_fraction)
    at, grid = _slide_tissue(seed, mpp, tissue_fraction)
    return _render(box, seed=seed, mpp=mpp, tissue_grid=grid, tissue_at=at, edge=SLIDE_TISSUE_EDGE,
                   density=density)


def synthetic_region(box: Box, *, seed: int, mpp: float = 0.25, density: float = 1.0,
                     tissue_fraction: float | None = None) -> np.ndarray:
    """RGB (uint8, ``box.shape + (3,)``) of ``box`` on an infinite deterministic slide.

    A pixel's value depends only on ``(seed, mpp, density, tissue_fraction, y, x)``, never on
    the box, so overlapping reads agree bit for bit and a gigapixel slide can be faked tile
    by tile without memory (~0.25 s per 1024² tile). Negative coordinates are valid. Tissue
    islands with glass gaps: ~4/5 tissue by default, or ``tissue_fraction``.
    """
    return _region(box, seed, mpp, density, tissue_fraction)[0]


def synthetic_region_labels(box: Box, *, seed: int, mpp: float = 0.25, density: float = 1.0,
                            tissue_fraction: float | None = None) -> np.ndarray:
    """Truth labels (uint32) of ``box`` on the slide of :func:`synthetic_region` (same
    arguments). Costs about as much as the RGB (the nuclei must be painted either way):
    use :func:`synthetic_region_with_labels` to get both from one render.

    Ids are global (the same nucleus has the same id in every box): unique within
    2048 cells (131072 px at 0.25 µm/px) in x; they repeat beyond.
    """
    return synthetic_region_with_labels(box, seed=seed, mpp=mpp, density=density,
                                        tissue_fraction=tissue_fraction)[1]


def synthetic_region_with_labels(box: Box, *, seed: int, mpp: float = 0.25, density: float = 1.0,
                                 tissue_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb, labels)`` of ``box`` from one render (see :func:`synthetic_region`)."""
    rgb, local, gids = _region(box, seed, mpp, density, tissue_fraction)
    return rgb, np.concatenate([[0], gids]).astype(np.uint32)[local]


# ----------------------------------------------------------------- MoNuSeg mosaic


def monuseg_mosaic(folder: str | Path, *, seed: int, canvas: tuple[int, int] | None = (4096, 4096),
                   background: tuple[int, int, int] = (236, 230, 236),
                   names: Sequence[str] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int, int]]]:
    """Annotated tiles (``images/*.png`` + ``labels/*.tif``) laid out on a pale canvas.

    Why: a small real-looking "slide" whose truth is the union of the tiles' annotations,
    to check that slide-level inference reproduces tile-level results. Tiles go to a grid
    of slots (one slot per tile, shuffled) with a random offset inside each slot, so the
    layout is irregular but tiles never overlap. Label ids are shifted by the running
    maximum, so they are unique over the mosaic. Tiles that do not fit are skipped (logged).
    ``canvas=None``: the smallest square canvas whose grid holds every tile.
    Returns ``(rgb uint8, labels uint32, placements [(name, y, x)])``.
    """
    import tifffile
    from PIL import Image

    folder = Path(folder)
    if names is None:
        names = sorted(p.stem for p in (folder / "images").glob("*.png"))
    if not names:
        raise FileNotFoundError(f"no annotated tiles in {folder}/images")
    rng = np.random.default_rng(seed)
    tiles = []
    for name in names:
        img = np.asarray(Image.open(folder / "images" / f"{name}.png").convert("RGB"))
        lab = tifffile.imread(folder / "labels" / f"{name}.tif")
        if lab.shape != img.shape[:2]:
            raise ValueError(f"{name}: label shape {lab.shape} != image shape {img.shape[:2]}")
        tiles.append((name, img, lab))
    th = max(t[1].shape[0] for t in tiles)
    tw = max(t[1].shape[1] for t in tiles)
    gap = max(16, th // 10)
    if canvas is None:
        side = math.ceil(math.sqrt(len(tiles))) * (max(th, tw) + gap) + gap
        canvas = (side, side)
    rows, cols = (canvas[0] - gap) // (th + gap), (canvas[1] - gap) // (tw + gap)
    if rows < 1 or cols < 1:
        raise ValueError(f"canvas {canvas} is smaller than a tile ({th}x{tw})")
    slot_h, slot_w = canvas[0] // rows, canvas[1] // cols
    slots = [(r, c) for r in range(rows) for c in range(cols)]
    order = rng.permutation(len(slots))
    if len(tiles) > len(slots):
        log.warning("mosaic %s holds %d of %d tiles", canvas, len(slots), len(tiles))
    rgb = np.empty(canvas + (3,), np.uint8)
    rgb[:] = np.asarray(background, np.uint8)
    labels = np.zeros(canvas, np.uint32)
    placements: list[tuple[str, int, int]] = []
    offset = 0
    for (name, img, lab), k in zip(tiles, order):
        r, c = slots[int(k)]
        h, w = lab.shape
        y = r * slot_h + int(rng.integers(0, max(1, slot_h - h - gap // 2)))
        x = c * slot_w + int(rng.integers(0, max(1, slot_w - w - gap // 2)))
        rgb[y:y + h, x:x + w] = img
        lab32 = lab.astype(np.uint32)
        labels[y:y + h, x:x + w] = np.where(lab32 > 0, lab32 + offset, 0)
        offset += int(lab32.max())
        placements.append((name, y, x))
    return rgb, labels, placements
