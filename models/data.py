"""Annotated image folders (``images/*.png`` + ``labels/*.tif``) and training patches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from models.augment import photometric, warp_crop, warp_matrix
from models.config import AugmentConfig, DistanceNorm
from models.datasets import (
    BalancedSampler,
    DatasetSpec,
    parse_dataset,
    resolution_factor,
    slide_of,
    split_by_slide,
    unique_names,
)
from models.targets import distance_map, semantic_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One annotated image: RGB uint8 (H, W, 3) and uint32 instance labels (H, W)."""

    name: str
    image: np.ndarray
    labels: np.ndarray


def list_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """(image, label) paths of an annotated folder; a clear error if it is not one."""
    folder = Path(folder)
    images = sorted((folder / "images").glob("*.png"))
    if not images:
        raise FileNotFoundError(f"no images/*.png under {folder}")
    pairs = []
    for image in images:
        label = folder / "labels" / f"{image.stem}.tif"
        if not label.exists():
            raise FileNotFoundError(f"{image.name} has no label file {label}")
        pairs.append((image, label))
    return pairs


def load_image(image_path: Path) -> np.ndarray:
    """An annotated image as RGB uint8 (H, W, 3) (alpha dropped)."""
    return np.asarray(Image.open(image_path).convert("RGB"))


def load_sample(image_path: Path, label_path: Path) -> Sample:
    image = load_image(image_path)
    labels = tifffile.imread(label_path).astype(np.uint32)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"{label_path.name}: label shape {labels.shape} != image {image.shape[:2]}")
    return Sample(image_path.stem, image, labels)


def load_folder(folder: str | Path) -> list[Sample]:
    return [load_sample(i, lab) for i, lab in list_pairs(folder)]


def downsample_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downsampling (what a slide pyramid level holds)."""
    if factor == 1:
        return image
    h, w = (s // factor * factor for s in image.shape[:2])
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, -1)
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8)


def downsample_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """Nearest (centre) sampling of labels: never averages ids."""
    if factor == 1:
        return labels
    off = factor // 2
    return labels[off::factor, off::factor]


@dataclass
class TrainingImage:
    """An image with its precomputed targets, at the training resolution."""

    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # float32 (H, W)
    distance: np.ndarray  # float32 (H, W)
    soft_mask: np.ndarray | None = None  # float32 (H, W): the BCE target when distilling

    @property
    def bce_target(self) -> np.ndarray:
        return self.mask if self.soft_mask is None else self.soft_mask


def prepare(sample: Sample, downsample: int, norm: DistanceNorm) -> TrainingImage:
    image = downsample_image(sample.image, downsample)
    labels = downsample_labels(sample.labels, downsample)[: image.shape[0], : image.shape[1]]
    return TrainingImage(image, semantic_mask(labels), distance_map(labels, norm))


def load_training_items(folder: str | Path, names: list[str] | None, downsample: int,
                        norm: DistanceNorm) -> list[TrainingImage]:
    """The named annotated images of a folder (all if None) with their targets, in name
    order; a clear error for names the folder does not hold."""
    pairs = {img.stem: (img, lab) for img, lab in list_pairs(folder)}
    names = sorted(pairs) if names is None else sorted(names)
    missing = sorted(set(names) - set(pairs))
    if missing:
        raise FileNotFoundError(f"{folder}: training image(s) {', '.join(missing)} not found")
    return [prepare(load_sample(*pairs[n]), downsample, norm) for n in names]


def soften_targets(item: TrainingImage, prob: np.ndarray, distance: np.ndarray,
                   alpha: float) -> TrainingImage:
    """Distillation targets: ``(1 - alpha) * truth + alpha * teacher`` for the BCE target
    (``soft_mask``) and the distance map; the Dice term keeps the true mask.

    BCE and MSE are linear in their target (MSE up to a term without gradient), so the
    blend equals the weighted sum of the truth loss and the teacher-matching loss; soft
    Dice is not (it would push every half-certain pixel up), hence the true mask for it.
    The teacher sees the unjittered image, so under stain jitter the student learns the
    teacher's answer on the original staining."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation weight must be in [0, 1], not {alpha}")
    if prob.shape != item.mask.shape or distance.shape != item.distance.shape:
        raise ValueError(f"teacher output {prob.shape} does not match the targets {item.mask.shape}")
    soft = ((1 - alpha) * item.mask + alpha * prob).astype(np.float32)
    dist = ((1 - alpha) * item.distance + alpha * distance).astype(np.float32)
    return TrainingImage(item.image, item.mask, dist, soft_mask=soft)


def random_patch(sampler: BalancedSampler, size: int, rng: np.random.Generator,
                 augment: AugmentConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A random crop of an image drawn by ``sampler``, warped (rescale, rotation, shear),
    flipped/rotated by right angles, then photometrically augmented: image, mask, distance
    and BCE target."""
    item = sampler.pick(rng)
    crops = warp_crop([item.image, item.mask, item.distance, item.bce_target], size,
                      warp_matrix(rng, augment), rng)
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in crops:
        a = np.rot90(a, k)
        out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
    image = np.clip(out[0] + 0.5, 0, 255).astype(np.uint8) if out[0].dtype != np.uint8 else out[0]
    mask = (out[1] > 0.5).astype(np.float32)
    return photometric(image, rng, augment), mask, out[2].astype(np.float32), out[3].astype(np.float32)


def slide_sampler(datasets: list[list[list[TrainingImage]]]) -> BalancedSampler:
    """Datasets of slides of images: every dataset and every slide equally likely, an
    image of a slide with chance by its area. One dataset of one "slide" holding every
    image is the sampling of the models trained on one folder (chance by area)."""
    return BalancedSampler(datasets, [[[t.image.shape[0] * t.image.shape[1] for t in slide]
                                       for slide in slides] for slides in datasets])


def batch(images: list[TrainingImage] | BalancedSampler, size: int, count: int,
          rng: np.random.Generator, augment: AugmentConfig | float
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, 3, S, S) float32 in [0, 1]; (N, 1, S, S) mask, distance and BCE target.
    ``augment`` may be a legacy jitter strength (HED + brightness/contrast only)."""
    sampler = images if isinstance(images, BalancedSampler) else slide_sampler([[images]])
    if not isinstance(augment, AugmentConfig):
        augment = AugmentConfig.legacy(float(augment))
    parts = [random_patch(sampler, size, rng, augment) for _ in range(count)]
    x = np.stack([p[0] for p in parts]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    m, d, b = (np.stack([p[i] for p in parts])[:, None] for i in (1, 2, 3))
    return x, m, d, b


@dataclass
class LoadedDataset:
    """One dataset's training images grouped by slide, its validation images, and the
    record of the split that goes into the checkpoint's provenance."""

    name: str
    spec_text: str  # FOLDER:MPP, what --resume reads back
    train: list[list[TrainingImage]]  # per training slide
    val: list[TrainingImage]
    record: dict[str, Any]

    @property
    def all_train(self) -> list[TrainingImage]:
        return [item for slide in self.train for item in slide]


def as_specs(data: Any) -> list[DatasetSpec]:
    """Dataset specs from what the CLI, a caller or a resumed run gives: one folder, a
    ``FOLDER:MPP`` string, or a list of them."""
    if isinstance(data, DatasetSpec):
        return [data]
    if isinstance(data, (str, Path)):
        return [parse_dataset(str(data))]
    specs = [d if isinstance(d, DatasetSpec) else parse_dataset(str(d)) for d in data]
    if not specs:
        raise ValueError("no training data given")
    return specs


def load_datasets(specs: list[DatasetSpec], train_mpp: float, val_fraction: float, seed: int,
                  norm: DistanceNorm) -> list[LoadedDataset]:
    """Every dataset at the training resolution, split by slide (``split_by_slide``)."""
    out = []
    for spec, name in zip(specs, unique_names(specs)):
        factor = resolution_factor(spec.mpp, train_mpp)
        names = [image.stem for image, _ in list_pairs(spec.folder)]
        train_names, val_names = split_by_slide(names, val_fraction, seed)
        by_name = dict(zip(train_names, load_training_items(spec.folder, train_names, factor, norm)))
        slides: dict[str, list[TrainingImage]] = {}
        for n in train_names:
            slides.setdefault(slide_of(n), []).append(by_name[n])
        val = load_training_items(spec.folder, val_names, factor, norm) if val_names else []
        record = {**spec.to_dict(), "name": name, "downsample": factor,
                  "train_slides": sorted(slides), "val_slides": sorted({slide_of(n) for n in val_names}),
                  "train_images": train_names, "val_images": val_names}
        out.append(LoadedDataset(name, f"{spec.folder.resolve()}:{spec.mpp:g}",
                                 [slides[s] for s in sorted(slides)], val, record))
        log.info("%s: %d training image(s) of %d slide(s), %d validation image(s) of slide(s) %s",
                 name, len(train_names), len(slides), len(val_names),
                 ", ".join(record["val_slides"]) or "-")
    return out
