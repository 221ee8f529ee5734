"""How close the slide pipeline runs to its compute and I/O limits, and which tile size.

On one slide, for each tile size, side by side in one run (same process, same torch
threads, same tile windows):

* reading only: ``read_region`` of every window the pipeline reads (tiles with tissue);
* model only: ``predict_batch`` on those windows, already in memory;
* end to end: ``process_slide`` with the ``SerialExecutor`` (tissue mask, reading, model,
  exact stitching, polygons, label store, table, GeoJSON, preview, summary).

Each is reported as Mpx of *tissue* per second (tissue area of the slide's tissue mask at
model resolution, divided by the time to get through the whole slide), so the ratios
pipeline : model (how much of the network's speed survives the rest of the pipeline) and
reading : model (how much faster I/O is than the network; > 1 means I/O is not the limit)
compare like with like. The halo overhead (window px / core px of the tiles actually run)
explains most of the tile-size effect.

    python -m bench.pipeline_throughput                      # 2048^2 synthetic TIFF, dense.pt
    python -m bench.pipeline_throughput --slide scan.svs --tile-sizes 1024
    python -m bench.pipeline_throughput --cluster            # also through a LocalCluster
    python -m bench.pipeline_throughput --quick              # < 1 min, hand-set tiny model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import (
    Stopwatch,
    default_json,
    headline,
    quiet_logs,
    run_info,
    scratch,
    set_threads,
    synthetic_tiff,
    tiny_checkpoint,
    write_json,
)

NAME = "pipeline_throughput"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=None,
                        help="slide file (default: a synthetic pyramidal TIFF, --side px at 0.25 µm/px)")
    parser.add_argument("--side", type=int, default=2048, help="side of the synthetic slide")
    parser.add_argument("--model", default="dense.pt")
    parser.add_argument("--tile-sizes", type=int, nargs="+", default=[512, 1024, 1536])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the machine is shared; 0 = torch default)")
    parser.add_argument("--cluster", action="store_true",
                        help="also run end to end through a LocalCluster (default tile size)")
    parser.add_argument("--workers", type=int, default=None, help="LocalCluster workers")
    parser.add_argument("--quick", action="store_true", help="small slide, tiny model (< 1 min)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep outputs in this folder")
    return parser.parse_args(argv)


def tissue_mpx(plan: Any) -> float:
    """Tissue area in Mpx at model resolution (the unit all throughputs share)."""
    side = plan.tissue.level0_per_pixel / plan.plan.scale  # model px per mask px
    return float(plan.tissue.mask.sum()) * side**2 / 1e6


def warm_imports() -> None:
    """Import what the pipeline's later phases import lazily, so that the first tile size
    measured does not pay for it (one-off costs are not throughput)."""
    from pipeline.cluster.plugin import import_task_modules

    import_task_modules()


def halo_overhead(plan: Any) -> dict[str, float]:
    """Window px / core px over the tiles that run, and for an interior tile."""
    tiles = plan.tiles
    window = sum(t.window.height * t.window.width for t in tiles)
    core = sum(t.core.height * t.core.width for t in tiles)
    size = tiles[0].core.height if tiles else 0
    nominal = ((size + 2 * plan.halo) / size) ** 2 if size else float("nan")
    return {"window_mpx": window / 1e6, "core_mpx": core / 1e6,
            "overhead": window / core if core else float("nan"), "nominal_overhead": nominal}


def measure_reads(path: str, plan: Any, bar: tqdm) -> tuple[float, list[np.ndarray]]:
    """Seconds to read every window (the reader is opened as a tile task would)."""
    from pipeline.slide.open import open_slide
    from pipeline.slide.region import read_region

    windows = []
    with Stopwatch() as t, open_slide(path) as reader:
        for tile in plan.tiles:
            windows.append(read_region(reader, plan.plan, tile.window))
            bar.update()
    return t.seconds, windows


def measure_model(net: Any, windows: list[np.ndarray], batch: int, bar: tqdm) -> float:
    """Seconds of ``predict_batch`` over the windows (batches as the pipeline makes)."""
    from models.inference import predict_batch

    predict_batch(net, windows[0][None])  # warm-up (first-call allocations)
    with Stopwatch() as t:
        for i in range(0, len(windows), batch):
            predict_batch(net, np.stack(windows[i:i + batch]))
            bar.update(len(windows[i:i + batch]))
    return t.seconds


def run_end_to_end(path: str, cfg: Any, executor: Any, bar: tqdm) -> dict[str, Any]:
    """One ``process_slide``; wall time and the summary's per-phase timings."""
    import json

    from pipeline.run import process_slide

    start = bar.n

    def progress(done: int, total: int) -> None:
        bar.n = start + done
        bar.refresh()

    with Stopwatch() as t:
        outcome = process_slide(path, cfg, executor, progress)
    if outcome.status != "done":
        raise RuntimeError(f"process_slide failed: {outcome.error}")
    summary = json.loads((Path(outcome.out_dir) / "summary.json").read_text())
    return {"seconds": t.seconds, "nuclei": outcome.nuclei, "phases_s": summary["timings_s"],
            "tiles": summary["tiles_processed"], "tiles_total": summary["tiles_total"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    quiet_logs()
    threads = set_threads(args.threads)
    info = run_info(NAME, argv, threads)  # date and load at the start
    from pipeline.cluster import get_worker_model
    from pipeline.slide_run.config import RunConfig
    from pipeline.slide_run.executors import SerialExecutor
    from pipeline.slide_run.plan import PrepareJob, prepare_slide

    with scratch("bench-throughput-", args.keep) as work:
        side, tile_sizes, model = args.side, args.tile_sizes, args.model
        if args.quick:
            side, tile_sizes = 768, [256, 512]
            model = str(tiny_checkpoint(work))
        slide = str(args.slide or synthetic_tiff(work / f"synthetic-{side}.tif", side))
        bundle = get_worker_model(model, "cpu")
        warm_imports()
        defaults = RunConfig()
        plans = {ts: prepare_slide(PrepareJob(slide, None, model, "cpu", True, ts,
                                              defaults.cluster_margin)) for ts in tile_sizes}
        tissue = tissue_mpx(next(iter(plans.values())))
        total = sum(3 * len(p.tiles) for p in plans.values())
        rows: dict[int, dict[str, Any]] = {}
        with tqdm(total=total, desc="tiles (read, model, pipeline)", unit="tile",
                  file=sys.stderr) as bar:
            for ts, plan in plans.items():  # read, model, pipeline adjacent in time
                read_s, windows = measure_reads(slide, plan, bar)
                model_s = measure_model(bundle.net, windows, defaults.batch_size, bar)
                del windows
                cfg = RunConfig(model=model, out=str(work / f"out-{ts}"), tile_size=ts,
                                overwrite=True, device="cpu")
                e2e = run_end_to_end(slide, cfg, SerialExecutor(), bar)
                rows[ts] = {"tiles": len(plan.tiles), **halo_overhead(plan),
                            "read_s": read_s, "model_s": model_s, "pipeline_s": e2e["seconds"],
                            "read_mpx_s": tissue / read_s, "model_mpx_s": tissue / model_s,
                            "pipeline_mpx_s": tissue / e2e["seconds"],
                            "pipeline_vs_model": model_s / e2e["seconds"],
                            "read_vs_model": model_s / read_s,
                            "model_window_mpx_s": halo_overhead(plan)["window_mpx"] / model_s,
                            "phases_s": e2e["phases_s"], "nuclei": e2e["nuclei"]}
        ref = defaults.tile_size if defaults.tile_size in rows else tile_sizes[0]
        cluster = run_cluster(args, slide, model, work, threads, ref) if args.cluster else None

    print(f"slide {slide}: {tissue:.2f} Mpx of tissue at model resolution, "
          f"{threads} torch thread(s)")
    print("Mpx of tissue / s, except 'model win' = Mpx of windows / s; win/core: this slide "
          "(interior tile)")
    print(f"{'tile':>6}{'tiles':>7}{'win/core':>14}{'model win':>11}{'read':>9}{'model':>9}{'pipeline':>10}"
          f"{'pipe:model':>12}{'read:model':>12}   phases (s)")
    for ts, r in rows.items():
        phases = " ".join(f"{k[:-2]} {v:.1f}" for k, v in r["phases_s"].items())
        ratio = f"{r['overhead']:.2f} ({r['nominal_overhead']:.2f})"
        print(f"{ts:>6}{r['tiles']:>7}{ratio:>14}{r['model_window_mpx_s']:>11.3f}{r['read_mpx_s']:>9.2f}"
              f"{r['model_mpx_s']:>9.3f}{r['pipeline_mpx_s']:>10.3f}{r['pipeline_vs_model']:>12.2f}"
              f"{r['read_vs_model']:>12.1f}   {phases}")
    if cluster:
        print(f"LocalCluster ({cluster['workers']} workers x {cluster['torch_threads']} torch "
              f"threads), tile {cluster['tile_size']}: {tissue / cluster['seconds']:.3f} Mpx/s "
              f"({cluster['seconds']:.1f} s, start-up excluded)")
    best = max(rows, key=lambda ts: rows[ts]["pipeline_mpx_s"])
    r = rows[ref]
    summary = {**info, "slide": slide, "model": model,
               "tissue_mpx": tissue, "tile_sizes": {str(k): v for k, v in rows.items()},
               "reference_tile_size": ref, "best_tile_size": best, "cluster": cluster}
    summary["headline"] = headline(
        f"tile {ref}: pipeline {r['pipeline_mpx_s']:.3f} Mpx/s = {r['pipeline_vs_model']:.2f} x model-only; "
        f"reading {r['read_vs_model']:.1f} x faster than the model; fastest end to end: tile {best} "
        f"({rows[best]['pipeline_mpx_s'] / r['pipeline_mpx_s']:.2f} x tile {ref})")
    summary["wall_s"] = time.perf_counter() - started
    write_json(args.json or default_json(NAME, args.quick), summary)
    return summary


def run_cluster(args: argparse.Namespace, slide: str, model: str, work: Path, threads: int,
                tile_size: int) -> dict[str, Any]:
    """End to end through a LocalCluster (start-up excluded); each worker gets ``threads``
    torch threads, so this uses workers x threads cores, not the serial run's."""
    from pipeline.cluster import ClusterConfig, open_client, register_model
    from pipeline.slide_run.config import RunConfig
    from pipeline.slide_run.executors import DaskExecutor

    config = ClusterConfig(kind="local", n_workers=args.workers, torch_threads=threads,
                           dashboard_address=None, device="cpu")
    layout = config.layout()
    cfg = RunConfig(model=model, out=str(work / "out-cluster"), tile_size=tile_size, overwrite=True,
                    device="cpu")
    with open_client(config, wait_for_workers=layout.n_workers, timeout=120) as client:
        register_model(client, model, config, device="cpu")
        t0 = time.perf_counter()
        with tqdm(desc="LocalCluster", unit="tile", file=sys.stderr) as bar:
            e2e = run_end_to_end(slide, cfg, DaskExecutor(client), bar)
        e2e["seconds"] = time.perf_counter() - t0
    return {"workers": layout.n_workers, "torch_threads": layout.torch_threads,
            "tile_size": cfg.tile_size, **e2e}


if __name__ == "__main__":
    main()
