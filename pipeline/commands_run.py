"""``wsi-nuclei run`` and ``wsi-nuclei demo``: flags → :mod:`pipeline.run`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.cliutil import formatter, progress_options
from pipeline.tiling import DEFAULT_TILE_SIZE

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1
POLL_S = 0.5  # how often the main thread wakes while slides run (to see Ctrl-C)
SLIDES_IN_FLIGHT = 3  # slides processed at once on a Dask cluster (phases overlap)




def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint path or shipped name (default: the first shipped of "
                        "pruned20x.pt, dense20x.pt, pruned80.pt, dense.pt)")
    p.add_argument("--out", default="results", help="output folder (one sub-folder per slide)")
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE,
                   help="tile core in model pixels (multiple of 16)")
    p.add_argument("--batch-size", type=int, default=1, help="tiles per forward pass")
    p.add_argument("--mpp", type=float, default=None, help="override the slide's µm/px (level 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--gzip", action="store_true", help="write nuclei.geojson.gz")
    p.add_argument("--overwrite", action="store_true", help="recompute finished slides")
    p.add_argument("--no-tissue-mask", action="store_true", help="process the whole slide")
    p.add_argument("--keep-outside-tissue", action="store_true",
                   help="keep nuclei whose centre lies off the tissue mask (debris, dye and "
                        "flakes on the glass are dropped by default; summary.json counts them)")
    p.add_argument("--stain-vectors", default=None, metavar="STAINS",
                   help="colour deconvolution for the intensity measurements: 'default' (QuPath's "
                        "H&E defaults) or the string of a QuPath project's "
                        "setColorDeconvolutionStains(...); default: estimated per slide from its "
                        "tissue (summary.json records the vectors in QuPath's form)")
    p.add_argument("--stain-normalise", action="store_true",
                   help="show the network each tile re-rendered from the slide's stain vectors in "
                        "the training images' typical H&E (per pixel, so tiling stays exact; the "
                        "intensities are still measured on the slide's own colours). Default: off: "
                        "with the shipped model it lowered validation AJI (README, Accuracy)")
    p.add_argument("--cell-expansion", type=float, default=0.0, metavar="UM",
                   help="also make cells: each nucleus grown by UM µm (QuPath's cellExpansion; its "
                        "examples use 5), neighbours split halfway; GeoJSON cell objects with "
                        "Cell:/Cytoplasm: measurements, labels/cells in the store (default: off)")
    p.add_argument("--cell-constrain-scale", type=float, default=None, metavar="S",
                   help="with --cell-expansion: keep a cell inside its nucleus's convex hull scaled "
                        "by S about its centre (QuPath's cellConstrainScale, e.g. 1.5)")
    p.add_argument("--cluster", choices=["local", "slurm", "none"], default=None,
                   help="local Dask cluster (default), SLURM via dask-jobqueue, or none (one process)")
    p.add_argument("--cluster-config", default=None, help="YAML/JSON file with cluster settings")
    p.add_argument("--scheduler", default=None, help="attach to tcp://HOST:PORT or a scheduler file")
    p.add_argument("--slides-at-once", type=int, default=SLIDES_IN_FLIGHT,
                   help="slides in flight at once on a Dask cluster (their phases overlap, so "
                        "workers do not wait between one slide's phases); 1 = one after another")
    p.add_argument("--workers", type=int, default=None,
                   help="local worker processes, or SLURM jobs (default: sized to the machine)")


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", formatter_class=formatter, help="segment nuclei in whole-slide images",
        description="Segment every nucleus of each slide: OME-Zarr labels + table, QuPath GeoJSON, "
                    "preview and summary in OUT/<slide>/. Finished slides are skipped on re-runs.",
        epilog="examples:\n"
               "  wsi-nuclei run slides/ --model pruned80.pt --out results/\n"
               "  wsi-nuclei run a.svs b.ndpi --out results/ --gzip\n"
               "  wsi-nuclei run slides/ --cluster slurm --cluster-config workflows/slurm/cluster.yaml\n"
               "  wsi-nuclei run scan.tif --mpp 0.25 --no-tissue-mask --cluster none")
    p.add_argument("paths", nargs="+",
                   help="slide files and/or folders of slides (searched recursively)")
    p.add_argument("--name", default=None,
                   help="output folder name under OUT for a single slide (the workflows pass the "
                        "name from their slide list; default: see README, 'Outputs')")
    _add_run_options(p)
    p.set_defaults(func=run_command)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", formatter_class=formatter, help="run the pipeline on a built-in synthetic slide",
        description="Builds a small pyramidal H&E-like slide whose true nuclei are known, runs the "
                    "real pipeline on it and scores the result (detection F1, AJI).",
        epilog="example:\n  wsi-nuclei demo --out demo-out")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--model", default=None, help="default: as for run")
    p.add_argument("--size", type=int, default=2560, help="slide side in pixels (0.25 µm/px)")
    p.add_argument("--cluster", choices=["local", "none"], default="local",
                   help="local Dask cluster (default) or none (one process)")
    p.set_defaults(func=demo_command)


@contextlib.contextmanager
def executor_for(args: argparse.Namespace, model: str, device: str) -> Iterator[Any]:
    """A serial executor, or a Dask client with the model plugin registered."""
    from pipeline.slide_run.executors import DaskExecutor, SerialExecutor

    if args.cluster == "none" and not args.scheduler:
        from pipeline.cluster import get_worker_model

        get_worker_model(model, device)  # loaded before the first slide, as a worker does
        yield SerialExecutor()
        return
    from pipeline.cluster import (
        ClusterConfig,
        cluster_config_from,
        open_client,
        register_model,
    )

    debug = bool(getattr(args, "debug", False))
    if not debug:
        # importing distributed re-applies its own INFO level; quiet it in this process only,
        # so that worker logs (SLURM job output) keep their start-up lines
        logging.getLogger("distributed").setLevel(logging.WARNING)

    options: dict[str, Any] = {}
    if args.cluster:
        options["cluster"] = args.cluster
    if args.scheduler:
        options["scheduler"] = args.scheduler
    if getattr(args, "workers", None):
        options["workers"] = args.workers
    if device != "auto":  # an explicit --device sizes the cluster (cpu: no GPU workers)
        options["device"] = device
    config: ClusterConfig = cluster_config_from(options, getattr(args, "cluster_config", None))
    with open_client(config, debug=debug) as client:
        register_model(client, model, config)
        layout = None if config.kind == "address" else config.layout()
        yield DaskExecutor.for_layout(client, layout)


def run_command(args: argparse.Namespace) -> int:
    from models.checkpoints import default_model
    from pipeline.discovery import slides_to_run
    from pipeline.run import process_slide
    from pipeline.slide_run.config import RunConfig

    slides = slides_to_run(args.paths, args.out, args.name)
    cfg = RunConfig(model=args.model or default_model(), out=args.out, tile_size=args.tile_size,
                    batch_size=args.batch_size, mpp=args.mpp, device=args.device, gzip=args.gzip,
                    overwrite=args.overwrite, tissue_mask=not args.no_tissue_mask,
                    keep_outside_tissue=args.keep_outside_tissue, stain_vectors=args.stain_vectors,
                    stain_normalise=args.stain_normalise, cell_expansion=args.cell_expansion,
                    cell_constrain_scale=args.cell_constrain_scale)
    cfg.validate()  # bad values exit 2 here, before any cluster starts
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be at least 1")
    if args.slides_at_once < 1:
        raise ValueError(f"--slides-at-once {args.slides_at_once} must be at least 1")
    with executor_for(args, cfg.model, cfg.device) as executor:
        at_once = min(len(slides), args.slides_at_once) if hasattr(executor, "client") else 1
        outcomes = _run_slides(slides, cfg, executor, at_once, process_slide)
    _print_table(outcomes)
    return EXIT_FAILED if any(o.status != "done" for o in outcomes) else EXIT_OK


def _run_slides(slides: dict[str, str], cfg: Any, executor: Any, at_once: int,
                process: Callable[..., Any]) -> list[Any]:
    """Each slide through ``process``, ``at_once`` slides at a time (one client thread each,
    sharing the cluster), so that one slide's single-task phases (planning, finalising)
    overlap other slides' tiles and the workers never wait between phases. Outcomes in the
    order of ``slides``. Ctrl-C stops every slide within seconds, in whatever phase
    (``executor.interrupt()``, not when it is finished) and raises ``KeyboardInterrupt``."""
    from pipeline.slide_run.executors import SlideInterrupted

    slots = list(range(at_once))
    lock = threading.Lock()
    stop = threading.Event()

    def one(path: str, name: str) -> Any:
        with lock:
            slot = slots.pop(0)
        try:
            with tqdm(total=0, desc=name[:30], unit="tile", position=slot, leave=at_once == 1,
                      **progress_options(sys.stderr)) as bar:
                def progress(done: int, total: int) -> None:
                    if stop.is_set():
                        raise SlideInterrupted(path)
                    bar.total = total
                    bar.update(done - bar.n)  # drawn at most every mininterval seconds

                return process(path, cfg, executor, progress, name)
        finally:
            with lock:
                slots.append(slot)

    if at_once <= 1:
        return [one(path, name) for path, name in slides.items()]
    pool = ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="slide")
    try:
        futures = [pool.submit(one, path, name) for path, name in slides.items()]
        running = set(futures)
        while running:  # a timeout, so that this thread sees Ctrl-C within POLL_S
            running = wait(running, timeout=POLL_S).not_done
        return [f.result() for f in futures]
    except KeyboardInterrupt:
        stop.set()  # queued slides never start
        interrupt = getattr(executor, "interrupt", None)
        if interrupt is not None:  # running slides end now, in any phase
            interrupt()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _print_table(outcomes: list[Any]) -> None:
    from pipeline.discovery import slide_id

    def label(o: Any) -> str:  # same-named slides: the output folder tells them apart
        folder = Path(o.out_dir).name if o.out_dir else slide_id(o.slide)
        return Path(o.slide).name + ("" if folder == slide_id(o.slide) else f" -> {folder}/")

    width = max([40, *(len(label(o)) + 2 for o in outcomes)])
    print(f"{'slide':<{width}}{'nuclei':>10}{'time (s)':>10}  status")
    for o in outcomes:
        status = "done (skipped: already done)" if o.skipped else o.status
        if o.note:
            status += f"; {o.note}"
        if o.error:
            status += f": {o.error}"
        print(f"{label(o):<{width}}{o.nuclei:>10}{o.seconds:>10.1f}  {status}")


def demo_command(args: argparse.Namespace) -> int:
    """Synthetic slide → real pipeline → scores against the known truth."""
    import numpy as np
    import zarr

    from models.checkpoints import default_model
    from models.metrics import instance_scores
    from pipeline.pyramid_tiff import write_pyramidal_tiff
    from pipeline.run import process_slide
    from pipeline.slide_run.config import RunConfig
    from pipeline.synthetic import synthetic_he
    from pipeline.writers.preview import write_preview

    model = args.model or default_model()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rgb, truth = synthetic_he(args.size, args.size, seed=2022, mpp=0.25)
    slide = out / "demo-slide.tif"
    write_pyramidal_tiff(slide, rgb, mpp=0.25)
    log.info("demo slide %s (%d x %d px, %d true nuclei)", slide, args.size, args.size, int(truth.max()))
    cfg = RunConfig(model=model, out=str(out / "results"), overwrite=True)
    args.scheduler, args.cluster_config, args.workers = None, None, None
    with executor_for(args, cfg.model, cfg.device) as executor:
        outcome = process_slide(slide, cfg, executor)
    if outcome.status != "done":
        print(f"demo failed: {outcome.error}", file=sys.stderr)
        return EXIT_FAILED
    labels = zarr.open_group(str(Path(outcome.out_dir) / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]
    scores = instance_scores(truth.astype(np.int64), labels.astype(np.int64))
    detail = Path(outcome.out_dir) / "detail.png"
    c0, c1 = args.size // 2 - 256, args.size // 2 + 256
    write_preview(detail, rgb[c0:c1, c0:c1], labels[c0:c1, c0:c1],
                  np.ones((c1 - c0, c1 - c0), dtype=bool))
    print(f"demo: {outcome.nuclei} nuclei found ({int(truth.max())} true) in {time.time() - started:.0f} s "
          f"with {model}")
    print(f"  detection F1 {scores['f1']:.3f}  AJI {scores['aji']:.3f}  PQ {scores['pq']:.3f}  "
          f"Dice {scores['dice']:.3f}")
    print(f"  outputs: {outcome.out_dir}/ (nuclei.zarr, nuclei.geojson, nuclei.parquet, preview.png, "
          "detail.png, summary.json)")
    print("  QuPath: open demo-slide.tif, then drag nuclei.geojson onto the viewer")
    return EXIT_OK
