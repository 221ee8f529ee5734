"""Whole-slide speed in seconds per mm² of tissue, split by phase, with slide-level AJI.

Why: the number a user feels is how long a slide takes, not the network's Mpx/s. A 3x
faster network gives a much smaller slide speed-up when half of the slide's time is spent
around the network (reading, halo pixels, watershed, polygons, measurements, writing).
This benchmark runs the real command (``wsi-nuclei run SLIDE --model M``, a fresh process
per run, default cluster layout unless ``--cluster none``) on MoNuSeg-test mosaics that it
builds itself: the 14 test tiles laid at irregular offsets on glass, written as pyramidal
JPEG TIFFs at 40x (0.25 µm/px) and, box-downsampled, at 20x (0.5 µm/px). Truth is known, so
every run also gets a slide-level AJI (mean over the placed tiles, scored at 40x).

Seconds are the slide's own ``seconds`` from its ``summary.json`` (cluster start-up and
imports excluded; the process wall time is reported beside it). Tissue area is the area of
the placed tiles (0.875 mm² for the 14 MoNuSeg tiles, times ``--copies``: 3.5 mm² by default),
so every model is divided by the same figure. With several ``--copies`` (e.g. ``1 4 16``)
every magnification and model is also fitted as ``seconds = fixed + rate x mm²`` (least
squares over the copies): ``fixed`` is what a slide pays whatever its tissue (outputs'
metadata, preview, scheduling, the last tiles' tail), ``rate`` the big-slide cost per mm².
Phases: ``read``, ``network``, ``watershed`` (incl. re-predicting grown clusters), ``save``
(polygons, measurements, tile file), ``cells`` (the cells the tile tasks make,
``--cell-expansion`` only) are worker-seconds summed over tiles (``summary.json``
``tile_phases_s``); ``cells 1b`` (phase 1b: the cells the tile tasks left), ``labels`` and
``outputs`` (pyramid, table, GeoJSON, preview) are wall seconds of the later phases.

    python -m bench.slide_speed                                  # 20x + 40x, every shipped model, 4 copies
    python -m bench.slide_speed --models pruned80.pt --mags 40 --cluster none
    python -m bench.slide_speed --models pruned20x.pt --copies 1 4 16   # fixed cost + rate per mm²
    python -m bench.slide_speed --quick                          # synthetic tiles, tiny model
    python -m bench.slide_speed --models pruned20x.pt --mags 20 --variants '' '--cell-expansion 5' --repeats 3
    python -m bench.slide_speed --models pruned20x.pt --run-args=--stain-normalise \
        --json bench/results/slide_speed_stain_norm.json         # its cost: in the network phase
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import (
    REPO,
    default_json,
    headline,
    quiet_logs,
    run_info,
    scratch,
    tiny_checkpoint,
    weight_files,
    write_json,
)
from pipeline.slide_run.tile_file import PHASES

NAME = "slide_speed"
TRUTH_MPP = 0.25  # MoNuSeg (and the mosaic's 40x level 0)
LATER = ("cells 1b", "labels", "outputs")  # wall-second phases after the tile tasks
ANCHORS_S_PER_MM2 = {"StarDist/QuPath TF, 4-core CPU": 2.4, "StarDist/QuPath OpenVINO INT8, 4-core CPU": 1.25,
                     "HoVer-NeXt, GPU": 1.8}


def default_data() -> Path:
    from bench.accuracy_speed import default_data as monuseg_test

    return monuseg_test()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None,
                        help="checkpoints (default: every models/weights/*.pt; --quick: a tiny model)")
    parser.add_argument("--mags", nargs="*", type=int, default=[20, 40], choices=[20, 40],
                        help="mosaic magnifications (40: 0.25 µm/px, 20: 0.5 µm/px)")
    parser.add_argument("--data", type=Path, default=None, help="annotated folder (MoNuSeg test)")
    parser.add_argument("--cluster", choices=["local", "none"], default="local",
                        help="cluster layout of the runs (local = the default of wsi-nuclei run)")
    parser.add_argument("--run-args", default="", help="extra arguments for every wsi-nuclei run")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="run arguments to compare side by side (after --run-args; '' = none), "
                             "e.g. --variants '' '--cell-expansion 5': interleaved runs, medians and "
                             "each variant's ratio to the first, paired by repeat (a lone flag needs a "
                             "leading space, ' --gzip', or argparse takes it for an option)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every variant, interleaved (a shared machine's noise between "
                             "runs is as large as many effects worth measuring)")
    parser.add_argument("--seed", type=int, default=5, help="mosaic layout seed")
    parser.add_argument("--copies", type=int, nargs="+", default=None,
                        help="place every test tile this many times, one mosaic per value (default 4, "
                             "--quick 1): a slide pays a few seconds whatever its size, which a "
                             "0.875 mm² mosaic (--copies 1) overweights next to a real slide's "
                             "50-200 mm²; two values or more: fit seconds = fixed + rate x mm²")
    parser.add_argument("--keep", default=None, help="keep slides and outputs in this folder")
    parser.add_argument("--quick", action="store_true", help="synthetic tiles, tiny model (~1 min)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.copies is None:
        args.copies = [1 if args.quick else 4]
    if min(args.copies) < 1:
        parser.error("--copies must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def quick_folder(root: Path) -> Path:
    """Four synthetic 512² annotated tiles in the MoNuSeg layout (quick mode needs no data)."""
    import tifffile
    from PIL import Image

    from pipeline.synthetic import synthetic_he

    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k in range(4):
        rgb, labels = synthetic_he(512, 512, seed=100 + k)
        Image.fromarray(rgb).save(root / "images" / f"syn{k}.png")
        tifffile.imwrite(root / "labels" / f"syn{k}.tif", labels)
    return root


def build_mosaics(folder: Path, work: Path, mags: list[int], seed: int,
                  quick: bool, copies: int = 1,
                  ) -> tuple[dict[int, Path], np.ndarray, list[tuple[str, int, int, int, int]]]:
    """Pyramidal JPEG TIFFs of the mosaic at each magnification, the 40x truth and the
    placements (name, y, x, height, width)."""
    import tifffile

    from models.data import downsample_image
    from pipeline.pyramid_tiff import write_pyramidal_tiff
    from pipeline.synthetic import monuseg_mosaic

    names = sorted(p.stem for p in (folder / "images").glob("*.png")) * copies
    # one copy: the canvas the figures before 2026-12-03 used; more: the smallest that holds them
    canvas = None if copies > 1 else (1400, 1400) if quick else (4600, 4600)
    rgb, truth, placements = monuseg_mosaic(folder, seed=seed, canvas=canvas, names=names)
    sized = []
    for name, y, x in placements:
        h, w = tifffile.imread(folder / "labels" / f"{name}.tif").shape
        sized.append((name, y, x, h, w))
    slides = {}
    for mag in mags:
        factor = 40 // mag
        slides[mag] = write_pyramidal_tiff(work / f"mosaic-{mag}x.tif", downsample_image(rgb, factor),
                                           mpp=TRUTH_MPP * factor, compression="jpeg", quality=90)
    return slides, truth, sized


def slide_aji(out_dir: Path, factor: int, truth: np.ndarray,
              placements: list[tuple[str, int, int, int, int]]) -> float:
    """Mean AJI over the placed tiles, the slide's labels brought to the 40x truth grid."""
    import zarr

    from models.evaluate import upsample_labels
    from models.metrics import aji

    labels = zarr.open_group(str(out_dir / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]
    labels = upsample_labels(labels, factor, truth.shape)
    scores = [aji(truth[y:y + h, x:x + w].astype(np.int64), labels[y:y + h, x:x + w].astype(np.int64))
              for _, y, x, h, w in placements]
    return float(np.mean(scores))


def run_cli(target: Path, model: str | None, out: Path, cluster: str, extra: list[str],
            ) -> tuple[float, list[dict[str, Any]]]:
    """``wsi-nuclei run TARGET`` (a slide or a folder of slides) in a fresh process; returns
    its wall time and each slide's summary.json (with its ``out_dir``)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "--quiet", "run", str(target), "--out", str(out),
           "--cluster", cluster, *(["--model", model] if model else []), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    summaries = []
    for path in sorted(out.glob("*/summary.json")):
        summaries.append({**json.loads(path.read_text()), "out_dir": str(path.parent)})
    return wall, summaries


def run_one(slide: Path, model: str, out: Path, cluster: str, extra: list[str]) -> dict[str, Any]:
    """``wsi-nuclei run`` of one slide in a fresh process; returns its summary.json and the
    wall time."""
    wall, summaries = run_cli(slide, model, out, cluster, extra)
    if len(summaries) != 1:
        raise RuntimeError(f"{slide}: {len(summaries)} summaries in {out}")
    return {**summaries[0], "wall_s": wall}


def row_for(summary: dict[str, Any], tissue_mm2: float, aji_value: float) -> dict[str, Any]:
    seconds = float(summary["seconds"])
    phases = summary.get("tile_phases_s", {})
    timings = summary.get("timings_s", {})
    split = {name: float(phases.get(name, 0.0)) for name in PHASES}
    split["cells 1b"] = float(timings.get("cells_s", 0.0))
    split["labels"] = float(timings.get("labels_s", 0.0))
    split["outputs"] = float(timings.get("outputs_s", 0.0))
    return {"seconds": seconds, "wall_s": round(summary["wall_s"], 2), "s_per_mm2": seconds / tissue_mm2,
            "phase_s_per_mm2": {k: v / tissue_mm2 for k, v in split.items()},
            "nuclei": int(summary["nuclei"]), "slide_aji": aji_value, "tiles": summary["tiles_processed"],
            "level_read": summary["level_read"], "scale": summary["scale"],
            "model_mpp": summary["model_mpp"], "tissue_mask_mm2": (summary.get("tissue_area_um2") or 0) / 1e6,
            **({"cells": summary["cells"]} if "cells" in summary else {})}


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ["slide", "model", "mm2", "s", "s/mm2", *PHASES, *LATER, "nuclei", "AJI"]
    print("  ".join(f"{c:>12}" for c in cols))
    for r in rows:
        p = r["phase_s_per_mm2"]
        vals = [f"{r['mag']}x", r["model"], f"{r['tissue_mm2']:.2f}", f"{r['seconds']:.1f}",
                f"{r['s_per_mm2']:.2f}", *(f"{p[k]:.2f}" for k in (*PHASES, *LATER)),
                str(r["nuclei"]), f"{r['slide_aji']:.3f}"]
        print("  ".join(f"{v:>12}" for v in vals))


def fit_fixed_rate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per magnification and model with two tissue areas or more: ``seconds = fixed + rate x
    mm²`` by least squares over its runs (``fixed``: seconds a slide pays whatever its size)."""
    fits = []
    for mag, model in dict.fromkeys((r["mag"], r["model"]) for r in rows):
        runs = [r for r in rows if (r["mag"], r["model"]) == (mag, model)]
        area = np.array([r["tissue_mm2"] for r in runs])
        if len(set(area.tolist())) < 2:
            continue
        rate, fixed = np.polyfit(area, [r["seconds"] for r in runs], 1)
        fits.append({"mag": mag, "model": model, "fixed_s": float(fixed), "rate_s_per_mm2": float(rate),
                     "copies": [r["copies"] for r in runs], "tissue_mm2": area.tolist()})
    return fits


def print_fits(fits: list[dict[str, Any]]) -> None:
    print("fit: seconds = fixed + rate x mm² of tissue")
    cols = ["slide", "model", "fixed s", "rate s/mm2", "copies"]
    print("  ".join(f"{c:>12}" for c in cols))
    for f in fits:
        vals = [f"{f['mag']}x", f["model"], f"{f['fixed_s']:.2f}", f"{f['rate_s_per_mm2']:.2f}",
                ",".join(map(str, f["copies"]))]
        print("  ".join(f"{v:>12}" for v in vals))


def compare_variants(rows: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Per magnification, model, size and variant: the median s/mm² over the repeats and
    the median of its per-repeat ratio to the first variant (runs next to each other are
    compared with each other, not with the average of a noisy machine)."""
    out = []
    groups = sorted({(r["mag"], r["model"], r["copies"]) for r in rows})
    for mag, model, copies in groups:
        mine = [r for r in rows if (r["mag"], r["model"], r["copies"]) == (mag, model, copies)]
        first = {r["repeat"]: r["s_per_mm2"] for r in mine if r["variant"] == variants[0]}
        for k, variant in enumerate(variants):
            runs = [r for r in mine if r["variant"] == variant]
            ratios = [r["s_per_mm2"] / first[r["repeat"]] for r in runs if r["repeat"] in first]
            out.append({"mag": mag, "model": model, "copies": copies, "variant": variant, "index": k,
                        "repeats": len(runs),
                        "median_s_per_mm2": float(np.median([r["s_per_mm2"] for r in runs])),
                        "s_per_mm2": [r["s_per_mm2"] for r in runs],
                        "median_ratio": float(np.median(ratios)), "ratios": ratios,
                        "tissue_mm2": runs[0]["tissue_mm2"],
                        "median_phase_s_per_mm2": {
                            p: float(np.median([r["phase_s_per_mm2"][p] for r in runs]))
                            for p in runs[0]["phase_s_per_mm2"]}})
    return out


def print_comparisons(comparisons: list[dict[str, Any]]) -> None:
    cols = ["slide", "model", "mm2", "variant", "runs", "median s/mm2", "x first", "ratios"]
    print("  ".join(f"{c:>12}" for c in cols))
    for c in comparisons:
        vals = [f"{c['mag']}x", c["model"], f"{c['tissue_mm2']:.2f}", repr(c["variant"]), str(c["repeats"]),
                f"{c['median_s_per_mm2']:.2f}", f"{c['median_ratio']:.3f}",
                ",".join(f"{x:.2f}" for x in c["ratios"])]
        print("  ".join(f"{v:>12}" for v in vals))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_logs()
    with scratch("bench-slide-speed-", args.keep) as work:
        if args.quick:
            folder = quick_folder(work / "tiles")
            models = args.models or [str(tiny_checkpoint(work, mpp=0.5))]
        else:
            folder = args.data or default_data()
            if not (folder / "images").is_dir():
                raise SystemExit(f"no MoNuSeg test folder at {folder} (use --data or --quick)")
            models = args.models or [str(p) for p in weight_files()]
        rows = []
        variants = args.variants or [""]
        bar = tqdm(total=len(args.mags) * len(models) * len(args.copies) * len(variants) * args.repeats,
                   desc=NAME, unit="run", file=sys.stderr)
        for copies in args.copies:
            where = work if len(args.copies) == 1 else work / f"copies-{copies}"
            where.mkdir(parents=True, exist_ok=True)
            slides, truth, placements = build_mosaics(folder, where, args.mags, args.seed, args.quick,
                                                      copies)
            tissue_mm2 = sum(h * w for _, _, _, h, w in placements) * TRUTH_MPP ** 2 / 1e6
            for mag, slide in slides.items():
                for model in models:
                    for repeat in range(args.repeats):
                        for k, variant in enumerate(variants):
                            single = len(variants) * args.repeats == 1
                            out = where / (f"out-{mag}x-{Path(model).stem}"
                                           + ("" if single else f"-v{k}-r{repeat}"))
                            summary = run_one(slide, model, out, args.cluster,
                                              [*args.run_args.split(), *variant.split()])
                            score = slide_aji(Path(summary["out_dir"]), 40 // mag, truth, placements)
                            if repeat < args.repeats - 1:
                                shutil.rmtree(out, ignore_errors=True)  # the last repeat's outputs are kept
                            rows.append({"mag": mag, "model": Path(model).name, "copies": copies,
                                         "variant": variant, "repeat": repeat,
                                         "tissue_mm2": tissue_mm2, "tiles_placed": len(placements),
                                         **row_for(summary, tissue_mm2, score)})
                            bar.update()
        bar.close()
    print_table(rows)
    fits = fit_fixed_rate([r for r in rows if r["variant"] == variants[0]])
    if fits:
        print_fits(fits)
    comparisons = compare_variants(rows, variants) if len(variants) > 1 or args.repeats > 1 else []
    if comparisons:
        print_comparisons(comparisons)
    best = min(rows, key=lambda r: r["s_per_mm2"])
    def per_size(key: str) -> Any:  # the JSON of one size keeps its former scalar fields
        values = sorted({r[key] for r in rows})
        return values[0] if len(values) == 1 else values

    result = {**run_info(NAME, argv, 0), "cluster": args.cluster, "copies": per_size("copies"),
              "tissue_mm2": per_size("tissue_mm2"), "tiles_placed": per_size("tiles_placed"),
              "anchors_s_per_mm2": ANCHORS_S_PER_MM2, "runs": rows,
              "fits": fits, "comparisons": comparisons}
    result["headline"] = headline(
        f"fastest {best['model']} on the {best['mag']}x mosaic: {best['s_per_mm2']:.2f} s/mm² of tissue "
        f"(slide AJI {best['slide_aji']:.3f}, cluster {args.cluster})"
        + "".join(f"; {f['mag']}x {f['model']}: {f['fixed_s']:.1f} s per slide + {f['rate_s_per_mm2']:.2f} "
                  f"s/mm²" for f in fits)
        + "".join(f"; {c['mag']}x {c['model']} '{c['variant']}': {c['median_s_per_mm2']:.2f} s/mm², "
                  f"{c['median_ratio']:.2f}x the first" for c in comparisons if c["index"] > 0))
    write_json(args.json or default_json(NAME, args.quick), result)
    return result


if __name__ == "__main__":
    main()
