"""Label crops for the outline and GeoJSON tests: the shapes nuclei take, and the
grid check every written vertex must pass."""

from __future__ import annotations

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import Polygon

from pipeline.writers.outlines import TileOutlines


def synthetic_labels(h: int = 60, w: int = 80) -> np.ndarray:
    """Discs, touching discs, a C shape, border instances and a 1-px instance (int32)."""
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((h, w), np.int32)

    def disc(cy: float, cx: float, r: float) -> np.ndarray:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    lab[disc(12, 12, 7)] = 1
    left = disc(35, 15, 6)
    lab[left] = 2
    lab[disc(35, 27, 6) & ~left] = 3
    lab[5:25, 40:44] = 4
    lab[5:9, 40:55] = 4
    lab[21:25, 40:55] = 4
    lab[0:4, w - 8:w] = 5
    lab[h - 4:h, 0:5] = 6
    lab[h - 6:h, 50:60] = 7
    lab[45, 70] = 8
    for v in range(1, 9):
        assert ndi.label(lab == v)[1] == 1
    return lab



def on_grid(geom: shapely.Geometry) -> bool:
    coords = shapely.get_coordinates(geom) * 100
    return bool(np.all(np.abs(coords - np.round(coords)) < 1e-6))


def random_ellipses(seed: int, n: int = 60, size: int = 400) -> np.ndarray:
    """Non-overlapping filled ellipses, 8-40 px long axis, axis ratio 0.5-1, any angle:
    the shapes and sizes of nuclei at 0.25-0.5 µm/px."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    k = 0
    for _ in range(n):
        d, ratio, angle = rng.uniform(8, 40), rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)
        cy, cx = rng.uniform(25, size - 25, 2)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)
        mask = (u / (d / 2)) ** 2 + (v / (d * ratio / 2)) ** 2 <= 1
        if not lab[mask].any():
            k += 1
            lab[mask] = k
    return lab



def by_value(outlines: TileOutlines) -> dict[int, Polygon]:
    """``trace_tile``'s polygons by label value."""
    return dict(zip(outlines.values.tolist(), outlines.polygons))
