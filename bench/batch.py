"""Slides overlapping on a LocalCluster: one after another vs several at once.

``wsi-nuclei run`` on a Dask cluster keeps ``--slides-at-once`` slides in flight (default
3): one slide's single-task phases (planning, the label blocks' tail, finalising) and the
last tiles of a slide leave workers idle when slides run strictly one after another. Here
N small synthetic slides go through the real pipeline (``commands_run._run_slides``, what
the CLI calls) on one 2-worker LocalCluster, first one at a time, then all at once, in
alternating order over rounds. Dask's task stream gives each worker's busy intervals, so
the report shows the workers' utilisation, their idle gaps inside the run, and the
client's peak RSS (the client also hosts the scheduler).

    python -m bench.batch                 # 4 slides of 1536^2 at 0.5 µm/px, the default model
    python -m bench.batch --quick         # 4 slides of 384^2, a tiny model (< 1 min)

``--one-run``: what many small slides cost (biopsies). N synthetic slides (default 30 of
2048^2 px at 0.5 µm/px, ~1 mm² each) go through ONE ``wsi-nuclei run FOLDER`` (the real
command in a fresh process, default cluster and slides at once), and, as the reference, one
slide of their total area (side x sqrt(N)) through another. Each run's span, from its first
slide's start to its last slide's end (``summary.json``: written last, ``seconds`` after the
slide began), leaves out the process's start-up (imports, cluster), so ``(batch span -
reference span) / (N - 1)`` is the per-slide overhead: what a slide costs beyond its
tissue's share of the big-slide rate.

    python -m bench.batch --one-run                  # 30 slides of ~1 mm² vs one of ~31 mm²
    python -m bench.batch --one-run --slides 10 --no-reference
"""

from __future__ import annotations

import argparse
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
    quiet_logs,
    run_info,
    scratch,
    synthetic_tiff,
    tiny_checkpoint,
    write_json,
)
from bench.workers import cluster_config

NAME = "batch"
MODULE = f"bench.{NAME}"
GAP_S = 0.5  # an idle stretch of a worker longer than this counts as a gap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=None, help="slides in the batch (default 4; "
                        "--one-run 30)")
    parser.add_argument("--side", type=int, default=None, help="side of each synthetic slide (px; "
                        "default 1536, --one-run 2048)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    parser.add_argument("--tile", type=int, default=512, help="tile size")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (orders alternate)")
    parser.add_argument("--quick", action="store_true", help="tiny slides and model")
    parser.add_argument("--one-run", action="store_true",
                        help="the slides in one wsi-nuclei run: wall time vs tissue, per-slide overhead")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="--one-run without the one-big-slide reference run")
    parser.add_argument("--cluster", choices=["local", "none"], default="local",
                        help="--one-run: cluster layout of the run")
    parser.add_argument("--keep", default=None, help="--one-run: keep slides and outputs in this folder")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.slides is None:
        args.slides = 30 if args.one_run and not args.quick else 4
    if args.side is None:
        args.side = 2048 if args.one_run else 1536
    return args


Spans = list[tuple[float, float]]


def busy_intervals(stream: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Spans]:
    """Each worker's merged compute intervals within [t0, t1] (task stream, wall clock)."""
    per: dict[str, list[tuple[float, float]]] = {}
    for task in stream:
        for ss in task.get("startstops", ()):
            if ss.get("action") == "compute":
                a, b = max(ss["start"], t0), min(ss["stop"], t1)
                if b > a:
                    per.setdefault(task["worker"], []).append((a, b))
    merged: dict[str, list[tuple[float, float]]] = {}
    for worker, spans in per.items():
        spans.sort()
        out = [spans[0]]
        for a, b in spans[1:]:
            if a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        merged[worker] = out
    return merged


def utilisation(merged: dict[str, list[tuple[float, float]]], workers: list[str], t0: float,
                t1: float) -> dict[str, Any]:
    """Busy share of ``len(workers) x (t1 - t0)`` and the idle gaps longer than GAP_S."""
    busy = sum(b - a for spans in merged.values() for a, b in spans)
    gaps = []
    for worker in workers:
        edges = [t0, *[x for span in merged.get(worker, []) for x in span], t1]
        gaps += [b - a for a, b in zip(edges[::2], edges[1::2]) if b - a > GAP_S]
    return {"utilisation": busy / (len(workers) * (t1 - t0)), "idle_gaps": len(gaps),
            "idle_gap_s": sum(gaps)}


def run_batch(client: Any, slides: dict[str, str], model: str, out: Path, tile: int,
              at_once: int) -> dict[str, Any]:
    from distributed import get_task_stream

    from pipeline.commands_run import _run_slides
    from pipeline.run import process_slide
    from pipeline.slide_run.config import RunConfig
    from pipeline.slide_run.executors import DaskExecutor

    cfg = RunConfig(model=model, out=str(out), tile_size=tile, overwrite=True, device="cpu",
                    tissue_mask=False)
    workers = sorted(client.scheduler_info()["workers"])
    with RssSampler() as rss, get_task_stream(client) as ts:
        t0 = time.time()
        outcomes = _run_slides(slides, cfg, DaskExecutor(client), at_once, process_slide)
        t1 = time.time()
    bad = [o for o in outcomes if o.status != "done"]
    if bad:
        raise RuntimeError(f"{bad[0].slide}: {bad[0].error}")
    merged = busy_intervals(ts.data, t0, t1)
    return {"at_once": at_once, "seconds": t1 - t0, "nuclei": sum(o.nuclei for o in outcomes),
            "client_rss_peak_mib": mib(rss.peak), "client_rss_start_mib": mib(rss.start),
            **utilisation(merged, workers, t0, t1)}


def tissue_mm2(summary: dict[str, Any]) -> float:
    return float(summary.get("tissue_area_um2") or 0.0) / 1e6


def slides_span(summaries: list[dict[str, Any]]) -> float:
    """Seconds from the first slide's start to the last slide's end, start-up excluded: a
    summary.json is written last (its mtime: the slide's end), ``seconds`` after its start."""
    ends = [(Path(s["out_dir"]) / "summary.json").stat().st_mtime for s in summaries]
    return max(ends) - min(end - float(s["seconds"]) for end, s in zip(ends, summaries))


def run_row(summaries: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    return {"slides": len(summaries), "tissue_mm2": sum(map(tissue_mm2, summaries)), "process_s": wall,
            "span_s": slides_span(summaries), "slide_seconds_sum": sum(s["seconds"] for s in summaries),
            "nuclei": sum(s["nuclei"] for s in summaries)}


def one_run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """``--one-run``: the batch in one ``wsi-nuclei run``, the reference slide in another."""
    from bench.slide_speed import run_cli

    mpp = 0.5
    extra = ["--tile-size", str(args.tile)] if args.quick else []
    result: dict[str, Any] = {**run_info(f"{NAME}-one-run", argv, 0), "slides": args.slides,
                              "side": args.side, "mpp": mpp, "cluster": args.cluster}
    with scratch("bench-batch-one-run-", args.keep) as work:
        model = str(tiny_checkpoint(work, "tiny.pt", mpp=mpp)) if args.quick else args.model
        result["model"] = "tiny" if args.quick else model or "default"
        folder = work / "slides"
        folder.mkdir(exist_ok=True)
        for i in range(args.slides):
            synthetic_tiff(folder / f"slide{i:03d}.tif", args.side, seed=i + 1, mpp=mpp)
        wall, summaries = run_cli(folder, model, work / "out-batch", args.cluster, extra)
        if len(summaries) != args.slides or any(s["status"] != "done" for s in summaries):
            raise RuntimeError(f"{len(summaries)} of {args.slides} slides finished in {work / 'out-batch'}")
        rows = {"batch": run_row(summaries, wall)}
        if args.reference:
            side = round(args.side * args.slides ** 0.5)
            big = synthetic_tiff(work / "reference" / "big.tif", side, seed=1, mpp=mpp)
            wall, summaries = run_cli(big, model, work / "out-reference", args.cluster, extra)
            rows["reference"] = {**run_row(summaries, wall), "side": side}
    result["runs"] = rows
    print(f"{args.slides} slides of {args.side}^2 px at {mpp} µm/px in one wsi-nuclei run "
          f"(cluster {args.cluster}, model {result['model']})")
    print("span: first slide's start to last slide's end (process start-up excluded)")
    print(f"{'run':>10}{'slides':>8}{'tissue mm2':>12}{'process s':>11}{'span s':>8}{'sum of slide s':>16}"
          f"{'span s/mm2':>12}{'nuclei':>9}")
    for name, r in rows.items():
        print(f"{name:>10}{r['slides']:>8}{r['tissue_mm2']:>12.2f}{r['process_s']:>11.1f}{r['span_s']:>8.1f}"
              f"{r['slide_seconds_sum']:>16.1f}{r['span_s'] / max(r['tissue_mm2'], 1e-9):>12.2f}"
              f"{r['nuclei']:>9}")
    batch = rows["batch"]
    text = (f"{args.slides} slides, {batch['tissue_mm2']:.1f} mm² of tissue, in one run: "
            f"{batch['span_s']:.1f} s ({batch['span_s'] / max(batch['tissue_mm2'], 1e-9):.2f} s/mm²)")
    if "reference" in rows and args.slides > 1:
        ref = rows["reference"]
        result["per_slide_overhead_s"] = (batch["span_s"] - ref["span_s"]) / (args.slides - 1)
        text += (f"; one slide of {ref['tissue_mm2']:.1f} mm²: {ref['span_s']:.1f} s; per-slide "
                 f"overhead {result['per_slide_overhead_s']:.2f} s")
    result["headline"] = headline(text)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from models.checkpoints import default_model
    from pipeline.cluster import open_client, register_model

    args = parse_args(argv)
    quiet_logs()
    if args.one_run:
        if args.quick:
            args.side, args.tile = 384, 128
        result = one_run(args, argv)
        write_json(args.json or default_json(f"{NAME}_one_run", args.quick), result)
        return result
    if args.quick:
        args.side, args.tile, args.rounds = 384, 128, 1
    summary: dict[str, Any] = {**run_info(NAME, argv, args.workers)}
    with scratch("bench-batch-") as work:
        if args.quick:
            model = str(tiny_checkpoint(work, "tiny.pt", mpp=0.5))
        else:
            model = args.model or default_model()
        slides = {str(synthetic_tiff(work / f"slide{i}.tif", args.side, seed=i + 1, mpp=0.5)): f"slide{i}"
                  for i in range(args.slides)}
        config = cluster_config(args.workers, 1)
        modes = [1, args.slides]
        order = [modes[(i + r) % 2] for r in range(args.rounds) for i in range(2)]
        runs: dict[int, list[dict[str, Any]]] = {m: [] for m in modes}
        with open_client(config, wait_for_workers=args.workers, timeout=120) as client:
            register_model(client, model, config)
            run_batch(client, dict(list(slides.items())[:1]), model, work / "warm", args.tile, 1)
            for at_once in tqdm(order, desc="batch", unit="run", file=sys.stderr):
                runs[at_once].append(run_batch(client, slides, model, work / f"out-{at_once}",
                                               args.tile, at_once))
    summary.update({"slides": args.slides, "side": args.side, "tile": args.tile, "workers": args.workers,
                    "model": "tiny" if args.quick else model, "runs": {str(k): v for k, v in runs.items()}})

    def mean(at_once: int, key: str) -> float:
        return sum(r[key] for r in runs[at_once]) / len(runs[at_once])

    print(f"{args.slides} slides of {args.side}^2, tile {args.tile}, {args.workers} workers, "
          f"{summary['model']}")
    print(f"{'slides at once':>15}{'s':>8}{'workers busy':>14}{'idle gaps':>11}{'idle s':>8}"
          f"{'client peak MiB':>17}")
    for m in modes:
        print(f"{m:>15}{mean(m, 'seconds'):>8.1f}{100 * mean(m, 'utilisation'):>13.0f}%"
              f"{mean(m, 'idle_gaps'):>11.1f}{mean(m, 'idle_gap_s'):>8.1f}"
              f"{max(r['client_rss_peak_mib'] for r in runs[m]):>17.0f}")
    speedup = mean(1, "seconds") / mean(args.slides, "seconds")
    summary["speedup_overlap_vs_sequential"] = speedup
    print(headline(f"{args.slides} slides at once: {speedup:.2f}x the throughput of one at a time; "
                   f"workers busy {100 * mean(args.slides, 'utilisation'):.0f}% vs "
                   f"{100 * mean(1, 'utilisation'):.0f}%"))
    write_json(args.json or default_json(NAME, args.quick), summary)
    return summary


if __name__ == "__main__":
    main()
