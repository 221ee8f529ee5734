"""Evaluation of a model on an annotated folder (MoNuSeg layout), at native resolution.

A model trained at a coarser resolution than the data (e.g. 0.5 um/px on 0.25 um/px
MoNuSeg tiles) sees each image box-downsampled by the integer factor, exactly like a
slide pyramid level; its instances are post-processed at model resolution and scaled
back by nearest neighbour, so that scores are always against the original annotations
and comparable across resolutions. The semantic Dice and the regression MSE describe the
raw network outputs and are computed at model resolution against downsampled targets.

Network outputs are cached per image (:func:`predict_folder`) so that several watershed
settings can be scored (:func:`score_predictions`) without running the network again.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.checkpoints import ModelBundle
from models.config import WatershedParams
from models.data import downsample_image, downsample_labels, list_pairs, load_sample
from models.inference import predict_image
from models.metrics import instance_scores
from models.targets import distance_map
from models.train import MONUSEG_MPP
from models.watershed import postprocess

log = logging.getLogger(__name__)

SCORE_KEYS = ("dice", "aji", "pq", "dq", "sq", "precision", "recall", "f1",
              "semantic_dice", "regression_mse")


@dataclass
class Prediction:
    """Network outputs for one annotated image, with what is needed to score them."""

    name: str
    prob: np.ndarray  # float32, model resolution
    dist: np.ndarray  # float32, model resolution
    truth: np.ndarray  # instance labels, native resolution
    factor: int  # native pixels per model pixel (per axis)
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


def upsample_labels(labels: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling by ``factor`` (np.repeat), cropped / zero-padded to ``shape``.

    The inverse of box downsampling: model pixel (i, j) covers native pixels
    ``[i*f, (i+1)*f) x [j*f, (j+1)*f)``; native rows/columns dropped by the downsampling
    (the remainder of H/f) stay background."""
    if factor > 1:
        labels = np.repeat(np.repeat(labels, factor, axis=0), factor, axis=1)
    out = np.zeros(shape, dtype=labels.dtype)
    h, w = min(shape[0], labels.shape[0]), min(shape[1], labels.shape[1])
    out[:h, :w] = labels[:h, :w]
    return out


def predict_folder(bundle: ModelBundle, folder: str | Path, *, names: list[str] | None = None,
                   progress: bool = True, data_mpp: float = MONUSEG_MPP) -> list[Prediction]:
    """Run the network once per image of an annotated folder (optionally only ``names``)."""
    pairs = {image.stem: (image, label) for image, label in list_pairs(folder)}
    if names is not None:
        missing = sorted(set(names) - set(pairs))
        if missing:
            raise FileNotFoundError(f"{folder}: no annotated image named {', '.join(missing)}")
        pairs = {n: pairs[n] for n in sorted(set(names))}
    factor = resolution_factor(bundle.mpp, data_mpp)
    bundle.net.eval()
    out = []
    for name in tqdm(list(pairs), desc="predict", unit="image", disable=not progress,
                     file=sys.stderr):
        sample = load_sample(*pairs[name])
        image = downsample_image(sample.image, factor)
        prob, dist = predict_image(bundle.net, image)
        small = downsample_labels(sample.labels, factor)[: image.shape[0], : image.shape[1]]
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


def score_prediction(prediction: Prediction, watershed: WatershedParams) -> dict[str, Any]:
    """All scores of one image for one watershed setting."""
    labels = segment(prediction, watershed)
    scores = instance_scores(prediction.truth, labels)
    return {"name": prediction.name,
            "n_true": int(np.unique(prediction.truth[prediction.truth > 0]).size),
            "n_pred": int(labels.max()),
            **scores,
            "semantic_dice": prediction.semantic_dice,
            "regression_mse": prediction.regression_mse}


def score_predictions(predictions: list[Prediction], watershed: WatershedParams) -> dict[str, Any]:
    """Per-image scores and their means over images (JSON-able)."""
    per_image = [score_prediction(p, watershed) for p in predictions]
    means = {key: float(np.mean([row[key] for row in per_image])) if per_image else float("nan")
             for key in SCORE_KEYS}
    return {**means, "n_images": len(per_image), "per_image": per_image,
            "watershed": watershed.to_dict()}


def evaluate_folder(bundle: ModelBundle, folder: str | Path, *,
                    watershed: WatershedParams | None = None, names: list[str] | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Scores of ``bundle`` on an annotated folder with its own (or the given) watershed."""
    predictions = predict_folder(bundle, folder, names=names, progress=progress)
    result = score_predictions(predictions, watershed or bundle.watershed)
    result["model"] = {"path": str(bundle.path) if bundle.path else None,
                       "sha256": bundle.sha256, "mpp": bundle.mpp,
                       "arch": bundle.config.arch}
    result["data"] = {"folder": str(Path(folder).resolve()), "mpp": MONUSEG_MPP,
                      "factor": predictions[0].factor if predictions else None}
    log.info("%s on %s: AJI %.4f, PQ %.4f, F1 %.4f, Dice %.4f (%d images)",
             bundle.path, folder, result["aji"], result["pq"], result["f1"], result["dice"],
             result["n_images"])
    return result
