"""``wsi-nuclei evaluate`` and ``wsi-nuclei tune``: thin wrappers around
:mod:`models.evaluate` and :mod:`models.tune` (parsing, a printed table, JSON output).

Does not import :mod:`pipeline.cli` (which imports this module to register the parsers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.atomic import atomic_write_text
from pipeline.cliutil import add_threads_argument, formatter, set_torch_threads

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("wsi_nuclei")

TABLE_COLUMNS = ("name", "n_true", "n_pred", "dice", "aji", "pq", "f1", "semantic_dice",
                 "regression_mse")




def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint path or shipped model name (dense, pruned80 ...)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_threads_argument(p)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", formatter_class=formatter, help="score a model on an annotated folder",
        description="Segment every image of an annotated folder (images/*.png, labels/*.tif) "
                    "with the model and its stored watershed parameters, and report Dice, "
                    "AJI, PQ, detection F1 (native resolution) and the semantic Dice and "
                    "regression MSE of the raw outputs (model resolution). Images at another "
                    "resolution than the model's are resampled as 'wsi-nuclei run' resamples "
                    "a slide, and instances are scored against the native labels.",
        epilog="examples:\n"
               "  wsi-nuclei evaluate --model dense.pt --data ../shared/data/monuseg/test\n"
               "  wsi-nuclei evaluate --model runs/dense/best.pt --data DIR --json scores.json\n"
               "  wsi-nuclei evaluate --model pruned80 --data DIR --images NAME1,NAME2\n"
               "  wsi-nuclei evaluate --model dense.pt --data DIR20X --mpp 0.5   "
               "# a 20x folder, a 40x model\n"
               "  wsi-nuclei evaluate --model pruned20x.pt --val --data ../shared/data/monuseg/train "
               "../shared/data/tnbc/train:0.25")
    _model_arguments(p)
    p.add_argument("--data", required=True, nargs="+", metavar="FOLDER[:MPP]",
                   help="annotated folder(s) with images/ and labels/, each optionally with the "
                        "µm/px of its images; several folders are scored and reported one by "
                        "one, with their mean")
    p.add_argument("--val", action="store_true",
                   help="score only the validation images the checkpoint records for each folder "
                        "(slides it was not trained on)")
    p.add_argument("--mpp", type=float, default=None, metavar="X",
                   help="µm per pixel of the folder's images (default: 0.25, MoNuSeg); they "
                        "are resampled to the model's µm/px like a slide, e.g. up 2x for "
                        "0.5 with a 0.25 model")
    p.add_argument("--json", metavar="OUT", help="also write all scores as JSON (atomic)")
    p.add_argument("--overlays", metavar="DIR",
                   help="also write a truth | prediction picture per image (missed nuclei in "
                        "red, false ones in magenta) under DIR/<dataset>/")
    p.add_argument("--images", help="comma-separated image names (default: all)")
    p.add_argument("--stain-normalise", action="store_true",
                   help="re-render each image, at model resolution, from its own stain vectors "
                        "(estimated on its tissue pixels) in the training images' typical H&E "
                        "before the network, as 'wsi-nuclei run --stain-normalise' does a slide's tiles")
    p.set_defaults(func=_run_evaluate)


def add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", formatter_class=formatter, help="tune the watershed on validation images",
        description="Grid-search the watershed parameters (fg/marker thresholds, minimum "
                    "marker and nucleus sizes) for maximal mean AJI on the validation images "
                    "recorded in the checkpoint, found in the TRAINING folder, and save a "
                    "copy of the checkpoint with the tuned parameters.",
        epilog="examples:\n"
               "  wsi-nuclei tune --model runs/dense/best.pt "
               "--data ../shared/data/monuseg/train --out runs/dense/tuned.pt")
    _model_arguments(p)
    p.add_argument("--data", nargs="+", metavar="FOLDER[:MPP]",
                   help="the training folder(s) of the model (default: those its checkpoint records)")
    p.add_argument("--out", required=True, help="new checkpoint with the tuned parameters")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16 (half the file; how shipped models are stored)")
    p.set_defaults(func=_run_tune)


def _setup_torch(args: argparse.Namespace) -> Any:
    from models.inference import pick_device, retain_freed_memory

    set_torch_threads(args.threads)
    retain_freed_memory()
    return pick_device(args.device)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """Per-image rows and the mean row of an ``evaluate_folder`` result."""
    rows = [[_fmt(r[c]) for c in TABLE_COLUMNS] for r in result["per_image"]]
    n = max(len(result["per_image"]), 1)
    mean = ["mean", f'{sum(r["n_true"] for r in result["per_image"]) / n:.1f}',
            f'{sum(r["n_pred"] for r in result["per_image"]) / n:.1f}']
    rows.append(mean + [_fmt(result[c]) for c in TABLE_COLUMNS[3:]])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(TABLE_COLUMNS)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(TABLE_COLUMNS, widths)))]
    for k, row in enumerate(rows):
        if k == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (temp file in the same folder + rename)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def _run_evaluate(args: argparse.Namespace) -> int:
    from models import checkpoints
    from models.datasets import MONUSEG_MPP, parse_dataset
    from models.evaluate import evaluate_folder
    from models.runtime import with_runtime
    from models.tune import validation_sets

    device = _setup_torch(args)
    # the network slides run: the checkpoint's OpenVINO model on the CPU where there is one
    bundle = with_runtime(checkpoints.load(args.model, device=device, fold_bn=True), device)
    runtime = getattr(bundle.net, "runtime", "torch")
    # --mpp: the µm/px of the folders named without their own
    specs = [parse_dataset(d, MONUSEG_MPP if args.mpp is None else args.mpp) for d in args.data]
    names = [n.strip() for n in args.images.split(",") if n.strip()] if args.images else None
    wanted: list[list[str] | None] = [names] * len(specs)
    if args.val:
        recorded = validation_sets(bundle, specs)
        if len(recorded) != len(specs):
            raise ValueError(f"--val: {bundle.path} records validation images for "
                             f"{len(recorded)} of the {len(specs)} folders")
        specs = [spec for spec, _ in recorded]
        wanted = [[n for n in val if names is None or n in names] for _, val in recorded]
    results = {}
    for spec, chosen in zip(specs, wanted):
        result = evaluate_folder(bundle, spec.folder, names=chosen, progress=not args.quiet,
                                 data_mpp=spec.mpp,
                                 overlays=Path(args.overlays) / spec.name if args.overlays else None,
                                 prepare=normalise_image if args.stain_normalise else None)
        result["stain_normalise"] = bool(args.stain_normalise)
        results[spec.name] = result
        if len(specs) > 1:
            print(f"\n{spec.name} ({spec.folder}, {spec.mpp:g} µm/px)")
        print(format_table(result))
    data_at = ", ".join(f"{spec.mpp:g} µm/px" for spec in specs)
    print(f"model {bundle.path} (sha256 {bundle.sha256[:12]}, {bundle.mpp} µm/px, {runtime}) on data "
          f"at {data_at}, watershed {next(iter(results.values()))['watershed']}")
    if len(results) > 1:
        print(format_summary(results))
    if args.json:
        payload = results[specs[0].name] if len(results) == 1 else {
            "datasets": results, "mean_over_datasets": mean_over_datasets(results)}
        log.info("wrote %s", write_json(payload, args.json))
    return 0


def normalise_image(rgb: np.ndarray, scaled: bool = False) -> np.ndarray:
    """An annotated image (at model resolution) stain-normalised as a slide is: its own
    vectors from its H&E-coloured pixels (``tissue_signal``, the slide's sampled windows'
    test), mapped to ``measure.stain.REFERENCE``; ``scaled``: also Macenko's scaling of
    its 99th-percentile concentrations to the reference's."""
    from pipeline.measure.stain import concentration_percentiles, normalise_stains, stains_of_pixels
    from pipeline.tissue import SAT_FLOOR, tissue_signal

    pixels = rgb.reshape(-1, 3)
    stained = tissue_signal(pixels[None])[0] > SAT_FLOOR
    found = stains_of_pixels(pixels, stained)
    log.debug("stain vectors %s (%s)", found.to_qupath(), found.source)
    top = concentration_percentiles(pixels[stained], found) if scaled else None
    return normalise_stains(rgb, found, source_max=top)


SUMMARY_KEYS = ("aji", "pq", "f1", "precision", "recall", "dice")


def mean_over_datasets(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each dataset weighs the same, whatever its number of images."""
    return {k: sum(r[k] for r in results.values()) / len(results) for k in SUMMARY_KEYS}


def format_summary(results: dict[str, dict[str, Any]]) -> str:
    """One row per dataset (means over its images) and their mean."""
    width = max(len(n) for n in [*results, "mean"])
    lines = ["dataset".ljust(width) + "  images  " + "  ".join(k.rjust(9) for k in SUMMARY_KEYS)]
    rows = [(n, r["n_images"], r) for n, r in results.items()]
    rows.append(("mean", "", mean_over_datasets(results)))
    for name, n, r in rows:
        lines.append(name.ljust(width) + f"  {n!s:>6}  " + "  ".join(f"{r[k]:9.4f}" for k in SUMMARY_KEYS))
    return "\n".join(lines)


def _run_tune(args: argparse.Namespace) -> int:
    from models.tune import retune_checkpoint

    device = _setup_torch(args)
    from models.datasets import parse_dataset

    data = [parse_dataset(d) for d in args.data] if args.data else None
    path, params, record = retune_checkpoint(args.model, data, args.out, device=str(device),
                                             half=args.half, progress=not args.quiet)
    previous = record["previous_aji"]
    print(f"tuned on {len(record['val_images'])} validation image(s), {record['settings']} settings")
    print(f"best watershed {params.to_dict()}: mean AJI {record['best_aji']:.4f}"
          + (f" (stored setting: {previous:.4f})" if previous is not None else ""))
    print(f"saved {path}")
    return 0
