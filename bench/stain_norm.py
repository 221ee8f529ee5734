"""Per-slide stain normalisation (``wsi-nuclei run --stain-normalise``): its reference and
its cost.

Why: the normalisation is per pixel, on every tile before the network, so its price is
paid per mm² of tissue; and its reference (``pipeline.measure.stain.REFERENCE``) must be
reproducible from the training images, not copied from elsewhere.

``--reference`` re-estimates the reference from the training images the default model was
trained on (its checkpoint's datasets, validation images left out), at the model's
resolution, each image as evaluate estimates it (``stains_of_pixels`` on its
``tissue_signal`` pixels); per dataset the unit mean of its images' vectors, the median of
their backgrounds and of their 99th-percentile concentrations; then the mean of the
datasets (each weighs the same, as in training). Default: the seconds of
``normalise_stains`` on a 1024² tile, on the 1376² window the network sees for it (the
default model's 176 px halo each side) and on one mm² of tissue at 0.5 µm/px (2000², 4 Mpx),
one thread, median of ``--rounds``; per mm² in a run: 1376² windows x (2000 / 1024)² tiles.

    python -m bench.stain_norm                     # cost per tile and per mm²
    python -m bench.stain_norm --reference         # the reference from the training images
    python -m bench.stain_norm --quick             # a 256² image (seconds)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import default_json, headline, run_info, write_json

NAME = "stain_norm"
MM2_SIDE_PX = 2000  # one mm² at 0.5 µm/px (the default model's resolution)
TILE, WINDOW = 1024, 1376  # the run's default tile and its window with pruned20x.pt's halo (176 px)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", action="store_true",
                        help="estimate the reference from the default model's training images")
    parser.add_argument("--model", default="models/weights/pruned20x.pt",
                        help="the checkpoint whose training images give the reference")
    parser.add_argument("--rounds", type=int, default=7, help="timed calls per size (median)")
    parser.add_argument("--quick", action="store_true", help="a 256² image, 2 rounds")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def _unit(v: Any) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def reference(model: str) -> dict[str, Any]:
    """The training images' typical H&E (see the module docstring), per dataset and mean."""
    from models import checkpoints
    from models.data import list_pairs, load_image
    from models.evaluate import to_model_resolution
    from pipeline.measure.stain import angle_deg, concentration_percentiles, stains_of_pixels
    from pipeline.tissue import SAT_FLOOR, tissue_signal

    bundle = checkpoints.load(model, "cpu")
    datasets: dict[str, Any] = {}
    for rec in bundle.provenance["datasets"]:
        rows = []
        for image, _ in list_pairs(rec["folder"]):
            if image.stem in rec["val_images"]:
                continue
            native = load_image(image)
            rgb = to_model_resolution(native, np.zeros(native.shape[:2], np.int32), bundle.mpp,
                                      float(rec["mpp"]), image.stem)[0]
            pixels = rgb.reshape(-1, 3)
            stained = tissue_signal(pixels[None])[0] > SAT_FLOOR
            found = stains_of_pixels(pixels, stained)
            rows.append({"image": image.stem, "source": found.source, "hematoxylin": found.hematoxylin,
                         "eosin": found.eosin, "background": found.background,
                         "max_concentrations": concentration_percentiles(pixels[stained], found)})
        ok = [r for r in rows if r["source"] == "estimated"]
        h = _unit(np.mean([_unit(r["hematoxylin"]) for r in ok], axis=0))
        e = _unit(np.mean([_unit(r["eosin"]) for r in ok], axis=0))
        datasets[rec["name"]] = {
            "images": len(rows), "estimated": len(ok), "hematoxylin": h, "eosin": e,
            "background": np.median([r["background"] for r in rows], axis=0),
            "max_concentrations": np.median([r["max_concentrations"] for r in ok], axis=0),
            "median_deg_from_mean": [float(np.median([angle_deg(r[k], v) for r in ok]))
                                     for k, v in (("hematoxylin", h), ("eosin", e))],
            "per_image": rows}
    parts = list(datasets.values())
    out = {"hematoxylin": _unit(np.mean([d["hematoxylin"] for d in parts], axis=0)).round(5),
           "eosin": _unit(np.mean([d["eosin"] for d in parts], axis=0)).round(5),
           "background": np.mean([d["background"] for d in parts], axis=0).round(0),
           "max_concentrations": np.mean([d["max_concentrations"] for d in parts], axis=0).round(3)}
    return {"reference": out, "datasets": datasets}


def cost(sides: list[int], rounds: int) -> dict[str, float]:
    """Median seconds of ``normalise_stains`` on a ``side``² image, per side; the image is
    H&E-like (two stains at random concentrations), the slide's vectors 8 degrees off."""
    from pipeline.measure.stain import StainVectors, normalise_stains

    slide = StainVectors((0.55, 0.76, 0.35), (0.12, 0.85, 0.51), (241.0, 238.0, 244.0))
    rng = np.random.default_rng(0)
    out = {}
    for side in sides:
        conc = rng.uniform(0, 1.2, (side, side, 2)).astype(np.float32)
        od = conc @ slide.matrix()[:2].astype(np.float32)
        rgb = np.clip(np.asarray(slide.background, np.float32) * 10 ** -od, 0, 255).astype(np.uint8)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            normalise_stains(rgb, slide)
            times.append(time.perf_counter() - t0)
        out[str(side)] = float(np.median(times))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    summary: dict[str, Any] = run_info(NAME, argv, 1)
    if args.reference:
        found = reference(args.model)
        summary.update(found)
        ref = found["reference"]
        text = (f"reference H {ref['hematoxylin'].tolist()} E {ref['eosin'].tolist()} background "
                f"{ref['background'].tolist()} max concentrations {ref['max_concentrations'].tolist()}")
    else:
        if args.quick:
            args.rounds = 2
        sides = [256] if args.quick else [TILE, WINDOW, MM2_SIDE_PX]
        seconds = cost(sides, args.rounds)
        summary["seconds"] = seconds
        side = sides[-1]
        per_mm2 = seconds[str(side)] * (MM2_SIDE_PX / side) ** 2
        summary["seconds_per_mm2_at_0.5um"] = per_mm2
        text = (", ".join(f"{s}²: {t:.3f} s" for s, t in seconds.items())
                + f"; {per_mm2:.3f} s per mm² of tissue at 0.5 µm/px (one thread)")
        if not args.quick:  # the windows a run normalises: tiles with their halos
            summary["run_seconds_per_mm2"] = seconds[str(WINDOW)] * (MM2_SIDE_PX / TILE) ** 2
            text += f", {summary['run_seconds_per_mm2']:.3f} s with the tiles' halos"
    summary["headline"] = headline(text)
    write_json(args.json or default_json(NAME + ("_reference" if args.reference else ""), args.quick),
               summary)
    return summary


if __name__ == "__main__":
    main()
