"""Cluster one slide's nuclei by their QuPath measurements, outside QuPath.

An example of what ``nuclei.parquet`` is for: every nucleus's shape and stain intensities
under QuPath's names, one row per nucleus, ready for pandas. The nuclei are grouped by
k-means on the standardised features (shape and stain have different units, so each
feature is put on the same footing first), each cluster's mean of a few features is
printed, and a picture shows the clusters in feature space (the first two principal
components) and where they lie on the slide.

    python docs/examples/cluster_nuclei.py OUT/<slide> --out docs/cluster-example.png

Unsupervised clusters are a first look, not cell types: name them by their means and
their place on the slide, or train a classifier on labelled cells (QuPath, see
docs/qupath.md) when the classes are known.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.cluster.vq import kmeans2

SHAPE = ("Area µm^2", "Length µm", "Circularity", "Solidity", "Max diameter µm", "Min diameter µm",
         "Eccentricity")
INTENSITY = tuple(f"{stain}: {stat}" for stain in ("Hematoxylin", "Eosin", "OD Sum")
                  for stat in ("Mean", "Median", "Min", "Max", "Std.Dev."))
# present when the slide was run with --cell-expansion: what surrounds the nucleus
CELL = ("Cytoplasm: Hematoxylin: Mean", "Cytoplasm: Eosin: Mean", "Nucleus/Cell area ratio")
SHOWN = ("Area µm^2", "Circularity", "Hematoxylin: Mean", "Eosin: Mean")  # printed per cluster


def feature_names(columns: Sequence[str]) -> list[str]:
    """The shape and intensity measurements present in a table (cell context too, if made)."""
    names = [c for c in (*SHAPE, *INTENSITY, *CELL) if c in columns]
    if not names:
        raise ValueError("no QuPath measurements in this table: is it a wsi-nuclei nuclei.parquet?")
    return names


def standardise(values: np.ndarray) -> np.ndarray:
    """Each column to mean 0 and standard deviation 1 (a constant column stays 0)."""
    std = values.std(axis=0)
    return (values - values.mean(axis=0)) / np.where(std > 0, std, 1.0)


def cluster(features: np.ndarray, k: int = 3, seed: int = 0) -> np.ndarray:
    """k-means labels (0..k-1) of the rows of standardised ``features``, the same for the
    same seed; clusters are numbered by size, largest first, so that runs compare."""
    _, labels = kmeans2(features, k, minit="++", rng=np.random.default_rng(seed))
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    rank = np.empty(k, dtype=int)
    rank[order] = np.arange(k)
    return rank[labels]


def principal_components(features: np.ndarray, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The rows projected on the first ``n`` principal axes, and each axis's share of the variance."""
    centred = features - features.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:n].T, (s[:n] ** 2) / max(float((s**2).sum()), 1e-12)


def load(slide_dir: Path) -> pd.DataFrame:
    """The nuclei table of a finished slide (``OUT/<slide>`` or the Parquet file itself)."""
    path = slide_dir / "nuclei.parquet" if slide_dir.is_dir() else slide_dir
    return pd.read_parquet(path)


def analyse(table: pd.DataFrame, k: int = 3, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Rows with every feature finite, their cluster labels, and the features used."""
    names = feature_names(list(table.columns))
    kept = table[np.isfinite(table[names].to_numpy(float)).all(axis=1)].reset_index(drop=True)
    if len(kept) < k:
        raise ValueError(f"{len(kept)} nuclei with finite measurements: too few for {k} clusters")
    return kept, cluster(standardise(kept[names].to_numpy(float)), k, seed), names


def summary(table: pd.DataFrame, labels: np.ndarray) -> pd.DataFrame:
    """Per cluster: the number of nuclei and the mean of a few telling features."""
    shown = [c for c in SHOWN if c in table.columns]
    means = table[shown].groupby(labels).mean()
    means.insert(0, "nuclei", np.bincount(labels))
    means.index.name = "cluster"
    return means


def plot(table: pd.DataFrame, labels: np.ndarray, names: list[str], out: Path, title: str) -> None:
    """Two panels: the first two principal components, and the nuclei centroids on the slide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pcs, share = principal_components(standardise(table[names].to_numpy(float)))
    colours = plt.get_cmap("tab10")(labels % 10)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), width_ratios=(1, 1.25))
    left.scatter(pcs[:, 0], pcs[:, 1], c=colours, s=3, linewidths=0, rasterized=True)
    left.set_xlabel(f"PC 1 ({share[0]:.0%} of the variance)")
    left.set_ylabel(f"PC 2 ({share[1]:.0%})")
    left.set_title(f"{len(names)} standardised features")
    right.scatter(table["centroid_x_um"], table["centroid_y_um"], c=colours, s=2, linewidths=0,
                  rasterized=True)
    right.set_aspect("equal")
    right.invert_yaxis()  # image coordinates: y down, as in QuPath
    right.set_xlabel("x (µm)")
    right.set_ylabel("y (µm)")
    right.set_title("nucleus centroids on the slide")
    for c in range(int(labels.max()) + 1):
        left.scatter([], [], color=plt.get_cmap("tab10")(c % 10), label=f"cluster {c}", s=20)
    left.legend(loc="best", fontsize=8, markerscale=1)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slide", type=Path,
                        help="OUT/<slide> of a finished wsi-nuclei run (or its nuclei.parquet)")
    parser.add_argument("--k", type=int, default=3, help="number of clusters (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    parser.add_argument("--out", type=Path, help="write the picture here (PNG; needs matplotlib)")
    args = parser.parse_args(argv)

    table, labels, names = analyse(load(args.slide), args.k, args.seed)
    print(f"{len(table)} nuclei, {len(names)} features: {', '.join(names)}")
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
        print(summary(table, labels))
    if args.out:
        name = args.slide.name if args.slide.is_dir() else args.slide.parent.name
        plot(table, labels, names, args.out, f"{name}: k-means, k = {args.k}")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
