"""Variants of --stain-normalise scored like `wsi-nuclei evaluate` (README.md here).

Why: the command line's variant (each image's vectors to REFERENCE, vectors only) lost on
the validation images; these check whether another choice would have won: Macenko's
concentration scaling, the image's own background kept, QuPath's default vectors as the
reference (background 255 or the image's), and vectors estimated once per slide from all
its crops (what `wsi-nuclei run` does; TNBC's validation slides have 4-5 crops each).

    python docs/results/stain-norm/variants.py val ../shared/data/monuseg/train ../shared/data/tnbc/train:0.25
    python docs/results/stain-norm/variants.py test ../shared/data/monuseg/test
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models import checkpoints
from models.data import list_pairs, load_image
from models.datasets import parse_dataset, slide_of
from models.evaluate import evaluate_folder, to_model_resolution
from models.runtime import with_runtime
from models.tune import validation_sets
from pipeline.measure import stain as S
from pipeline.tissue import SAT_FLOOR, tissue_signal

log = logging.getLogger("variants")
KEYS = ("aji", "pq", "f1", "precision", "recall", "dice")
Prepare = Callable[[np.ndarray], np.ndarray]


def estimate(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, S.StainVectors]:
    """Pixels (N x 3), which are stained, and their vectors, as evaluate estimates them."""
    pixels = pixels.reshape(-1, 3)
    stained = tissue_signal(pixels[None])[0] > SAT_FLOOR
    return pixels, stained, S.stains_of_pixels(pixels, stained)


def scaled(rgb: np.ndarray) -> np.ndarray:
    px, st, found = estimate(rgb)
    return S.normalise_stains(rgb, found, source_max=S.concentration_percentiles(px[st], found))


def keep_background(rgb: np.ndarray) -> np.ndarray:
    found = estimate(rgb)[2]
    return S.normalise_stains(rgb, found, replace(S.REFERENCE, background=found.background))


def qupath_255(rgb: np.ndarray) -> np.ndarray:
    return S.normalise_stains(rgb, estimate(rgb)[2], S.StainVectors())


def qupath_keep_background(rgb: np.ndarray) -> np.ndarray:
    found = estimate(rgb)[2]
    return S.normalise_stains(rgb, found, S.StainVectors(background=found.background))


def per_slide(bundle: checkpoints.ModelBundle, folder: Path, mpp: float, names: list[str]) -> Prepare:
    """Each image normalised with its slide's vectors, estimated once from all its crops;
    images come in ``names`` order (``predict_folder`` sorts them)."""
    pooled: dict[str, list[np.ndarray]] = {}
    for image, _ in list_pairs(folder):
        if image.stem in names:
            native = load_image(image)
            rgb = to_model_resolution(native, np.zeros(native.shape[:2], np.int32), bundle.mpp, mpp)[0]
            pooled.setdefault(slide_of(image.stem), []).append(rgb.reshape(-1, 3))
    vectors = {slide: estimate(np.concatenate(parts))[2] for slide, parts in pooled.items()}
    order = iter(sorted(names))
    return lambda rgb: S.normalise_stains(rgb, vectors[slide_of(next(order))])


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    bundle = with_runtime(checkpoints.load("models/weights/pruned20x.pt", device=cpu, fold_bn=True), cpu)
    specs = [parse_dataset(d, 0.25) for d in argv[1:]]
    if argv[0] == "val":
        sets = [(spec, list(names)) for spec, names in validation_sets(bundle, specs)]
    else:
        sets = [(spec, [image.stem for image, _ in list_pairs(spec.folder)]) for spec in specs]
    variants: dict[str, Callable[..., Prepare]] = {
        "scaled": lambda *_: scaled, "keep_background": lambda *_: keep_background,
        "qupath_255": lambda *_: qupath_255, "qupath_keep_background": lambda *_: qupath_keep_background,
        "per_slide": per_slide}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, make in variants.items():
        out[name] = {}
        for spec, names in sets:
            prepare = make(bundle, spec.folder, spec.mpp, names)
            r = evaluate_folder(bundle, spec.folder, names=names, progress=False, data_mpp=spec.mpp,
                                prepare=prepare)
            out[name][spec.name] = {k: r[k] for k in KEYS}
        log.warning("%s: %s", name, {d: {k: round(v, 4) for k, v in m.items()} for d, m in out[name].items()})
    path = Path(__file__).with_name(f"variants-{argv[0]}.json")
    record = {"command": " ".join(["python", *sys.argv]), "variants": out}
    path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
