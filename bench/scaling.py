"""Memory and time against slide size: the pipeline must scale with tissue, not extent.

Two series of procedural slides (``bench.common.IslandPixels``: a few synthetic H&E
islands on glass, free to generate everywhere else), each slide processed end to end by
``process_slide`` + ``SerialExecutor`` in a *fresh child process*, whose own peak RSS the
kernel reports (``os.wait4``):

* extent series: ~1, 4 and 16 gigapixels holding the same 4 islands. Peak RSS must stay
  flat (headline: 16 Gpx / 1 Gpx) and time should stay flat too, since the tissue is
  the same; per-phase times show where extent still costs.
* tissue series: one small slide with 1x, 2x, 4x the islands; time should grow linearly
  with tissue (slope in s per Mpx of tissue, intercept = per-slide fixed cost).

A baseline child (imports + model load, no slide) gives the RSS floor. In the serial
executor the child is both client and worker, so its peak is an upper bound for a worker.

    python -m bench.scaling                       # ~1/4/16 Gpx + 1x/2x/4x tissue, dense.pt
    python -m bench.scaling --sides 32768 65536   # fewer sizes
    python -m bench.scaling --quick               # < 1 min, tiny slides, hand-set tiny model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import (
    default_json,
    headline,
    island_slide,
    mib,
    peak_rss_self,
    quiet_logs,
    run_child,
    run_info,
    scratch,
    set_threads,
    tiny_checkpoint,
    write_json,
)

NAME = "scaling"
MODULE = f"bench.{NAME}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dense.pt")
    parser.add_argument("--sides", type=int, nargs="+", default=[32768, 65536, 131072],
                        help="slide sides (px at 0.25 µm/px) of the extent series")
    parser.add_argument("--islands", type=int, default=4, help="islands on every extent-series slide")
    parser.add_argument("--island", type=int, default=896, help="island side, px (< tile - 128)")
    parser.add_argument("--tissue-side", type=int, default=8192, help="slide side of the tissue series")
    parser.add_argument("--tissue-islands", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="per child, seconds")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    # internal: what a child process runs
    parser.add_argument("--child", choices=["baseline", "run"], help=argparse.SUPPRESS)
    parser.add_argument("--child-side", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-islands", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; results go to ``--child-json``."""
    quiet_logs()
    set_threads(args.threads)
    from pipeline.cluster import get_worker_model
    from pipeline.run import process_slide
    from pipeline.slide.open import register_memory_slide
    from pipeline.slide_run.config import RunConfig
    from pipeline.slide_run.executors import SerialExecutor

    get_worker_model(args.model, "cpu")
    result: dict[str, Any] = {}
    if args.child == "run":
        slide = island_slide(args.child_side, args.child_islands, args.island)
        path = register_memory_slide(slide)
        with scratch("bench-scaling-") as out:
            cfg = RunConfig(model=args.model, out=str(out), tile_size=args.tile, overwrite=True,
                            device="cpu")
            outcome = process_slide(path, cfg, SerialExecutor())
            if outcome.status != "done":
                raise SystemExit(f"{path}: {outcome.error}")
            s = json.loads((Path(outcome.out_dir) / "summary.json").read_text())
        side = args.child_side
        result = {"side": side, "gpx": side * side / 1e9, "islands": args.child_islands,
                  "tissue_mpx": args.child_islands * args.island**2 / 1e6, "seconds": outcome.seconds,
                  "phases_s": s["timings_s"], "tiles": s["tiles_processed"],
                  "tiles_total": s["tiles_total"], "label_blocks": s["label_blocks"],
                  "nuclei": s["nuclei"]}
    else:  # baseline: everything a run imports and the model, no slide
        from pipeline.cluster.plugin import import_task_modules

        import_task_modules()
    result["peak_rss_self"] = peak_rss_self()
    args.child_json.write_text(json.dumps(result))


# --------------------------------------------------------------------------- parent


def measure(args: argparse.Namespace, model: str, kind: str, side: int = 0,
            islands: int = 0) -> dict[str, Any]:
    """Run one child and merge what it reported with its kernel-measured peak RSS."""
    cmd = ["--child", kind, "--model", model, "--threads", str(args.threads), "--tile", str(args.tile),
           "--island", str(args.island), "--child-side", str(side), "--child-islands", str(islands)]
    res = run_child(MODULE, cmd, timeout=args.timeout)
    if res.returncode != 0:
        raise RuntimeError(f"child {kind} {side} px x {islands} islands failed "
                           f"(exit {res.returncode}; see its stderr above)")
    return {**res.data, "peak_rss_mib": mib(res.peak_rss), "child_wall_s": res.seconds}


def linear_fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Least squares ``y = intercept + slope x`` and its r^2 (time vs tissue)."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(xs, ys, 1)
    pred = intercept + slope * xs
    ss = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1.0 - float(((ys - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    return {"slope_s_per_mpx": float(slope), "intercept_s": float(intercept), "r2": r2}


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    print(f"{'slide Gpx':>10}{'tissue Mpx':>11}{'tiles':>7}{'blocks':>8}{'run s':>8}{'prepare':>9}"
          f"{'infer':>8}{'labels':>8}{'outputs':>9}{'peak RSS MiB':>14}")
    for r in rows:
        p = r["phases_s"]
        print(f"{r['gpx']:>10.3f}{r['tissue_mpx']:>11.2f}{r['tiles']:>7}{r['label_blocks']:>8}"
              f"{r['seconds']:>8.1f}{p['prepare_s']:>9.1f}{p['inference_s']:>8.1f}{p['labels_s']:>8.1f}"
              f"{p['outputs_s']:>9.1f}{r['peak_rss_mib']:>14.0f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    quiet_logs()
    threads = set_threads(args.threads)
    info = run_info(NAME, argv, threads)  # date and load at the start
    sides, tissue_side, tissue_islands, islands = (args.sides, args.tissue_side, args.tissue_islands,
                                                   args.islands)
    with scratch("bench-scaling-") as work:
        model = args.model
        if args.quick:
            sides, tissue_side, tissue_islands, islands = [4096, 16384], 4096, [1, 2], 1
            args.island = 512
            model = str(tiny_checkpoint(work))
        jobs = ([("baseline", 0, 0)] + [("run", s, islands) for s in sides]
                + [("run", tissue_side, n) for n in tissue_islands])
        results = []
        for kind, side, n in tqdm(jobs, desc="slides (one child each)", unit="slide", file=sys.stderr):
            results.append(measure(args, model, kind, side, n))
    baseline, extent, tissue = results[0], results[1:1 + len(sides)], results[1 + len(sides):]

    print(f"baseline (imports + model, no slide): peak RSS {baseline['peak_rss_mib']:.0f} MiB; "
          f"{threads} torch thread(s), tile {args.tile}")
    print_rows(f"extent series: {islands} island(s) of {args.island}^2 px on every slide", extent)
    print_rows(f"tissue series: {tissue_side}^2 px slide", tissue)
    small, big = extent[0], extent[-1]
    fit = linear_fit([r["tissue_mpx"] for r in tissue], [r["seconds"] for r in tissue])
    print(f"time vs tissue: {fit['slope_s_per_mpx']:.2f} s per Mpx of tissue + {fit['intercept_s']:.1f} s "
          f"per slide (r^2 {fit['r2']:.3f})")
    rss_ratio = big["peak_rss_mib"] / small["peak_rss_mib"]
    time_ratio = big["seconds"] / small["seconds"]
    slow = max(big["phases_s"], key=big["phases_s"].get)
    share = big["phases_s"][slow] / big["seconds"]
    tissue_time = tissue[-1]["seconds"] / tissue[0]["seconds"]
    tissue_x = tissue[-1]["tissue_mpx"] / tissue[0]["tissue_mpx"]
    summary = {**info, "model": args.model if not args.quick else "tiny",
               "tile": args.tile, "island_px": args.island, "baseline": baseline,
               "extent_series": extent, "tissue_series": tissue, "tissue_fit": fit,
               "rss_ratio_largest_smallest": rss_ratio, "time_ratio_largest_smallest": time_ratio,
               "extent_ratio": big["gpx"] / small["gpx"]}
    summary["headline"] = headline(
        f"peak RSS {big['gpx']:.1f} Gpx / {small['gpx']:.2f} Gpx = {rss_ratio:.2f}x "
        f"({big['peak_rss_mib']:.0f} vs {small['peak_rss_mib']:.0f} MiB) for the same tissue; "
        f"time {time_ratio:.1f}x ({slow[:-2]} {100 * share:.0f} % of the largest); "
        f"{tissue_x:.0f}x tissue -> {tissue_time:.2f}x time")
    summary["wall_s"] = time.perf_counter() - started
    write_json(args.json or default_json(NAME, args.quick), summary)
    return summary


if __name__ == "__main__":
    main()
