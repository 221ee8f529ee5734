"""Evaluation of a model on an annotated folder (MoNuSeg layout), at native resolution.

The images of the folder are at ``data_mpp`` um/px (MoNuSeg: 0.25) and are brought to the
model's resolution the way the slide pipeline brings a slide there, so that a folder scores
a model as ``wsi-nuclei run`` would use it on a flat scan of those pixels: the model image
is :func:`pipeline.slide.region.read_region` of :func:`pipeline.slide.region.plan_read` on a
single-level in-memory slide (ceil(H / scale) model pixels, scale = model mpp / data mpp; bilinear at
source coordinate (i + 0.5) * scale - 0.5 for a non-integer scale, up-sampling included).
One exception keeps published numbers: where the pipeline would box-average k x k pixels
(an integer scale k, e.g. a 20x model on 40x MoNuSeg), the image is
:func:`models.data.downsample_image` as before (floor(H / k) pixels, a box mean rounded
half to even where ``read_region`` rounds half up: at most one grey level on exact ties).

Instances are post-processed at model resolution and brought back to the native labels'
grid by nearest neighbour, as ``pipeline.slide_run.blocks.write_label_block`` does (native pixel y takes
model pixel floor((y + 0.5) / scale); below 1, nuclei that this splits are bridged,
``pipeline.label_sampling``), so that scores are always against the original annotations
and comparable across resolutions. The semantic Dice and the regression MSE
describe the raw network outputs and are computed at model resolution against the native
labels sampled by the opposite nearest map (model pixel i takes native pixel
floor((i + 0.5) * scale), which is :func:`models.data.downsample_labels` for an integer k).

Network outputs are cached per image (:func:`predict_folder`) so that several watershed
settings can be scored (:func:`score_predictions`) without running the network again.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.checkpoints import ModelBundle
from models.config import WatershedParams
from models.data import downsample_image, downsample_labels, list_pairs, load_image, load_sample
from models.datasets import MONUSEG_MPP
from models.inference import predict_image
from models.metrics import instance_scores
from models.targets import distance_map
from models.watershed import postprocess

log = logging.getLogger(__name__)

SCORE_KEYS = ("dice", "aji", "pq", "dq", "sq", "precision", "recall", "f1", "split_rate",
              "merge_rate", "semantic_dice", "regression_mse")


@dataclass
class Prediction:
    """Network outputs for one annotated image, with what is needed to score them."""

    name: str
    prob: np.ndarray  # float32, model resolution
    dist: np.ndarray  # float32, model resolution
    truth: np.ndarray  # instance labels, native resolution
    # native pixels per model pixel (per axis): the int k of box downsampling by k, else the
    # exact scale (a float; < 1 when the model is finer than the data)
    factor: float
    mpp: float  # model resolution, um/px
    semantic_dice: float
    regression_mse: float


def resolution_factor(model_mpp: float, data_mpp: float = MONUSEG_MPP) -> int:
    """Integer downsampling from data to model resolution; an error if there is none."""
    ratio = model_mpp / data_mpp
    factor = round(ratio)
    if factor < 1 or abs(ratio - factor) > 0.02 * factor:
        raise ValueError(f"model resolution {model_mpp} um/px is not an integer multiple "
                         f"of the data resolution {data_mpp} um/px")
    return int(factor)


def upsample_labels(labels: np.ndarray, factor: float, shape: tuple[int, int]) -> np.ndarray:
    """Model-resolution labels on the native grid of ``shape``, by nearest neighbour.

    An integer ``factor`` (box downsampling) repeats each model pixel f x f times: model
    pixel (i, j) covers native ``[i*f, (i+1)*f) x [j*f, (j+1)*f)``, and native rows/columns
    dropped by the downsampling (the remainder of H/f) stay background. Any other factor
    (the scale of a pipeline read) maps native pixel y to model pixel
    floor((y + 0.5) / factor), and below 1 bridges nuclei that this sampling splits, with
    ``pipeline.label_sampling`` as the pipeline's label writer does, so that a folder is
    scored as the pipeline would label it."""
    if float(factor).is_integer():
        f = int(factor)
        if f > 1:
            labels = np.repeat(np.repeat(labels, f, axis=0), f, axis=1)
        out = np.zeros(shape, dtype=labels.dtype)
        h, w = min(shape[0], labels.shape[0]), min(shape[1], labels.shape[1])
        out[:h, :w] = labels[:h, :w]
        return out
    from pipeline.label_sampling import sample_labels

    return sample_labels(labels, float(factor), shape).astype(labels.dtype, copy=False)


def native_index(n: int, scale: float, limit: int) -> np.ndarray:
    """Native pixel of each of ``n`` model pixel centres: floor((i + 0.5) * scale), clipped
    to ``limit``. The reverse of ``block_rows``: how targets reach the model grid."""
    idx = np.floor((np.arange(n) + 0.5) * scale).astype(np.int64)
    return np.clip(idx, 0, limit - 1)


def _flat_slide(rgb: np.ndarray, mpp: float, name: str) -> Any:
    """One annotated image as a single-level in-memory slide (a ``SlideReader``): a memory
    slide of more than ``MEMORY_COARSEST`` pixels would get box-filtered levels that the
    data does not have, and the pipeline would read those instead of these pixels."""
    from pipeline.slide.memory import MemorySlide

    slide = MemorySlide(rgb, mpp, name=name)
    slide.info = replace(slide.info, levels=slide.info.levels[:1])
    return slide


def to_model_resolution(image: np.ndarray, labels: np.ndarray, model_mpp: float,
                        data_mpp: float, name: str = "image") -> tuple[np.ndarray, np.ndarray, float]:
    """The image the network sees, the labels on the same grid and the factor
    (:attr:`Prediction.factor`) that brings model labels back to native pixels."""
    from pipeline.slide.region import _residual, plan_read, read_region
    from pipeline.types import Box

    slide = _flat_slide(image, data_mpp, name)
    plan = plan_read(slide.info, model_mpp)
    _, k = _residual(plan)
    if k is not None:  # box mean of k x k pixels: the downsampling that scores always had
        small_image = downsample_image(image, k)
        small = downsample_labels(labels, k)[: small_image.shape[0], : small_image.shape[1]]
        return small_image, small, k
    small_image = read_region(slide, plan, Box(0, 0, *plan.shape))
    rows = native_index(plan.shape[0], plan.scale, labels.shape[0])
    cols = native_index(plan.shape[1], plan.scale, labels.shape[1])
    return small_image, labels[np.ix_(rows, cols)], plan.scale


def predict_folder(bundle: ModelBundle, folder: str | Path, *, names: list[str] | None = None,
                   progress: bool = True, data_mpp: float = MONUSEG_MPP,
                   prepare: Callable[[np.ndarray], np.ndarray] | None = None) -> list[Prediction]:
    """Run the network once per image of an annotated folder (optionally only ``names``)
    whose images are at ``data_mpp`` um/px (see the module docstring for the resampling);
    ``prepare`` maps each image at model resolution to what the network sees (e.g. the
    command line's stain normalisation, as ``wsi-nuclei run`` applies it to a tile)."""
    if not (data_mpp > 0 and math.isfinite(data_mpp)):
        raise ValueError(f"data resolution must be a positive um/px, got {data_mpp}")
    pairs = {image.stem: (image, label) for image, label in list_pairs(folder)}
    if names is not None:
        missing = sorted(set(names) - set(pairs))
        if missing:
            raise FileNotFoundError(f"{folder}: no annotated image named {', '.join(missing)}")
        pairs = {n: pairs[n] for n in sorted(set(names))}
    bundle.net.eval()
    out = []
    for name in tqdm(list(pairs), desc="predict", unit="image", disable=not progress,
                     file=sys.stderr):
        sample = load_sample(*pairs[name])
        image, small, factor = to_model_resolution(sample.image, sample.labels, bundle.mpp,
                                                   data_mpp, name)
        prob, dist = predict_image(bundle.net, image if prepare is None else prepare(image))
        truth_mask = small > 0
        pred_mask = prob > 0.5
        total = int(truth_mask.sum()) + int(pred_mask.sum())
        sem = 1.0 if total == 0 else 2.0 * int((truth_mask & pred_mask).sum()) / total
        target = distance_map(small, bundle.targets.distance_norm)
        mse = float(np.mean((dist.astype(np.float64) - target) ** 2))
        out.append(Prediction(name, prob.astype(np.float32), dist.astype(np.float32),
                              sample.labels, factor, float(bundle.mpp), sem, mse))
        log.debug("%s: semantic dice %.4f, regression mse %.5f", name, sem, mse)
    return out


def segment(prediction: Prediction, watershed: WatershedParams) -> np.ndarray:
    """Instances of one prediction at native resolution."""
    labels = postprocess(prediction.prob, prediction.dist, watershed)
    return upsample_labels(labels, prediction.factor, prediction.truth.shape)


def score_prediction(prediction: Prediction, watershed: WatershedParams,
                     labels: np.ndarray | None = None) -> dict[str, Any]:
    """All scores of one image for one watershed setting (``labels``: its segmentation,
    when the caller has made it already)."""
    if labels is None:
        labels = segment(prediction, watershed)
    scores = instance_scores(prediction.truth, labels)
    return {"name": prediction.name,
            "n_true": int(np.unique(prediction.truth[prediction.truth > 0]).size),
            "n_pred": int(labels.max()),
            **scores,
            "semantic_dice": prediction.semantic_dice,
            "regression_mse": prediction.regression_mse}


def score_predictions(predictions: list[Prediction], watershed: WatershedParams,
                      on_labels: Callable[[Prediction, np.ndarray], None] | None = None) -> dict[str, Any]:
    """Per-image scores and their means over images (JSON-able); ``on_labels`` sees each
    image's segmentation (e.g. to draw it), which is made once."""
    per_image = []
    for p in predictions:
        labels = segment(p, watershed)
        if on_labels is not None:
            on_labels(p, labels)
        per_image.append(score_prediction(p, watershed, labels))
    means = {key: float(np.mean([row[key] for row in per_image])) if per_image else float("nan")
             for key in SCORE_KEYS}
    return {**means, "n_images": len(per_image), "per_image": per_image,
            "watershed": watershed.to_dict()}


def evaluate_folder(bundle: ModelBundle, folder: str | Path, *,
                    watershed: WatershedParams | None = None, names: list[str] | None = None,
                    progress: bool = True, data_mpp: float = MONUSEG_MPP,
                    overlays: str | Path | None = None,
                    prepare: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """Scores of ``bundle`` on an annotated folder at ``data_mpp`` um/px with its own (or
    the given) watershed; with ``overlays``, a truth | prediction picture per image there
    (``models.overlay``); ``prepare``: as for :func:`predict_folder`."""
    predictions = predict_folder(bundle, folder, names=names, progress=progress,
                                 data_mpp=data_mpp, prepare=prepare)
    draw = None
    if overlays is not None:
        from models.overlay import save_overlay

        images = {image.stem: image for image, _ in list_pairs(folder)}

        def draw(p: Prediction, labels: np.ndarray) -> None:
            save_overlay(Path(overlays) / f"{p.name}.png", load_image(images[p.name]), p.truth, labels)

    result = score_predictions(predictions, watershed or bundle.watershed, on_labels=draw)
    result["model"] = {"path": str(bundle.path) if bundle.path else None,
                       "sha256": bundle.sha256, "mpp": bundle.mpp,
                       "arch": bundle.config.arch}
    # factor: the integer box downsampling when every image had the same one (else null);
    # scale: native pixels per model pixel, what the pipeline uses on a slide at data_mpp
    factors = {p.factor for p in predictions}
    factor = next(iter(factors)) if len(factors) == 1 else None
    result["data"] = {"folder": str(Path(folder).resolve()), "mpp": float(data_mpp),
                      "factor": factor if isinstance(factor, int) else None,
                      "scale": float(bundle.mpp) / float(data_mpp)}
    log.info("%s on %s: AJI %.4f, PQ %.4f, F1 %.4f, Dice %.4f (%d images)",
             bundle.path, folder, result["aji"], result["pq"], result["f1"], result["dice"],
             result["n_images"])
    return result
