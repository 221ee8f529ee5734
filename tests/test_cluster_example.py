"""docs/examples/cluster_nuclei.py, the README's Python example: it picks the QuPath
measurements of nuclei.parquet by name, clusters them on a common scale, and plots."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.writers.cells import CELL_COLUMNS
from pipeline.writers.table import COLUMNS, MEASUREMENT_COLUMNS, PROBABILITY

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "cluster_nuclei.py"
SEPARATING = ("Area µm^2", "Circularity", "Hematoxylin: Mean", "Eosin: Mean")


def load_example():
    spec = importlib.util.spec_from_file_location("cluster_nuclei", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses/typing look the module up by name
    spec.loader.exec_module(module)
    return module


ex = load_example()


def two_populations(n_big: int = 300, n_small: int = 100, seed: int = 1) -> tuple[pd.DataFrame, np.ndarray]:
    """A table with every column a run writes: two populations 8 standard deviations apart
    in four features, noise elsewhere, and one noise feature (Length µm) whose scale is 1000
    times larger, which would decide the clusters if features were not standardised."""
    rng = np.random.default_rng(seed)
    truth = np.r_[np.zeros(n_big, int), np.ones(n_small, int)]
    rng.shuffle(truth)
    n = len(truth)
    table = pd.DataFrame({name: rng.normal(size=n) for name in COLUMNS})
    table["id"] = np.arange(1, n + 1)
    for name in SEPARATING:
        table[name] += 8.0 * truth
    table["Length µm"] = rng.normal(scale=1000.0, size=n)
    return table, truth


def test_feature_names_are_the_shape_and_stain_measurements() -> None:
    table, _ = two_populations()
    names = ex.feature_names(list(table.columns))
    # every QuPath measurement except the probability (a model's confidence, not the nucleus)
    assert set(names) == set(MEASUREMENT_COLUMNS) - {PROBABILITY}
    assert len(names) == 22
    with_cells = ex.feature_names([*table.columns, *CELL_COLUMNS])
    assert set(with_cells) - set(names) == set(ex.CELL) and set(ex.CELL) <= set(CELL_COLUMNS)
    with pytest.raises(ValueError, match="no QuPath measurements"):
        ex.feature_names(["id", "centroid_x_px"])


def test_two_separated_populations_are_two_clusters() -> None:
    table, truth = two_populations()
    kept, labels, _ = ex.analyse(table, k=2, seed=0)
    assert len(kept) == len(table)
    # clusters are numbered by size: the 300 are cluster 0, the 100 cluster 1, nucleus for nucleus
    np.testing.assert_array_equal(labels, truth)
    means = ex.summary(kept, labels)
    assert means["nuclei"].tolist() == [300, 100]
    assert means.loc[1, "Area µm^2"] - means.loc[0, "Area µm^2"] > 7


def test_without_standardising_the_large_noise_feature_would_win() -> None:
    """The test above has teeth: on the raw values k-means splits by the noise."""
    table, truth = two_populations()
    names = ex.feature_names(list(table.columns))
    raw = ex.cluster(table[names].to_numpy(float), k=2, seed=0)
    agreement = max(np.mean(raw == truth), np.mean(raw != truth))
    assert agreement < 0.8


def test_same_seed_same_clusters_and_rows_with_missing_values_left_out() -> None:
    table, _ = two_populations()
    table.loc[[3, 7], "Eosin: Mean"] = np.nan
    table.loc[11, "Solidity"] = np.inf
    kept, labels, _ = ex.analyse(table, k=3, seed=5)
    assert len(kept) == len(table) - 3 and not kept["id"].isin(table["id"][[3, 7, 11]]).any()
    _, again, _ = ex.analyse(table, k=3, seed=5)
    np.testing.assert_array_equal(labels, again)
    assert sorted(set(labels)) == [0, 1, 2]
    assert np.all(np.diff(np.bincount(labels)) <= 0)  # numbered largest first


def test_principal_components_find_the_separating_direction() -> None:
    table, truth = two_populations()
    names = ex.feature_names(list(table.columns))
    pcs, share = ex.principal_components(ex.standardise(table[names].to_numpy(float)))
    assert pcs.shape == (len(table), 2) and share[0] > share[1] > 0
    gap = abs(pcs[truth == 1, 0].mean() - pcs[truth == 0, 0].mean())
    assert gap > 5 * pcs[truth == 0, 0].std()


def test_main_prints_the_clusters_and_writes_the_picture(tmp_path: Path, capsys) -> None:
    table, _ = two_populations()
    slide = tmp_path / "slide"
    slide.mkdir()
    table.to_parquet(slide / "nuclei.parquet")
    assert ex.main([str(slide), "--k", "2"]) == 0  # without --out: no matplotlib needed
    out = capsys.readouterr().out
    assert "400 nuclei, 22 features" in out and "300" in out and "100" in out

    pytest.importorskip("matplotlib")
    png = tmp_path / "pics" / "clusters.png"
    assert ex.main([str(slide / "nuclei.parquet"), "--k", "2", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
