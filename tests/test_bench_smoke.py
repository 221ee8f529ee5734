"""The benchmarks' ``--quick`` modes run end to end, so the scripts do not rot.

Nothing here asserts a time or a ratio's value (the CI machine's load decides those):
only that each benchmark finishes, prints its ``headline:`` line and writes the JSON keys
that ``bench/README.md`` documents. Quick modes use a hand-set tiny model, so they need
neither ``models/weights`` nor a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def _run(main: Callable[[list[str]], dict[str, Any]], argv: list[str],
         capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    summary = main(argv)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("headline: ")]
    assert len(lines) == 1, out
    return summary, lines[0][len("headline: "):]


def _json(path: Path, keys: set[str]) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert keys <= set(data), sorted(keys - set(data))
    return data


def test_pipeline_throughput_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.pipeline_throughput import main

    summary, text = _run(main, ["--quick", "--json", str(tmp_path / "t.json")], capsys)
    data = _json(tmp_path / "t.json", {"headline", "tissue_mpx", "tile_sizes", "best_tile_size",
                                        "reference_tile_size", "command", "date"})
    assert data["headline"] == summary["headline"] == text
    assert "x model-only" in text
    for row in data["tile_sizes"].values():
        assert {"read_mpx_s", "model_mpx_s", "pipeline_mpx_s", "pipeline_vs_model", "read_vs_model",
                "overhead", "phases_s"} <= set(row)
        assert row["overhead"] > 1 and row["tiles"] > 0


@pytest.mark.slow
def test_scaling_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.scaling import main

    _, text = _run(main, ["--quick", "--json", str(tmp_path / "s.json")], capsys)
    data = _json(tmp_path / "s.json", {"headline", "baseline", "extent_series", "tissue_series",
                                        "tissue_fit", "rss_ratio_largest_smallest", "extent_ratio"})
    assert "peak RSS" in text
    assert data["extent_ratio"] == pytest.approx(16.0)
    for row in data["extent_series"] + data["tissue_series"]:
        assert row["peak_rss_mib"] > 0 and row["tiles"] >= 1 and row["nuclei"] > 0


@pytest.mark.slow
def test_workers_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.workers import main

    _, text = _run(main, ["--quick", "--json", str(tmp_path / "w.json")], capsys)
    data = _json(tmp_path / "w.json", {"headline", "part_a", "part_b"})
    assert "throughput" in text and "client RSS" in text
    assert set(data["part_a"]["layouts"]) == {"1x2", "2x1"}
    assert {"slides", "queue_bounded", "queue_unbounded"} <= set(data["part_b"])


@pytest.mark.slow
def test_batch_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Slides overlapping: the task stream is read, every worker is accounted for."""
    from bench.batch import main

    out = main(["--quick", "--json", str(tmp_path / "b.json")])
    runs = out["runs"]
    assert set(runs) == {"1", "4"}
    for r in (runs["1"][0], runs["4"][0]):
        assert 0 < r["utilisation"] <= 1.0 and r["nuclei"] >= 0 and r["seconds"] > 0
    assert "slides at once" in capsys.readouterr().out


@pytest.mark.slow
def test_batch_one_run_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Small slides in one wsi-nuclei run, and one slide of their total area: both finish,
    spans within the process times, an overhead per slide."""
    from bench.batch import main

    out = main(["--one-run", "--quick", "--cluster", "none", "--json", str(tmp_path / "b.json")])
    assert set(out["runs"]) == {"batch", "reference"} and out["runs"]["batch"]["slides"] == 4
    for r in out["runs"].values():
        assert 0 < r["span_s"] <= r["process_s"] and r["tissue_mm2"] > 0 and r["nuclei"] > 0
    assert "per_slide_overhead_s" in out and "per-slide overhead" in capsys.readouterr().out


def test_batch_span_leaves_out_start_up(tmp_path: Path) -> None:
    """A run's span: first slide's start (its summary's mtime - seconds) to the last's end."""
    import os

    from bench.batch import slides_span

    summaries = []
    for name, end, seconds in (("a", 1000.0, 4.0), ("b", 1003.0, 5.0), ("c", 1010.0, 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text("{}")
        os.utime(tmp_path / name / "summary.json", (end, end))
        summaries.append({"out_dir": str(tmp_path / name), "seconds": seconds})
    assert slides_span(summaries) == pytest.approx(1010.0 - 996.0)


@pytest.mark.slow
def test_pyramid_speed_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both ways build every level, from a level 0 with labels, and agree."""
    from bench.pyramid_speed import main

    summary, text = _run(main, ["--quick", "--json", str(tmp_path / "p.json")], capsys)
    data = _json(tmp_path / "p.json", {"headline", "median_s", "speedup_blocks_vs_levels", "levels"})
    assert data["identical"] is True and summary["labels"] > 1000
    assert len(data["levels"]) >= 4 and set(data["median_s"]) == {"level_by_level", "by_blocks"}
    assert "identical levels" in text


def test_accuracy_speed_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.accuracy_speed import default_data, main

    argv = ["--quick", "--json", str(tmp_path / "a.json"), "--png", str(tmp_path / "a.png")]
    _, text = _run(main, argv, capsys)
    if not (default_data() / "images").is_dir():
        assert text.startswith("skipped:")
        _json(tmp_path / "a.json", {"headline", "skipped"})
        return
    data = _json(tmp_path / "a.json", {"headline", "models", "images", "png"})
    assert len(data["images"]) == 2 and (tmp_path / "a.png").stat().st_size > 0
    for row in data["models"].values():
        assert 0 <= row["aji"] <= 1 and row["model_mpx_s"] > 0


def test_accuracy_speed_skips_without_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.accuracy_speed import main

    _, text = _run(main, ["--quick", "--data", str(tmp_path / "none"), "--json", str(tmp_path / "a.json")],
                   capsys)
    assert text.startswith("skipped:") and "skipped" in json.loads((tmp_path / "a.json").read_text())


def test_model_speed_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.model_speed import main

    _, text = _run(main, ["--quick", "--json", str(tmp_path / "m.json")], capsys)
    assert "tiny-thin : tiny-dense" in text
    data = _json(tmp_path / "m.json", {"results", "threads", "size", "runtimes", "reference",
                                        "command", "date", "headline"})
    # the reference, its layer-wise and global 80 % copies, the thin model; both runtimes each
    assert len(data["results"]) == 4
    for name, row in data["results"].items():
        assert set(row["runtimes"]) == {"eager", "eager-bn", "eager-nchw", "torchscript"}
        assert row["runtimes"]["torchscript"]["max_abs_diff_vs_eager"] < 1e-3, name
        assert row["runtimes"]["eager-bn"]["max_abs_diff_vs_eager"] < 1e-4, name  # BN folding
    pruned = [r for n, r in data["results"].items() if "80%" in n]
    assert all(r["nonzero_parameters"] < 0.3 * r["parameters"] for r in pruned)


def test_runtime_speed_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for module in ("onnx", "onnxruntime", "openvino"):  # the optional extras [onnx,openvino]
        pytest.importorskip(module)
    from bench.runtime_speed import RUNTIMES, main, missing_packages

    _, text = _run(main, ["--quick", "--json", str(tmp_path / "r.json")], capsys)
    assert text.startswith("fastest runtime within 1 % AJI of torch (2 images): tiny.pt ")
    data = _json(tmp_path / "r.json", {"headline", "results", "runtimes", "skipped", "threads", "size",
                                        "images", "int8", "versions", "command", "date"})
    installed = [rt for rt in RUNTIMES if not missing_packages(rt)]  # int8 also needs nncf
    assert data["runtimes"] == installed and set(data["skipped"]) == set(RUNTIMES) - set(installed)
    (row,) = data["results"].values()
    rows = row["runtimes"]
    assert set(rows) == set(installed) and row["fastest_within_bar"] in rows
    for rt in ("onnxruntime", "openvino"):  # FP32: the same network to float rounding
        assert rows[rt]["max_abs_diff_prob"] < 1e-4 and rows[rt]["max_abs_diff_dist"] < 1e-4, rt
        assert rows[rt]["aji"] == pytest.approx(rows["torch"]["aji"], abs=1e-3), rt
    for rt, r in rows.items():
        assert r["model_mpx_s"] > 0 and 0 <= r["aji"] <= 1 and "delta_aji_pct" in r, rt


def test_postprocess_speed_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.postprocess_speed import main

    summary, text = _run(main, ["--quick", "--json", str(tmp_path / "p.json")], capsys)
    data = _json(tmp_path / "p.json", {"headline", "results", "crops", "phases", "repeats", "command",
                                        "date"})
    assert data["headline"] == summary["headline"] == text
    assert "ms/nucleus" in text and "B/nucleus" in text
    for res in ("40x", "20x"):
        row = data["results"][res]
        assert row["nuclei"] > 0 and row["bytes_per_nucleus_new"] > 0
        for clock in ("cpu", "wall"):
            ms = row[f"ms_per_nucleus_{clock}"]
            assert set(ms["old"]) == set(ms["new"]) == {*data["phases"], "total"}
            assert row[f"speedup_{clock}"]["total"] > 0
        assert row["outline_area_vs_label_area"]["mean_abs_rel_diff"] < 0.05


@pytest.mark.slow
def test_slide_speed_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.slide_speed import LATER, PHASES, main

    summary, text = _run(main, ["--quick", "--cluster", "none", "--json", str(tmp_path / "s.json")], capsys)
    data = _json(tmp_path / "s.json", {"headline", "runs", "tissue_mm2", "tiles_placed", "cluster",
                                        "anchors_s_per_mm2", "command", "date"})
    assert data["headline"] == summary["headline"] == text and "s/mm² of tissue" in text
    assert {r["mag"] for r in data["runs"]} == {20, 40} and data["tissue_mm2"] > 0
    for row in data["runs"]:
        assert row["s_per_mm2"] > 0 and row["nuclei"] > 0 and 0 <= row["slide_aji"] <= 1
        phases = row["phase_s_per_mm2"]
        assert set(phases) == {*PHASES, *LATER} and phases["network"] > 0
        assert phases["cells"] == phases["cells 1b"] == 0  # no --cell-expansion
        assert sum(phases[k] for k in PHASES) <= 2 * row["s_per_mm2"]  # worker-seconds, 1 process


def test_slide_speed_copies_place_every_tile_apart(tmp_path: Path) -> None:
    """``--copies N`` (default 4, quick 1): every tile placed N times, none overlapping, the
    truth holding every copy's nuclei under their own ids."""
    import tifffile

    from bench.slide_speed import build_mosaics, parse_args, quick_folder

    assert parse_args([]).copies == [4] and parse_args(["--quick"]).copies == [1]
    folder = quick_folder(tmp_path / "tiles")
    per_tile = sum(int(tifffile.imread(p).max()) for p in (folder / "labels").glob("*.tif"))
    _, truth, placements = build_mosaics(folder, tmp_path, [20], seed=5, quick=True, copies=3)
    assert len(placements) == 12
    cover = np.zeros(truth.shape, np.int32)
    for _, y, x, h, w in placements:
        cover[y:y + h, x:x + w] += 1
    assert cover.max() == 1
    assert len(np.unique(truth[truth > 0])) == 3 * per_tile


def test_slide_speed_fits_fixed_cost_and_rate() -> None:
    """``seconds = fixed + rate x mm²`` per magnification and model, over its tissue areas;
    none where a model ran at one size only."""
    from bench.slide_speed import fit_fixed_rate

    rows = [{"mag": 20, "model": "m.pt", "copies": c, "tissue_mm2": 0.875 * c,
             "seconds": 1.5 + 2.5 * 0.875 * c} for c in (1, 4, 16)]
    rows.append({"mag": 40, "model": "m.pt", "copies": 1, "tissue_mm2": 0.875, "seconds": 9.0})
    (fit,) = fit_fixed_rate(rows)
    assert (fit["mag"], fit["copies"]) == (20, [1, 4, 16])
    assert fit["fixed_s"] == pytest.approx(1.5) and fit["rate_s_per_mm2"] == pytest.approx(2.5)


def test_gpu_check_quick_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CUDA check's own machinery, on the CPU: the pipeline's tiling and stitching give
    the whole-image labels, and the float outputs agree to rounding."""
    from bench.gpu_check import main

    summary, text = _run(main, ["--device", "cpu", "--quick", "--json", str(tmp_path / "g.json")], capsys)
    data = _json(tmp_path / "g.json", {"headline", "exact", "tile_sizes", "whole_image", "device",
                                        "gpu_utilisation_source", "command", "date"})
    assert data["headline"] == summary["headline"] == text and "tiled == whole" in text
    assert data["exact"] is True and data["whole_image"]["nuclei"] > 0
    assert data["deterministic_flags_set"] is False  # not on a CPU
    for row in data["tile_sizes"].values():
        assert row["same_labels"] and row["painted_twice"] == 0 and row["tiles"] > 1
        assert row["nuclei"] == data["whole_image"]["nuclei"] and row["max_abs_dprob"] < 1e-4
        assert row["network_mpx_s"] > 0 and row["tiles_s"] > 0 and row["end_to_end_mpx_s"] > 0
    assert max(row["window_shapes"] for row in data["tile_sizes"].values()) > 1


def test_gpu_check_runs_without_dask(tmp_path: Path) -> None:
    """bench.gpu_check must run on a GPU machine that has only torch, numpy, scipy,
    scikit-image and tifffile: with the pipeline's other dependencies made unimportable it
    still runs (here, without CUDA: the skip message, exit 0)."""
    import subprocess
    import sys

    import torch

    blocked = ["dask", "distributed", "dask_jobqueue", "zarr", "openslide", "shapely", "pandas",
               "pyarrow", "anndata", "tqdm", "psutil", "yaml"]
    argv = ["--device", "cpu", "--quick", "--tiles", "128"] if torch.cuda.is_available() else []
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({blocked!r})); "
            f"sys.argv = ['gpu_check', *{argv!r}, '--json', {str(tmp_path / 'g.json')!r}]; "
            "runpy.run_module('bench.gpu_check', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = "tiled == whole" if argv else "headline: no CUDA device: skipped"
    assert expected in proc.stdout, proc.stdout


def test_blob_memory_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both tile paths run on slides with one large blob and agree tile by tile."""
    from bench.blob_memory import main

    summary, text = _run(main, ["--quick", "--json", str(tmp_path / "b.json")], capsys)
    data = _json(tmp_path / "b.json", {"headline", "blobs", "tile", "same_results", "command", "date"})
    assert data["headline"] == summary["headline"] == text and "predict -> segment" in text
    assert data["same_results"] is True
    for row in data["blobs"]:
        assert row["tiles_recomputing"] > 0 and row["nuclei"] >= 1
        assert set(row["peak_heap_mib"]) == {"read", "predict", "segment", "one_task"}
        assert row["shipped_mib"]["owner"] > 0 and row["shipped_mib"]["total"] >= row["shipped_mib"]["max"]


def test_stain_norm_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.stain_norm import main

    _, text = _run(main, ["--quick", "--json", str(tmp_path / "s.json")], capsys)
    data = _json(tmp_path / "s.json", {"headline", "seconds", "seconds_per_mm2_at_0.5um", "command"})
    assert set(data["seconds"]) == {"256"} and data["seconds_per_mm2_at_0.5um"] > data["seconds"]["256"]
    assert "per mm²" in text


def test_slide_speed_compares_variants_pairwise_by_repeat() -> None:
    """``--variants A B --repeats N``: per variant the median s/mm² and the median of its
    ratio to the first variant's run of the same repeat (not to the first's median)."""
    from bench.slide_speed import compare_variants, parse_args

    args = parse_args(["--variants", "", "--cell-expansion 5", "--repeats", "3"])
    assert args.variants == ["", "--cell-expansion 5"] and args.repeats == 3
    phases = {"network": 1.0}
    rows = [{"mag": 20, "model": "m.pt", "copies": 4, "tissue_mm2": 3.5, "variant": v, "repeat": r,
             "s_per_mm2": s, "phase_s_per_mm2": phases}
            for r, (a, b) in enumerate([(8.0, 10.0), (10.0, 11.0), (7.0, 9.1)])
            for v, s in (("", a), ("-c", b))]
    first, second = compare_variants(rows, ["", "-c"])
    assert (first["median_s_per_mm2"], first["median_ratio"]) == (8.0, 1.0)
    assert second["median_s_per_mm2"] == 10.0 and second["ratios"] == pytest.approx([1.25, 1.1, 1.3])
    assert second["median_ratio"] == 1.25  # paired: not 10.0 / 8.0 by accident of the medians alone
    assert second["index"] == 1 and second["repeats"] == 3
