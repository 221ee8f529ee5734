"""Several annotated folders as one training set: each with its own µm/px, split into
training and validation *by slide*, and sampled so that every dataset and every slide
weighs the same whatever its pixel count.

Why by slide: crops of one slide share its staining, scanner and patient, so a validation
crop from a training slide scores the model on what it has already seen. Why balanced: a
dataset with large images (MoNuSeg, 1000² at 40x) would otherwise drown one of small crops
(TNBC, 512²), and within TNBC a slide with eight crops would count eight times one with one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MONUSEG_MPP = 0.25  # MoNuSeg tiles are 40x crops, 0.2457-0.2527 um/px per the XMLs
DEFAULT_DATA_MPP = MONUSEG_MPP  # an annotated folder without a stated µm/px (TNBC too is 40x)
MIN_VAL_SLIDES = 2  # a dataset of >= 6 slides validates on at least two of them
# "<slide>_<crop>" (TNBC: tnbc_01_3 is crop 3 of slide 01); a name without it is its own slide
_CROP_SUFFIX = re.compile(r"^(?P<slide>.+)_(?P<crop>\d+)$")
_SPLIT_NAMES = {"train", "training", "test", "val", "validation", "images"}


@dataclass(frozen=True)
class DatasetSpec:
    """An annotated folder (``images/*.png`` + ``labels/*.tif``) and the µm/px of its images."""

    folder: Path
    mpp: float = DEFAULT_DATA_MPP

    @property
    def name(self) -> str:
        """A short name for logs and per-dataset scores: the folder, or its parent when the
        folder is a split (``monuseg/train`` -> ``monuseg``)."""
        folder = self.folder.resolve()
        return folder.parent.name if folder.name.lower() in _SPLIT_NAMES else folder.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "folder": str(self.folder.resolve()), "mpp": self.mpp}


def parse_dataset(text: str, default_mpp: float = DEFAULT_DATA_MPP) -> DatasetSpec:
    """``FOLDER`` (its images at ``default_mpp``) or ``FOLDER:MPP`` (the images' µm/px)."""
    folder, sep, tail = text.rpartition(":")
    if sep and folder:
        try:
            mpp = float(tail)
        except ValueError:  # a colon that belongs to the path
            return DatasetSpec(Path(text), default_mpp)
        if not (mpp > 0 and math.isfinite(mpp)):
            raise ValueError(f"{text!r}: the µm/px after ':' must be a positive number")
        return DatasetSpec(Path(folder), mpp)
    return DatasetSpec(Path(text), default_mpp)


def unique_names(specs: list[DatasetSpec]) -> list[str]:
    """Dataset names, made unique by a numeric suffix where two folders share one."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        n = seen.get(spec.name, 0)
        seen[spec.name] = n + 1
        out.append(spec.name if n == 0 else f"{spec.name}-{n + 1}")
    return out


def slide_of(image_name: str) -> str:
    """The slide an annotated image was cropped from: ``tnbc_01_3`` -> ``tnbc_01``;
    MoNuSeg's TCGA ids (one crop per slide) are their own slide."""
    match = _CROP_SUFFIX.match(image_name)
    return match["slide"] if match else image_name


def split_by_slide(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic (train, validation) image names, whole slides on each side.

    The slides are shuffled with ``seed`` and the first ``round(n * val_fraction)`` (at
    least one; at least :data:`MIN_VAL_SLIDES` when there are six slides or more, so that a
    validation figure does not rest on one slide) validate.
    Where every image is its own slide this is the image split earlier models used."""
    slides: dict[str, list[str]] = {}
    for name in sorted(names):
        slides.setdefault(slide_of(name), []).append(name)
    order = sorted(slides)
    np.random.default_rng(seed).shuffle(order)
    n_val = 0
    if val_fraction > 0:
        n_val = max(1, round(len(order) * val_fraction))
        if len(order) >= 6:
            n_val = max(n_val, MIN_VAL_SLIDES)
        n_val = min(n_val, len(order) - 1)
    val = sorted(n for s in order[:n_val] for n in slides[s])
    train = sorted(n for s in order[n_val:] for n in slides[s])
    return train, val


def resolution_factor(data_mpp: float, train_mpp: float) -> int:
    """The integer box-downsampling that brings a dataset to the training resolution; a
    clear error where there is none (training resamples only by whole factors)."""
    ratio = train_mpp / data_mpp
    factor = round(ratio)
    if factor < 1 or abs(ratio - factor) > 0.02 * ratio:
        raise ValueError(f"data at {data_mpp:g} µm/px cannot be box-downsampled to the training "
                         f"resolution {train_mpp:g} µm/px (ratio {ratio:.3g}, not a whole number)")
    return factor


class BalancedSampler:
    """Picks a training image: a dataset uniformly, then one of its slides uniformly, then
    an image of that slide with chance by area (so that a slide's pixels are equally
    likely); not per pixel over everything."""

    def __init__(self, groups: list[list[list[Any]]], areas: list[list[list[float]]]):
        if not groups or any(not slides for slides in groups):
            raise ValueError("every dataset needs at least one training slide")
        self.groups = groups
        self.weights = [[np.asarray(a, float) / float(np.sum(a)) for a in slides] for slides in areas]

    def pick(self, rng: np.random.Generator) -> Any:
        d = int(rng.integers(len(self.groups)))
        s = int(rng.integers(len(self.groups[d])))
        items = self.groups[d][s]
        return items[int(rng.choice(len(items), p=self.weights[d][s]))]
