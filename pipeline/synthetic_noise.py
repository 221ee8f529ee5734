"""Hashed value noise and tabled pixel noise for synthetic slides: pure functions of absolute
pixel coordinates, so any region of a synthetic slide is computable by itself and
overlapping reads agree bit for bit (``pipeline.synthetic``)."""

from __future__ import annotations

import math

import numpy as np

from pipeline.types import Box

NOISE_PERIODS = (251, 257)  # coprime table sizes: pixel noise repeats every 64507 px


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a cheap, well-mixed
    hash, so lattice values of any region are computable independently."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def _lattice(iy: np.ndarray, ix: np.ndarray, key: int) -> np.ndarray:
    """Deterministic uniform [0, 1) values at integer lattice points (any sign)."""
    iy = np.asarray(iy, dtype=np.int64).astype(np.uint64)
    ix = np.asarray(ix, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix(_splitmix(iy ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)) + ix)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def value_noise_grid(box: Box, cell: float, key: int) -> np.ndarray:
    """Value noise (smoothstep-interpolated lattice values in [0, 1)) on the pixels of
    ``box``; separable interpolation, so cheap for large boxes. float32."""
    ys = np.arange(box.y0, box.y1, dtype=np.float64) / cell
    xs = np.arange(box.x0, box.x1, dtype=np.float64) / cell
    iy0, ix0 = int(math.floor(ys[0])), int(math.floor(xs[0]))
    iy1, ix1 = int(math.floor(ys[-1])) + 2, int(math.floor(xs[-1])) + 2
    lat = _lattice(np.arange(iy0, iy1)[:, None], np.arange(ix0, ix1)[None, :], key)
    fy, fx = np.floor(ys), np.floor(xs)
    ty, tx = _smooth(ys - fy), _smooth(xs - fx)
    ry, rx = (fy - iy0).astype(np.intp), (fx - ix0).astype(np.intp)
    rows = lat[ry] * (1 - ty)[:, None] + lat[ry + 1] * ty[:, None]  # (H, nx)
    rows = rows.astype(np.float32)
    tx32 = tx.astype(np.float32)
    return rows[:, rx] * (1 - tx32)[None, :] + rows[:, rx + 1] * tx32[None, :]


def value_noise_points(ys: np.ndarray, xs: np.ndarray, cell: float, key: int) -> np.ndarray:
    """The same value noise at arbitrary points (used to decide where nuclei exist)."""
    ys, xs = np.asarray(ys, np.float64) / cell, np.asarray(xs, np.float64) / cell
    fy, fx = np.floor(ys), np.floor(xs)
    ty, tx = _smooth(ys - fy), _smooth(xs - fx)
    iy, ix = fy.astype(np.int64), fx.astype(np.int64)
    top = _lattice(iy, ix, key) * (1 - tx) + _lattice(iy, ix + 1, key) * tx
    bottom = _lattice(iy + 1, ix, key) * (1 - tx) + _lattice(iy + 1, ix + 1, key) * tx
    return top * (1 - ty) + bottom * ty


def noise_tables(seed: int) -> list[np.ndarray]:
    """Fixed per-seed Gaussian tables; pixel noise = sum of two tables of coprime period."""
    rng = np.random.default_rng([seed, 0xA11CE])
    return [rng.standard_normal((p, p)).astype(np.float32) for p in NOISE_PERIODS]


def pixel_noise(box: Box, tables: list[np.ndarray], offset: int) -> np.ndarray:
    """Unit-variance-ish white noise for ``box``, a pure function of absolute pixel
    coordinates (tables indexed modulo their period)."""
    out = np.zeros(box.shape, np.float32)
    for table in tables:
        p = table.shape[0]
        ry = (np.arange(box.y0, box.y1) + offset * 17) % p
        # = table[ry[:, None], rx[None, :]] with rx = (x + offset * 31) % p, but by tiling
        # the p rolled columns instead of a 2-D gather (40x faster, same values)
        rows = np.roll(table[ry], -((box.x0 + offset * 31) % p), axis=1)
        out += np.tile(rows, (1, -(-box.width // p)))[:, :box.width]
    return out * np.float32(1 / math.sqrt(len(tables)))
