"""The label pyramid of a large slide: level by level in one task vs blocks in parallel.

``wsi-nuclei run`` builds the fine pyramid levels (1..``PYRAMID_BLOCK_LEVELS``) of the
nucleus labels as one task per level-0 block of 4 x 4 chunks (``labels.pyramid_blocks`` /
``build_pyramid_block``), in parallel on the workers, and only the coarse rest
(``build_pyramid(first_level=3)``) in the finalising task. Before, one task built every
level in turn (``build_pyramid(first_level=1)``). The pyramid's cost follows the labelled
area, not the tissue's nuclei, so it matters on large slides, not on the 3.5 mm² mosaics of
``bench.slide_speed`` (~0.1 s there). Here a level-0 label image of ``--side``² px (32768²:
a 8 x 8 mm region at 0.25 µm/px, 67 mm², the size of a large biopsy or a small resection)
is filled with synthetic nuclei (``pipeline.synthetic``, ~22 % of the pixels) chunk by
chunk, then both ways build levels 1..N into copies of that store, in alternating order over
rounds, on a 2-worker LocalCluster (the default layout on this machine); every level of the
two results must be identical.

    python -m bench.pyramid_speed                 # 32768² px, 2 rounds
    python -m bench.pyramid_speed --quick         # 4096² px in 256² chunks, 1 round (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import default_json, headline, quiet_logs, run_info, scratch, write_json

NAME = "pyramid_speed"
MODULE = f"bench.{NAME}"
PATCH = 2048  # side of the synthetic label patch tiled over level 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=32768, help="level-0 side (px)")
    parser.add_argument("--chunk", type=int, default=1024, help="label chunk (the run's default)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (orders alternate)")
    parser.add_argument("--quick", action="store_true", help="a 4096² image in 256² chunks, one round")
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def fill_level0(spec: Any) -> int:
    """Level 0 tiled with one synthetic label patch, ids shifted per patch (distinct
    nuclei everywhere, as a slide's); returns the largest id."""
    from pipeline.synthetic import synthetic_he
    from pipeline.types import Box
    from pipeline.writers.labels import write_block

    _, patch = synthetic_he(PATCH, PATCH, seed=11, mpp=0.25, tissue_fraction=1.0)
    patch = patch.astype(np.uint32)
    n = int(patch.max())
    h, w = spec.shape
    k = 0
    for y in range(0, h, PATCH):
        for x in range(0, w, PATCH):
            box = Box(y, x, min(y + PATCH, h), min(x + PATCH, w))
            part = patch[:box.height, :box.width]
            write_block(spec, box, np.where(part > 0, part + k * n, 0).astype(np.uint32))
            k += 1
    return k * n


def _block(arg: tuple[Any, Any]) -> None:
    from pipeline.writers.labels import build_pyramid_block

    build_pyramid_block(*arg)


def level_by_level(spec: Any, client: Any) -> float:
    """Levels 1..N in one task on a worker (the finalising task's work before)."""
    from pipeline.writers.labels import build_pyramid

    t0 = time.perf_counter()
    client.submit(build_pyramid, spec, spec.chunk_boxes(), 1, pure=False).result()
    return time.perf_counter() - t0


def by_blocks(spec: Any, client: Any) -> float:
    """Fine levels per block on every worker, then the coarse rest in one task (now)."""
    from pipeline.cluster import TaskFailure, bounded_map
    from pipeline.writers.labels import PYRAMID_BLOCK_LEVELS, build_pyramid, pyramid_blocks

    regions = spec.chunk_boxes()
    t0 = time.perf_counter()
    blocks = [(spec, b) for b in pyramid_blocks(spec, regions)]
    for _, outcome in bounded_map(client, _block, blocks, max_in_flight=64):
        if isinstance(outcome, TaskFailure):
            raise outcome.exception
    client.submit(build_pyramid, spec, regions, PYRAMID_BLOCK_LEVELS + 1, pure=False).result()
    return time.perf_counter() - t0


def levels(spec: Any) -> list[np.ndarray]:
    import zarr

    return [np.asarray(zarr.open_array(store=spec.path, path=spec.level_path(k), mode="r")[...])
            for k in range(1, spec.n_levels)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from pipeline.cluster import ClusterConfig, open_client
    from pipeline.writers.labels import create_store

    args = parse_args(argv)
    quiet_logs()
    if args.quick:  # 256-px chunks: 4 levels, so both block levels and a coarse one
        args.side, args.chunk, args.rounds = 4096, 256, 1
    summary: dict[str, Any] = {**run_info(NAME, argv, 1), "side": args.side, "chunk": args.chunk,
                               "workers": args.workers}
    ways = {"level_by_level": level_by_level, "by_blocks": by_blocks}
    times: dict[str, list[float]] = {k: [] for k in ways}
    with scratch("bench-pyramid-", args.keep) as work:
        base = create_store(work / "base.zarr", (args.side, args.side), args.chunk, 0.25)
        t0 = time.perf_counter()
        summary["labels"] = fill_level0(base)
        summary["fill_s"] = round(time.perf_counter() - t0, 2)
        summary["levels"] = [list(s) for s in base.level_shapes]
        config = ClusterConfig(kind="local", n_workers=args.workers, threads_per_worker=1,
                               torch_threads=1, dashboard_address=None, device="cpu")
        names = list(ways)
        order = [name for r in range(args.rounds) for name in (names if r % 2 == 0 else names[::-1])]
        results: dict[str, list[np.ndarray]] = {}
        with open_client(config, wait_for_workers=args.workers, timeout=120) as client:
            for name in tqdm(order, desc="pyramid", unit="build", file=sys.stderr):
                path = work / f"{name}.zarr"
                shutil.rmtree(path, ignore_errors=True)
                shutil.copytree(base.path, path)
                spec = dataclasses.replace(base, path=str(path))
                times[name].append(ways[name](spec, client))
                if name not in results:
                    results[name] = levels(spec)
    same = all((a == b).all() for a, b in zip(results["level_by_level"], results["by_blocks"]))
    if not same:
        raise RuntimeError("the two ways gave different pyramids")
    med = {k: float(np.median(v)) for k, v in times.items()}
    summary.update({"seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
                    "median_s": {k: round(v, 2) for k, v in med.items()}, "identical": same,
                    "speedup_blocks_vs_levels": round(med["level_by_level"] / med["by_blocks"], 2)})
    mm2 = (args.side * 0.25 / 1000) ** 2
    print(f"{'way':>16} {'median s':>9}  runs")
    for k in ways:
        print(f"{k:>16} {med[k]:9.2f}  {', '.join(f'{t:.2f}' for t in times[k])}")
    summary["headline"] = headline(
        f"label pyramid of {args.side}² px ({mm2:.0f} mm² at 0.25 µm/px) on {args.workers} workers: "
        f"{med['by_blocks']:.1f} s by blocks vs {med['level_by_level']:.1f} s level by level "
        f"({summary['speedup_blocks_vs_levels']:.2f}x), identical levels")
    write_json(args.json or default_json(NAME, args.quick), summary)
    return summary


if __name__ == "__main__":
    main()
