"""LocalCluster workers: 1 vs 2 worker processes, and the client's memory under load.

Part A, throughput: the same slide end to end through a LocalCluster of 1 worker with T
torch threads and of 2 workers with T/2 each (the same cores), rounds alternating the
order to spread the drift of a shared machine. Cluster start-up is excluded. The
module docstring of ``pipeline.cluster`` predicts processes beat threads (the watershed
and polygons are single-threaded); this measures it.

Part B, backpressure: the client process (which also hosts the LocalCluster scheduler)
must stay small however much work is queued. Each case runs in a fresh child process
that samples its own RSS (workers excluded) while it works:

* many slides: N small slides one after another, as ``wsi-nuclei run`` does;
* many tile tasks: one slide of ~600 tiles through ``DaskExecutor`` with the default
  bound (64 in flight) and unbounded (every task submitted at once).

Part B uses a hand-set tiny model: what is measured is bookkeeping, not the network.

    python -m bench.workers                  # 2048^2 slide with dense.pt; 50 slides; 576 tiles
    python -m bench.workers --quick          # < 1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.common import (
    RssSampler,
    default_json,
    headline,
    mib,
    peak_rss_self,
    quiet_logs,
    run_child,
    run_info,
    scratch,
    synthetic_tiff,
    tiny_checkpoint,
    write_json,
)

NAME = "workers"
MODULE = f"bench.{NAME}"
UNBOUNDED = 10**9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=None, help="slide for part A (default synthetic)")
    parser.add_argument("--side", type=int, default=2048, help="side of the synthetic slide of part A")
    parser.add_argument("--model", default="dense.pt", help="model of part A")
    parser.add_argument("--tile", type=int, default=1024, help="tile size of part A")
    parser.add_argument("--total-threads", type=int, default=2, help="torch threads summed over workers")
    parser.add_argument("--rounds", type=int, default=1, help="part A rounds (order alternates)")
    parser.add_argument("--slides", type=int, default=50, help="part B: number of small slides")
    parser.add_argument("--small-side", type=int, default=512, help="part B: side of each small slide")
    parser.add_argument("--queue-side", type=int, default=3072, help="part B: side of the many-tile slide")
    parser.add_argument("--queue-tile", type=int, default=128, help="part B: its tile size")
    parser.add_argument("--bound", type=int, default=64, help="part B: DaskExecutor max_in_flight")
    parser.add_argument("--skip-a", action="store_true", help="only part B")
    parser.add_argument("--skip-b", action="store_true", help="only part A")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    # internal: a part B child
    parser.add_argument("--child", choices=["b"], help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def cluster_config(workers: int, torch_threads: int) -> Any:
    from pipeline.cluster import ClusterConfig

    return ClusterConfig(kind="local", n_workers=workers, threads_per_worker=1,
                         torch_threads=torch_threads, dashboard_address=None, device="cpu")


def worker_peaks(client: Any) -> list[float]:
    """Peak RSS (MiB) of every worker process so far."""
    return sorted(mib(v) for v in client.run(peak_rss_self).values())


# --------------------------------------------------------------------------- part A


def part_a(args: argparse.Namespace, slide: str, model: str, work: Path, tile: int) -> dict[str, Any]:
    """Seconds per layout (mean over rounds) and worker peaks."""
    from pipeline.cluster import open_client, register_model
    from pipeline.run import process_slide
    from pipeline.slide_run.config import RunConfig
    from pipeline.slide_run.executors import DaskExecutor

    total = max(2, args.total_threads)
    layouts = [(1, total), (2, total // 2)]
    runs: dict[str, list[float]] = {f"{w}x{t}": [] for w, t in layouts}
    peaks: dict[str, list[float]] = {}
    order = [layouts[(i + r) % 2] for r in range(args.rounds) for i in range(2)]
    for workers, threads in tqdm(order, desc="part A: clusters", unit="run", file=sys.stderr):
        config = cluster_config(workers, threads)
        with open_client(config, wait_for_workers=workers, timeout=120) as client:
            register_model(client, model, config, device="cpu")
            warm = RunConfig(model=model, out=str(work / "a-warm"), tile_size=128, overwrite=True,
                             device="cpu")  # first-task imports and allocations, on every worker
            process_slide(synthetic_tiff(work / "a-warm.tif", 256, seed=5), warm, DaskExecutor(client))
            cfg = RunConfig(model=model, out=str(work / f"a-{workers}"), tile_size=tile,
                            overwrite=True, device="cpu")
            t0 = time.perf_counter()
            outcome = process_slide(slide, cfg, DaskExecutor(client))
            seconds = time.perf_counter() - t0
            if outcome.status != "done":
                raise RuntimeError(f"part A {workers} worker(s): {outcome.error}")
            runs[f"{workers}x{threads}"].append(seconds)
            peaks[f"{workers}x{threads}"] = worker_peaks(client)
    mean = {k: sum(v) / len(v) for k, v in runs.items()}
    one, two = (f"{w}x{t}" for w, t in layouts)
    return {"layouts": {k: {"workers": int(k.split("x")[0]), "torch_threads": int(k.split("x")[1]),
                            "seconds": runs[k], "mean_s": mean[k], "worker_peak_rss_mib": peaks[k]}
                        for k in runs},
            "speedup_2_vs_1": mean[one] / mean[two], "tile": tile, "slide": slide}


# --------------------------------------------------------------------------- part B


def child(args: argparse.Namespace) -> None:
    """Part B in a fresh process: one LocalCluster (2 workers x 1 thread, tiny model), a
    warm-up slide (one-off imports and caches are not queue memory), then the cases in
    the order slides, bounded queue, unbounded queue. Each case's growth is its peak
    minus its start; Python keeps freed memory for reuse, so running the unbounded case
    last makes its growth the extra memory it needs beyond the bounded one."""
    quiet_logs()
    from pipeline.cluster import open_client, register_model
    from pipeline.run import process_slide
    from pipeline.slide_run.config import RunConfig
    from pipeline.slide_run.executors import DaskExecutor

    work: Path = args.child_dir
    model = str(work / "tiny.pt")
    config = cluster_config(2, 1)
    slides = sorted((work / "slides").glob("*.tif"))
    cases = [("slides", args.bound, slides, 1024), ("queue_bounded", args.bound, [work / "queue.tif"],
                                                    args.queue_tile),
             ("queue_unbounded", UNBOUNDED, [work / "queue.tif"], args.queue_tile)]
    results: dict[str, Any] = {}
    with open_client(config, wait_for_workers=2, timeout=120) as client:
        register_model(client, model, config, device="cpu")
        warm = RunConfig(model=model, out=str(work / "out-warm"), overwrite=True, device="cpu")
        process_slide(work / "warm.tif", warm, DaskExecutor(client))
        for name, bound, paths, tile in tqdm(cases, desc="part B: cases", unit="case", file=sys.stderr):
            executor = DaskExecutor(client, max_in_flight=bound)
            cfg = RunConfig(model=model, out=str(work / f"out-{name}"), tile_size=tile, overwrite=True,
                            device="cpu")
            after_each: list[float] = []
            tiles = 0
            t0 = time.perf_counter()
            with RssSampler() as rss:
                for slide in paths:
                    outcome = process_slide(slide, cfg, executor)
                    if outcome.status != "done":
                        raise SystemExit(f"{slide}: {outcome.error}")
                    summary = json.loads((Path(outcome.out_dir) / "summary.json").read_text())
                    tiles += summary["tiles_processed"]
                    after_each.append(mib(rss.current()))
            results[name] = {
                "bound": bound, "slides": len(paths), "tiles": tiles, "seconds": time.perf_counter() - t0,
                "client_rss_start_mib": mib(rss.start), "client_rss_peak_mib": mib(rss.peak),
                "client_rss_end_mib": mib(rss.end), "client_rss_after_first_mib": after_each[0],
                "client_rss_after_last_mib": after_each[-1]}
        results["worker_peak_rss_mib"] = worker_peaks(client)
    args.child_json.write_text(json.dumps(results))


def part_b(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Make the slides, then run the cases in one child process."""
    tiny_checkpoint(work, "tiny.pt")
    (work / "slides").mkdir(exist_ok=True)
    for i in tqdm(range(args.slides), desc="part B: writing slides", unit="slide", file=sys.stderr,
                  leave=False):
        synthetic_tiff(work / "slides" / f"s{i:03d}.tif", args.small_side, seed=100 + i)
    synthetic_tiff(work / "warm.tif", args.small_side, seed=99)
    synthetic_tiff(work / "queue.tif", args.queue_side, seed=7)
    res = run_child(MODULE, ["--child", "b", "--child-dir", str(work), "--bound", str(args.bound),
                             "--queue-tile", str(args.queue_tile)])
    if res.returncode != 0:
        raise RuntimeError(f"part B child failed: exit {res.returncode} (its stderr is above)")
    return res.data


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    quiet_logs()
    if args.quick:
        args.side, args.tile, args.small_side = 256, 128, 256
        args.slides, args.queue_side, args.queue_tile, args.bound = 3, 256, 32, 8
    summary: dict[str, Any] = {**run_info(NAME, argv, args.total_threads)}
    with scratch("bench-workers-") as work:
        if not args.skip_a:
            model = str(tiny_checkpoint(work, "a.pt")) if args.quick else args.model
            slide = str(args.slide or synthetic_tiff(work / f"synthetic-{args.side}.tif", args.side))
            summary["part_a"] = part_a(args, slide, model, work, args.tile)
            summary["part_a"]["model"] = "tiny" if args.quick else model
        if not args.skip_b:
            summary["part_b"] = part_b(args, work)
    parts = []
    if "part_a" in summary:
        a = summary["part_a"]
        print(f"part A: {a['slide']}, tile {a['tile']}, {a['model']}")
        print(f"{'layout':>16}{'mean s':>9}{'runs':>20}{'worker peak RSS MiB':>24}")
        for r in a["layouts"].values():
            label = f"{r['workers']} w x {r['torch_threads']} thr"
            runs = " ".join(f"{s:.1f}" for s in r["seconds"])
            peaks = " ".join(f"{p:.0f}" for p in r["worker_peak_rss_mib"])
            print(f"{label:>16}{r['mean_s']:>9.1f}{runs:>20}{peaks:>24}")
        parts.append(f"2 workers x {args.total_threads // 2} thr = {a['speedup_2_vs_1']:.2f}x the throughput "
                     f"of 1 worker x {args.total_threads} thr")
    if "part_b" in summary:
        b = summary["part_b"]
        print("part B: client process RSS (MiB; client + scheduler, workers excluded)")
        print(f"{'case':>18}{'slides':>8}{'tiles':>7}{'in flight':>11}{'start':>8}{'peak':>8}"
              f"{'growth':>8}{'after 1st':>11}{'after last':>12}{'s':>7}")
        for name, r in b.items():
            if name == "worker_peak_rss_mib":
                continue
            bound = "all" if r["bound"] >= UNBOUNDED else str(r["bound"])
            growth = r["client_rss_peak_mib"] - r["client_rss_start_mib"]
            print(f"{name:>18}{r['slides']:>8}{r['tiles']:>7}{bound:>11}{r['client_rss_start_mib']:>8.0f}"
                  f"{r['client_rss_peak_mib']:>8.0f}{growth:>8.0f}{r['client_rss_after_first_mib']:>11.0f}"
                  f"{r['client_rss_after_last_mib']:>12.0f}{r['seconds']:>7.1f}")
        s, qb, qu = b["slides"], b["queue_bounded"], b["queue_unbounded"]
        parts.append(f"client RSS over {s['slides']} slides: {s['client_rss_after_first_mib']:.0f} -> "
                     f"{s['client_rss_after_last_mib']:.0f} MiB; {qb['tiles']} tiles: peak growth "
                     f"{qb['client_rss_peak_mib'] - qb['client_rss_start_mib']:.0f} MiB bounded vs "
                     f"{qu['client_rss_peak_mib'] - qu['client_rss_start_mib']:.0f} MiB unbounded")
    summary["headline"] = headline("; ".join(parts))
    summary["wall_s"] = time.perf_counter() - started
    write_json(args.json or default_json(NAME, args.quick), summary)
    return summary


if __name__ == "__main__":
    main()
