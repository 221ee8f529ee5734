"""Per-object intensity statistics over a label image, for every object at once
(``scipy.ndimage`` label statistics: one pass per statistic and channel, no Python loop
per object), named as QuPath 0.6 names them: ``"<channel>: <statistic>"`` for a detection,
``"<compartment>: <channel>: <statistic>"`` for a cell's nucleus, cytoplasm or cell.

``Std.Dev.`` is the sample standard deviation (n - 1), as QuPath's (Apache Commons
``DescriptiveStatistics``); ``Median`` the middle value, or the mean of the two middle
values for an even count.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

STATISTICS = ("Mean", "Median", "Min", "Max", "Std.Dev.")


def label_statistics(labels: np.ndarray, channels: dict[str, np.ndarray], n: int,
                     prefix: str = "") -> dict[str, np.ndarray]:
    """Mean, Median, Min, Max and Std.Dev. of every channel for labels 1..n (NaN for a
    label without pixels), keyed ``prefix + "<channel>: <statistic>"``."""
    ids = np.arange(1, n + 1)
    out: dict[str, np.ndarray] = {}
    count = np.bincount(labels.ravel(), minlength=n + 1)[1:n + 1].astype(np.float64)
    empty = count == 0
    for name, values in channels.items():
        values = np.asarray(values, np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):  # labels without pixels: NaN below
            stats = _stats(values, labels, ids, n)
        var = stats.pop("Variance")
        with np.errstate(invalid="ignore", divide="ignore"):
            stats["Std.Dev."] = np.sqrt(np.where(count > 1, var * count / np.maximum(count - 1, 1), 0.0))
        for stat in STATISTICS:
            column = stats[stat].reshape(-1)[:n] if n else np.zeros(0)
            out[f"{prefix}{name}: {stat}"] = np.where(empty, np.nan, column)
    return out


def _stats(values: np.ndarray, labels: np.ndarray, ids: np.ndarray, n: int) -> dict[str, np.ndarray]:
    if n == 0:
        return {k: np.zeros(0) for k in ("Mean", "Median", "Min", "Max", "Variance")}
    return {"Mean": np.asarray(ndi.mean(values, labels, ids), np.float64),
            "Median": np.asarray(ndi.median(values, labels, ids), np.float64),
            "Min": np.asarray(ndi.minimum(values, labels, ids), np.float64),
            "Max": np.asarray(ndi.maximum(values, labels, ids), np.float64),
            "Variance": np.asarray(ndi.variance(values, labels, ids), np.float64)}
