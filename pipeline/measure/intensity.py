"""Per-object intensity statistics over a label image, for every object at once (one sort
per channel of the labelled pixels, no Python loop per object), named as QuPath 0.6 names
them: ``"<channel>: <statistic>"`` for a detection, ``"<compartment>: <channel>:
<statistic>"`` for a cell's nucleus, cytoplasm or cell (``ObjectMeasurements``).

``Std.Dev.`` is the sample standard deviation (n - 1), as QuPath's (Apache Commons
``DescriptiveStatistics``); ``Median`` the middle value, or the mean of the two middle
values for an even count (its default percentile estimate at 50 %).

Why not ``scipy.ndimage.median`` and friends: each call sorts every pixel of the crop,
background included; on a 512² tile the five statistics of three channels took 0.25 s,
more than the network. Here only the labelled pixels are sorted, one ``numpy.sort`` of
label-offset keys per channel, which orders them by label and within each label at once.
"""

from __future__ import annotations

import numpy as np

from pipeline.measure.stain import CHANNELS, StainVectors, deconvolve_planes

STATISTICS = ("Mean", "Median", "Min", "Max", "Std.Dev.")
# a nucleus detection's intensity measurements, in the order they are written
INTENSITY_NAMES: tuple[str, ...] = tuple(f"{c}: {s}" for c in CHANNELS for s in STATISTICS)


def stain_intensities(labels: np.ndarray, rgb: np.ndarray, stains: StainVectors, ids: np.ndarray
                      ) -> dict[str, np.ndarray]:
    """The stain statistics (``INTENSITY_NAMES``) of the objects ``ids`` (ascending label
    values; a row per id), measured on ``rgb`` (``labels``' shape, 3 channels). Only the
    objects' pixels are deconvolved, once: most of a tile is not a nucleus."""
    ids = np.asarray(ids)
    at, row = _pixels_of(labels, ids)
    return label_statistics(row, _deconvolved(rgb, at, stains), len(ids))


def cell_intensities(cells: np.ndarray, nuclei: np.ndarray, rgb: np.ndarray, stains: StainVectors,
                     ids: np.ndarray, cell: str, cytoplasm: str) -> dict[str, np.ndarray]:
    """The stain statistics of cells (``cell`` + ``INTENSITY_NAMES``) and of their
    cytoplasm (``cytoplasm`` + ...: the cell's pixels outside ``nuclei``), rows as in
    :func:`stain_intensities`.

    Why not ``stain_intensities`` with both compartments: a cell is its nucleus and its
    cytoplasm, so the nucleus's pixels and the cytoplasm's are sorted apart (one sort of
    all the cell's pixels fewer) and each cell's statistics are combined from the two
    sorted runs: sums, extremes, and the median's ranks found by a binary search run for
    all cells at once."""
    ids = np.asarray(ids)
    at, row = _pixels_of(cells, ids)
    inner = np.asarray(nuclei).ravel()[at] > 0
    n = len(ids)
    out: dict[str, np.ndarray] = {}
    in_nuclei = _deconvolved(rgb, at[inner], stains)
    outside = _deconvolved(rgb, at[~inner], stains)
    for name in in_nuclei:
        nucleus = _SortedRuns.of(np.asarray(in_nuclei[name], np.float64), row[inner], n)
        rest = _SortedRuns.of(np.asarray(outside[name], np.float64), row[~inner], n)
        for stat, values in rest.statistics().items():
            out[f"{cytoplasm}{name}: {stat}"] = values
        for stat, values in nucleus.union_statistics(rest).items():
            out[f"{cell}{name}: {stat}"] = values
    return {key: out[key] for prefix in (cell, cytoplasm) for key in (prefix + m for m in INTENSITY_NAMES)}


def _pixels_of(labels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The flat indices of the pixels of objects ``ids`` (ascending) and their labels
    1..len(ids) (the row of their id, plus one)."""
    flat = np.asarray(labels).ravel()
    at = np.flatnonzero(flat)
    if len(ids) and ids[0] == 1 and ids[-1] == len(ids):  # 1..n (a tile's own ids): rows are labels - 1
        row = flat[at].astype(np.intp) - 1
        ok = row < len(ids)
    else:  # ids may be sparse (global values): rows 0..len-1
        row = np.searchsorted(ids, flat[at])
        ok = row < len(ids)
        ok[ok] = ids[row[ok]] == flat[at[ok]]
    return at[ok], row[ok] + 1


def _deconvolved(rgb: np.ndarray, at: np.ndarray, stains: StainVectors) -> dict[str, np.ndarray]:
    rgb = np.asarray(rgb)
    return deconvolve_planes([rgb[..., k].ravel()[at] for k in range(3)], stains)


def label_statistics(labels: np.ndarray, channels: dict[str, np.ndarray], n: int,
                     prefix: str = "") -> dict[str, np.ndarray]:
    """Mean, Median, Min, Max and Std.Dev. of every channel (finite values) for labels
    1..n (NaN for a label without pixels), keyed ``prefix + "<channel>: <statistic>"``.
    ``channels``: arrays of ``labels``' shape (or the same number of elements); pixels
    labelled 0 or above ``n`` are not measured."""
    flat = np.asarray(labels).ravel()
    keep = np.flatnonzero((flat > 0) & (flat <= n))
    every = len(keep) == len(flat)
    lab = (flat if every else flat[keep]).astype(np.intp)
    count = np.bincount(lab, minlength=n + 1)[1:n + 1]
    out: dict[str, np.ndarray] = {}
    for name, values in channels.items():
        v = np.asarray(values, np.float64).ravel()
        stats = _SortedRuns.of(v if every else v[keep], lab, n, count).statistics()
        for stat in STATISTICS:
            out[f"{prefix}{name}: {stat}"] = stats[stat]
    return out


class _SortedRuns:
    """Values of labels 1..n ordered by label and within each label by value (one sort):
    keys label * span + (value - low), exact enough in float64 (labels of a crop times a
    few units of OD); the labels of the sorted keys are then known from the counts."""

    def __init__(self, key: np.ndarray, low: float, span: float, count: np.ndarray, total: np.ndarray,
                 squares: np.ndarray) -> None:
        self.key, self.low, self.span = key, low, span
        self.count, self.total, self.squares = count, total, squares  # sums per label
        self.start = np.cumsum(count) - count

    @classmethod
    def of(cls, v: np.ndarray, lab: np.ndarray, n: int, count: np.ndarray | None = None) -> _SortedRuns:
        if count is None:
            count = np.bincount(lab, minlength=n + 1)[1:n + 1]
        if not len(v):
            return cls(np.zeros(0), 0.0, 1.0, count, np.zeros(n), np.zeros(n))
        low = float(v.min())
        span = float(v.max()) - low + 1.0
        key = np.sort(lab * span + (v - low))
        total = np.bincount(lab, v, minlength=n + 1)[1:n + 1]
        squares = np.bincount(lab, v * v, minlength=n + 1)[1:n + 1]
        return cls(key, low, span, count, total, squares)

    def at(self, rows: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """The values of rank ``rank`` (clipped to the run) of labels ``rows + 1``."""
        if not len(self.key):
            return np.full(len(rows), -np.inf)
        rank = np.clip(rank, 0, np.maximum(self.count[rows] - 1, 0))
        index = np.minimum(self.start[rows] + rank, len(self.key) - 1)
        return self.key[index] - (rows + 1) * self.span + self.low

    def statistics(self) -> dict[str, np.ndarray]:
        present = np.flatnonzero(self.count)
        k = self.count[present]
        median = (self.at(present, (k - 1) // 2) + self.at(present, k // 2)) / 2
        return _columns(self.count, self.total, self.squares, present,
                        self.at(present, np.zeros_like(k)), self.at(present, k - 1), median)

    def union_statistics(self, other: _SortedRuns) -> dict[str, np.ndarray]:
        """The statistics of each label's values here and in ``other`` together."""
        count = self.count + other.count
        present = np.flatnonzero(count)
        k = count[present]
        mine, theirs = self.count[present], other.count[present]
        low = np.fmin(np.where(mine > 0, self.at(present, np.zeros_like(k)), np.nan),
                      np.where(theirs > 0, other.at(present, np.zeros_like(k)), np.nan))
        high = np.fmax(np.where(mine > 0, self.at(present, mine - 1), np.nan),
                       np.where(theirs > 0, other.at(present, theirs - 1), np.nan))
        median = (self._kth_with(other, present, (k - 1) // 2) + self._kth_with(other, present, k // 2)) / 2
        return _columns(count, self.total + other.total, self.squares + other.squares, present, low, high,
                        median)

    def _kth_with(self, other: _SortedRuns, rows: np.ndarray, r: np.ndarray) -> np.ndarray:
        """The value of rank ``r`` (0-based) of labels ``rows + 1`` among their values here
        and in ``other``: binary search, for all labels at once, for ``i``, how many of the
        ``r + 1`` smallest lie here (the rest, ``j``, in ``other``)."""
        a, b = self.count[rows], other.count[rows]
        lo, hi = np.maximum(0, r + 1 - b), np.minimum(r + 1, a)
        while (lo < hi).any():
            active = lo < hi
            i = (lo + hi) // 2
            j = r + 1 - i
            # too few from here while the j-th smallest there exceeds the (i+1)-th here
            more = active & (j > 0) & (other.at(rows, j - 1) > self.at(rows, i))
            lo = np.where(more, i + 1, lo)
            hi = np.where(active & ~more, i, hi)
        j = r + 1 - lo
        return np.maximum(np.where(lo > 0, self.at(rows, lo - 1), -np.inf),
                          np.where(j > 0, other.at(rows, j - 1), -np.inf))


def _columns(count: np.ndarray, total: np.ndarray, squares: np.ndarray, present: np.ndarray,
             low: np.ndarray, high: np.ndarray, median: np.ndarray) -> dict[str, np.ndarray]:
    """``STATISTICS`` of labels 1..n (NaN where a label has no pixel) from their sums (of
    values and squares, in float64) and the extremes and medians of the ``present`` ones."""
    c = np.maximum(count, 1).astype(np.float64)
    mean = total / c
    var = np.maximum(squares - total * mean, 0.0) / np.maximum(c - 1, 1)
    has = count > 0
    out = {"Mean": np.where(has, mean, np.nan),
           "Std.Dev.": np.where(has, np.where(count > 1, np.sqrt(var), 0.0), np.nan)}
    for stat, values in (("Median", median), ("Min", low), ("Max", high)):
        column = np.full(len(count), np.nan)
        column[present] = values
        out[stat] = column
    return out
