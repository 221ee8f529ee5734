"""Grid search of the watershed parameters on validation images of the training folder.

Post-processing is tuned once per model on the validation split recorded in the
checkpoint (``provenance["val_images"]``) and then frozen, never tuned on test images.
The search reuses cached network outputs and, for each (fg_threshold, marker_threshold,
min_marker_size), segments once without a size filter: filtering by ``min_size`` only
deletes instances, so every ``min_size`` is scored from the same overlap table.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models import checkpoints
from models.config import DistanceNorm, WatershedParams
from models.datasets import MONUSEG_MPP, DatasetSpec
from models.evaluate import Prediction, predict_folder, upsample_labels
from models.metrics import Overlap
from models.watershed import foreground_components, split_components

log = logging.getLogger(__name__)

GRID_KEYS = ("fg_threshold", "marker_threshold", "min_marker_size", "min_size")
# Areas in um^2, converted to model pixels by default_grid: a small nucleus is ~20 um^2.
MARKER_AREAS_UM2 = (0.5, 1.5, 3.0)
MIN_SIZE_AREAS_UM2 = (2.0, 5.0, 10.0)
MARKER_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "per_nucleus": (0.3, 0.4, 0.5, 0.6, 0.7),
    "per_image": (0.1, 0.15, 0.2, 0.3, 0.4),
}


def default_grid(mpp: float, distance_norm: DistanceNorm = "per_nucleus") -> dict[str, tuple]:
    """3 x 5 x 3 x 3 = 135 settings; sizes scale with the model pixel area.

    Marker thresholds follow the distance target: a per-nucleus map peaks at 1 in every
    nucleus, a per-image map only in the image's largest one (typical centres then sit at
    0.2-0.5), so its markers need lower thresholds to be found at all."""
    pixel_area = mpp * mpp

    def px(areas: Sequence[float]) -> tuple[int, ...]:
        return tuple(sorted({max(1, round(a / pixel_area)) for a in areas}))

    return {"fg_threshold": (0.4, 0.5, 0.6),
            "marker_threshold": MARKER_THRESHOLDS[distance_norm],
            "min_marker_size": px(MARKER_AREAS_UM2),
            "min_size": px(MIN_SIZE_AREAS_UM2)}


def tune_watershed(predictions: list[Prediction], grid: dict[str, Sequence] | None = None,
                   weights: Sequence[float] | None = None) -> tuple[WatershedParams, list[dict]]:
    """Setting of maximal mean AJI over ``predictions`` (weighted by ``weights``, e.g. so
    that every dataset weighs the same) and the table of every setting (grid order; ties
    go to the first setting in that order)."""
    if not predictions:
        raise ValueError("no validation predictions to tune on")
    w = np.ones(len(predictions)) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (len(predictions),) or not np.all(w >= 0) or w.sum() <= 0:
        raise ValueError("weights: one non-negative weight per prediction, not all zero")
    w = w / w.sum()
    grid = dict(grid or default_grid(predictions[0].mpp))
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"unknown grid keys {sorted(unknown)}; expected {GRID_KEYS}")
    defaults = WatershedParams()
    axes = {k: tuple(grid.get(k, (getattr(defaults, k),))) for k in GRID_KEYS}
    combos = list(itertools.product(*(axes[k] for k in GRID_KEYS)))
    mean = np.zeros(len(combos))  # weighted mean AJI of each setting (weights sum to 1)
    index = {c: i for i, c in enumerate(combos)}
    for pred, weight in zip(predictions, w):
        for fg in axes["fg_threshold"]:
            comps, _ = foreground_components(pred.prob, WatershedParams(fg_threshold=fg))
            for mt, mms in itertools.product(axes["marker_threshold"], axes["min_marker_size"]):
                params = WatershedParams(fg, mt, int(mms), min_size=0)
                labels = split_components(pred.dist, comps, params)
                area = np.bincount(labels.ravel())
                table = Overlap.of(pred.truth, upsample_labels(labels, pred.factor,
                                                               pred.truth.shape))
                sized = np.zeros(len(table.pred_area), dtype=np.int64)
                n = min(len(area), len(sized))
                sized[:n] = area[:n]
                for size in axes["min_size"]:
                    drop = sized < size
                    drop[0] = False
                    mean[index[(fg, mt, mms, size)]] += weight * table.without_pred(drop).aji()
    rows = [{**dict(zip(GRID_KEYS, c)), "aji": float(a)} for c, a in zip(combos, mean)]
    best = int(np.argmax(mean))
    fg, mt, mms, size = combos[best]
    params = WatershedParams(float(fg), float(mt), int(mms), int(size))
    log.info("best of %d watershed settings: %s, mean AJI %.4f on %d images", len(combos),
             params, mean[best], len(predictions))
    return params, rows


def validation_sets(bundle: checkpoints.ModelBundle, data: Sequence[DatasetSpec] | None
                    ) -> list[tuple[DatasetSpec, list[str]]]:
    """(dataset, validation image names) recorded in a checkpoint, each at the folder and
    µm/px it was trained from, or at the folder given for it in ``data`` (matched by
    dataset name, or in order for a model trained on one folder)."""
    recorded = bundle.provenance.get("datasets")
    if not recorded:  # a model trained on one folder, before several datasets were recorded
        names = list(bundle.provenance.get("val_images") or [])
        folder = bundle.provenance.get("data")
        recorded = [{"name": None, "folder": folder, "mpp": MONUSEG_MPP, "val_images": names}]
    given = list(data or [])
    if given and len(given) != len(recorded) and len(recorded) > 1:
        raise ValueError(f"{bundle.path} was trained on {len(recorded)} datasets; give all "
                         f"of their folders or none (the recorded ones are then used)")
    out = []
    for i, rec in enumerate(recorded):
        if not rec.get("val_images"):
            continue
        spec = DatasetSpec(Path(rec["folder"]), float(rec["mpp"])) if rec.get("folder") else None
        if given:
            match = [g for g in given if rec.get("name") and g.name == rec["name"]]
            spec = match[0] if match else given[min(i, len(given) - 1)]
            if rec.get("folder") and Path(rec["folder"]).resolve() != spec.folder.resolve():
                log.warning("tuning on %s but the model was trained on %s", spec.folder, rec["folder"])
        if spec is None:
            raise ValueError(f"{bundle.path}: no training folder recorded; give --data")
        out.append((spec, list(rec["val_images"])))
    if not out:
        raise checkpoints.CheckpointError(
            f"{bundle.path}: no provenance['val_images'] (validation split) to tune on")
    return out


def retune_checkpoint(model: str | Path, data: Sequence[DatasetSpec] | str | Path | None,
                      out: str | Path, *, device: str = "cpu", grid: dict[str, Sequence] | None = None,
                      half: bool = False,
                      progress: bool = True) -> tuple[Path, WatershedParams, dict[str, Any]]:
    """Tune the watershed of a checkpoint on its validation images (each dataset's images
    weighing 1 / number of datasets) and save a copy with the tuned parameters at ``out``
    (float16 weights with ``half``, as shipped). ``data``: the training folder(s), default
    the recorded ones.

    Returns the new path, the parameters and the tuning record stored in
    ``provenance["watershed_tuning"]``."""
    bundle = checkpoints.load(model, device=device)
    if isinstance(data, (str, Path)):
        data = [DatasetSpec(Path(data))]
    sets = validation_sets(bundle, data)
    predictions: list[Prediction] = []
    weights: list[float] = []
    for spec, names in sets:
        found = predict_folder(bundle, spec.folder, names=names, progress=progress, data_mpp=spec.mpp)
        predictions += found
        weights += [1.0 / (len(found) * len(sets))] * len(found)
    grid = dict(grid or default_grid(bundle.mpp, bundle.targets.distance_norm))
    params, rows = tune_watershed(predictions, grid, weights)
    best = max(rows, key=lambda r: r["aji"])
    before = next((r["aji"] for r in rows if all(r[k] == getattr(bundle.watershed, k)
                                                   for k in GRID_KEYS)), None)
    record = {"best_aji": best["aji"], "previous": bundle.watershed.to_dict(),
              "previous_aji": before, "val_images": sorted({n for _, names in sets for n in names}),
              "data": [{**spec.to_dict(), "val_images": sorted(names)} for spec, names in sets],
              "source_sha256": bundle.sha256,
              "grid": {k: list(v) for k, v in grid.items()}, "settings": len(rows)}
    provenance = {**bundle.provenance, "watershed_tuning": record}
    path = checkpoints.save(out, bundle.net, mpp=bundle.mpp, watershed=params,
                            targets=bundle.targets, provenance=provenance,
                            metrics=bundle.metrics, half=half)
    log.info("saved %s with watershed %s (val AJI %.4f)", path, params.to_dict(), best["aji"])
    return path, params, record
