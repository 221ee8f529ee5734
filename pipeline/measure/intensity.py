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

from collections.abc import Mapping

import numpy as np

from pipeline.measure.stain import CHANNELS, StainVectors, deconvolve_planes

STATISTICS = ("Mean", "Median", "Min", "Max", "Std.Dev.")
# a nucleus detection's intensity measurements, in the order they are written
INTENSITY_NAMES: tuple[str, ...] = tuple(f"{c}: {s}" for c in CHANNELS for s in STATISTICS)


def stain_intensities(labels: np.ndarray, rgb: np.ndarray, stains: StainVectors, ids: np.ndarray,
                      compartments: Mapping[str, np.ndarray | None] | None = None) -> dict[str, np.ndarray]:
    """The stain statistics (``INTENSITY_NAMES``) of the objects ``ids`` (ascending label
    values; a row per id), measured on ``rgb`` (``labels``' shape, 3 channels). Only the
    objects' pixels are deconvolved, once: most of a tile is not a nucleus.

    ``compartments``: prefix -> mask (``labels``' shape) of the pixels that count, None
    for all of them, e.g. ``{"Cell: ": None, "Cytoplasm: ": nuclei == 0}``; default: all
    pixels, no prefix."""
    ids = np.asarray(ids)
    flat = np.asarray(labels).ravel()
    at = np.flatnonzero(flat)
    if len(ids) and ids[0] == 1 and ids[-1] == len(ids):  # 1..n (a tile's own ids): rows are labels - 1
        row = flat[at].astype(np.intp) - 1
        ok = row < len(ids)
    else:  # ids may be sparse (global values): rows 0..len-1
        row = np.searchsorted(ids, flat[at])
        ok = row < len(ids)
        ok[ok] = ids[row[ok]] == flat[at[ok]]
    at, row = at[ok], row[ok]
    rgb = np.asarray(rgb)
    channels = deconvolve_planes([rgb[..., k].ravel()[at] for k in range(3)], stains)
    out: dict[str, np.ndarray] = {}
    row += 1  # labels 1..len(ids)
    for prefix, mask in (compartments or {"": None}).items():
        if mask is None:
            out.update(label_statistics(row, channels, len(ids), prefix))
            continue
        keep = np.asarray(mask).ravel()[at]
        out.update(label_statistics(row[keep], {k: v[keep] for k, v in channels.items()}, len(ids), prefix))
    return out


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
        stats = _sorted_statistics(v if every else v[keep], lab, count, n)
        for stat in STATISTICS:
            out[f"{prefix}{name}: {stat}"] = stats[stat]
    return out


def _sorted_statistics(v: np.ndarray, lab: np.ndarray, count: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """The statistics of ``v`` (pixels of labels ``lab``, in any order; ``count`` per label
    1..n)."""
    nan = np.full(n, np.nan)
    if not len(v):
        return {stat: nan.copy() for stat in STATISTICS}
    low = float(v.min())
    span = float(v.max()) - low + 1.0
    # one sort orders the values by label and within each label: keys label * span +
    # (value - low), exact enough in float64 (labels of a crop times a few units of OD);
    # the labels of the sorted keys are then known from the counts alone
    key = np.sort(lab * span + (v - low))
    total = np.bincount(lab, v, minlength=n + 1)[1:n + 1]
    squares = np.bincount(lab, v * v, minlength=n + 1)[1:n + 1]
    c = np.maximum(count, 1).astype(np.float64)
    mean = total / c
    var = np.maximum(squares - total * mean, 0.0) / np.maximum(c - 1, 1)
    present = count > 0
    k = count[present]
    s = (np.cumsum(count) - count)[present]
    shift = (np.flatnonzero(present) + 1) * span  # the label part of the keys at these ranks

    def ordered(rank: np.ndarray) -> np.ndarray:  # the values at these ranks (of present labels)
        return key[rank] - shift + low

    median = (ordered(s + (k - 1) // 2) + ordered(s + k // 2)) / 2
    out = {"Mean": np.where(present, mean, np.nan),
           "Std.Dev.": np.where(present, np.where(count > 1, np.sqrt(var), 0.0), np.nan)}
    for stat, values in (("Median", median), ("Min", ordered(s)), ("Max", ordered(s + k - 1))):
        column = nan.copy()
        column[present] = values
        out[stat] = column
    return out
