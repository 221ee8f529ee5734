"""The nuclei of synthetic slides: placed per hashed grid cell, so the nuclei of any region
are known without generating the rest of the slide, and painted in priority order with the
visibility rule that keeps the truth box-independent (the rendering model is described in
``pipeline.synthetic``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.types import Box

CELL_UM = 16.0  # nucleus grid cell (64 px at 0.25 µm/px)
RADIUS_MEDIAN_UM = 3.3  # MoNuSeg: median equivalent radius ~13 px at 0.25 µm/px
RADIUS_RANGE_UM = (2.3, 6.0)
MAX_ASPECT = 3.0
CLUSTER_REACH_UM = 12.0  # cluster members lie within this distance of the cluster seed
SINGLES_PER_CELL = 1.25
CLUSTER_PROBABILITY = 0.12
MIN_VISIBLE = 0.30


@dataclass
class Nuclei:
    """Parameters of a set of nuclei (one entry per nucleus, arrays of equal length)."""

    cy: np.ndarray
    cx: np.ndarray
    a: np.ndarray  # semi-major axis, px
    b: np.ndarray  # semi-minor axis, px
    theta: np.ndarray
    priority: np.ndarray  # painting order key (higher = painted later = on top)
    hematoxylin: np.ndarray  # mean haematoxylin concentration
    gid: np.ndarray  # global id (uint32, nonzero)

    def __len__(self) -> int:
        return len(self.cy)

    def take(self, idx: np.ndarray) -> Nuclei:
        return Nuclei(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def _cell_px(mpp: float) -> int:
    return max(8, int(round(CELL_UM / mpp)))


def _reach_px(mpp: float) -> int:
    """Upper bound of how far a nucleus' pixels can lie outside its cell."""
    max_semi = RADIUS_RANGE_UM[1] * math.sqrt(MAX_ASPECT)
    return int(math.ceil((CLUSTER_REACH_UM + max_semi) / mpp)) + 2


def _cell_nuclei(seed: int, cy: int, cx: int, mpp: float, density: float = 1.0) -> list[tuple]:
    """Nuclei whose seed point lies in grid cell (cy, cx): tuples
    (y, x, a, b, theta, priority, hematoxylin, k). Deterministic in (seed, cy, cx, density).

    ``density`` scales the expected number of single nuclei and the cluster probability;
    at 1.0 the draws are exactly those of the original generator (so seeds used by tests
    and benchmarks keep their images)."""
    cell = _cell_px(mpp)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, cy % (1 << 32), cx % (1 << 32), 0x5EED])

    def shape() -> tuple[float, float, float]:
        r = float(np.clip(rng.lognormal(math.log(RADIUS_MEDIAN_UM), 0.27), *RADIUS_RANGE_UM)) / mpp
        aspect = rng.uniform(1.0, 1.5) if rng.random() < 0.8 else rng.uniform(1.6, MAX_ASPECT)
        return r * math.sqrt(aspect), r / math.sqrt(aspect), rng.uniform(0, math.pi)

    out: list[tuple] = []
    y0, x0 = cy * cell, cx * cell
    mean = SINGLES_PER_CELL * density
    for _ in range(min(rng.poisson(mean), max(8, int(4 * mean)))):
        a, b, t = shape()
        out.append((y0 + rng.uniform(0, cell), x0 + rng.uniform(0, cell), a, b, t))
    if rng.random() < min(1.0, CLUSTER_PROBABILITY * density):
        sy, sx = y0 + rng.uniform(0, cell), x0 + rng.uniform(0, cell)
        reach = CLUSTER_REACH_UM / mpp
        members: list[tuple] = []
        for _ in range(int(rng.integers(3, 8))):
            a, b, t = shape()
            r = math.sqrt(a * b)
            if not members:
                members.append((sy, sx, a, b, t))
                continue
            for _try in range(6):  # next to a random member, slightly overlapping it
                py, px, pa, pb, _ = members[int(rng.integers(len(members)))]
                ang = rng.uniform(0, 2 * math.pi)
                d = (math.sqrt(pa * pb) + r) * rng.uniform(0.78, 0.95)
                ny, nx = py + d * math.sin(ang), px + d * math.cos(ang)
                if math.hypot(ny - sy, nx - sx) <= reach:
                    members.append((ny, nx, a, b, t))
                    break
        out.extend(members)
    # darker, hyperchromatic nuclei now and then; lymphocyte-like small dark ones
    result = []
    for k, (y, x, a, b, t) in enumerate(out[:16]):
        dark = rng.uniform(0.42, 0.8) * (1.25 if a * b * mpp * mpp < 9 else 1.0)
        result.append((y, x, a, b, t, rng.random(), dark, k))
    return result


def _gid(cy: int, cx: int, k: int) -> int:
    """Global id of the k-th nucleus of cell (cy, cx): unique over 2048 cells in x
    (131072 px at 0.25 µm/px) and 131071 cells in y; never 0."""
    return ((cy % 131071) << 15 | (cx % 2048) << 4 | k) + 1


def nuclei_for(domain: Box, seed: int, mpp: float, density: float = 1.0) -> Nuclei:
    """All nuclei that can reach into ``domain``."""
    cell, reach = _cell_px(mpp), _reach_px(mpp)
    rows: list[tuple] = []
    gids: list[int] = []
    for cy in range((domain.y0 - reach) // cell, (domain.y1 + reach) // cell + 1):
        for cx in range((domain.x0 - reach) // cell, (domain.x1 + reach) // cell + 1):
            for nuc in _cell_nuclei(seed, cy, cx, mpp, density):
                rows.append(nuc[:7])
                gids.append(_gid(cy, cx, nuc[7]))
    if not rows:
        empty = np.zeros(0)
        return Nuclei(empty, empty, empty, empty, empty, empty, empty, np.zeros(0, np.uint32))
    arr = np.array(rows, dtype=np.float64)
    nuc = Nuclei(*(arr[:, i] for i in range(7)), np.array(gids, dtype=np.uint32))
    ext = nuc.a + 1
    inside = ((nuc.cy + ext > domain.y0) & (nuc.cy - ext < domain.y1)
              & (nuc.cx + ext > domain.x0) & (nuc.cx - ext < domain.x1))
    return nuc.take(np.nonzero(inside)[0])


def _ellipse(n: Nuclei, i: int, domain: Box) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """Slices (in ``domain``), mask and normalised radius^2 of nucleus i's ellipse."""
    ext = n.a[i] + 1
    y0 = max(int(math.floor(n.cy[i] - ext)), domain.y0)
    y1 = min(int(math.ceil(n.cy[i] + ext)) + 1, domain.y1)
    x0 = max(int(math.floor(n.cx[i] - ext)), domain.x0)
    x1 = min(int(math.ceil(n.cx[i] + ext)) + 1, domain.x1)
    if y1 <= y0 or x1 <= x0:
        return None
    dy = (np.arange(y0, y1) + 0.5 - n.cy[i]).astype(np.float32)[:, None]
    dx = (np.arange(x0, x1) + 0.5 - n.cx[i]).astype(np.float32)[None, :]
    c, s = math.cos(n.theta[i]), math.sin(n.theta[i])
    u, v = (dx * c + dy * s) / n.a[i], (-dx * s + dy * c) / n.b[i]
    r2 = u * u + v * v
    return (slice(y0 - domain.y0, y1 - domain.y0), slice(x0 - domain.x0, x1 - domain.x0)), r2 <= 1.0, r2


_CROSS = ndimage.generate_binary_structure(2, 1)


def _largest_part(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected part of a boolean mask (the mask itself if connected)."""
    parts, n = ndimage.label(mask, structure=_CROSS)
    if n <= 1:
        return mask
    return parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1


def paint_nuclei(domain: Box, nuc: Nuclei) -> tuple[np.ndarray, np.ndarray, Nuclei]:
    """Paint nuclei (priority order) on ``domain``: local index map (0 = none, i + 1),
    normalised radius map, and the nuclei in painting order.

    A nucleus is kept if the largest 4-connected part of its ellipse left uncovered by *all*
    higher nuclei is >= 30 % of the ellipse. Kept nuclei are painted, and each is cut to its
    largest 4-connected visible part (the rest, slivers cut off by a nucleus on top, become
    stroma), so every truth nucleus is one 4-connected region as the watershed contract
    produces. Everything is decided per nucleus on its whole ellipse, so the result for a
    nucleus does not depend on the domain as long as the domain holds it and its
    neighbours whole (callers grow the domain for that).
    """
    order = np.argsort(nuc.priority, kind="stable")
    nuc = nuc.take(order)
    idx = np.zeros(domain.shape, np.int32)
    geoms = [_ellipse(nuc, i, domain) for i in range(len(nuc))]
    for i, g in enumerate(geoms):
        if g is not None:
            sl, mask, _ = g
            idx[sl][mask] = i + 1
    keep = np.zeros(len(nuc), bool)
    for i, g in enumerate(geoms):
        if g is not None:
            sl, mask, _ = g
            area = int(mask.sum())
            visible = idx[sl] == i + 1
            # the largest part is at most all visible pixels: label only when that can pass
            keep[i] = (area > 0 and visible.sum() >= MIN_VISIBLE * area
                       and _largest_part(visible).sum() >= MIN_VISIBLE * area)
    idx[:] = 0
    rad = np.zeros(domain.shape, np.float32)
    for i, g in enumerate(geoms):
        if g is not None and keep[i]:
            sl, mask, r2 = g
            idx[sl][mask] = i + 1
            rad[sl][mask] = r2[mask]
    for i, g in enumerate(geoms):
        if g is not None and keep[i]:
            sl = g[0]
            own = idx[sl] == i + 1
            cut = own & ~_largest_part(own)
            if cut.any():
                idx[sl][cut] = 0
    return idx, rad, nuc
