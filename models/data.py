"""Annotated image folders (``images/*.png`` + ``labels/*.tif``) and training patches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

from models.config import DistanceNorm
from models.targets import distance_map, semantic_mask


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


def load_sample(image_path: Path, label_path: Path) -> Sample:
    image = np.asarray(Image.open(image_path).convert("RGB"))
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


def stain_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random scaling/shift of the haematoxylin, eosin and DAB optical densities, so that
    the model sees the spread of stainings of other labs and scanners."""
    if strength <= 0:
        return patch
    hed = rgb2hed(patch)
    alpha = rng.uniform(1 - strength, 1 + strength, size=3)
    beta = rng.uniform(-strength, strength, size=3) * 0.05
    rgb = hed2rgb(hed * alpha + beta)
    return np.clip(rgb * 255.0, 0, 255).astype(np.uint8)


def random_patch(images: list[TrainingImage], size: int, rng: np.random.Generator,
                 jitter: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A random crop of a random image (chance by area), flipped/rotated, stain-jittered:
    image, mask, distance and BCE target."""
    areas = np.array([t.image.shape[0] * t.image.shape[1] for t in images], dtype=float)
    item = images[rng.choice(len(images), p=areas / areas.sum())]
    h, w = item.mask.shape
    y = rng.integers(0, h - size + 1)
    x = rng.integers(0, w - size + 1)
    crops = [a[y:y + size, x:x + size]
             for a in (item.image, item.mask, item.distance, item.bce_target)]
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in crops:
        a = np.rot90(a, k)
        out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
    image = stain_jitter(out[0], rng, jitter)
    image = _brightness_contrast(image, rng, jitter)
    return image, out[1], out[2], out[3]


def _brightness_contrast(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    if strength <= 0:
        return image
    gain = rng.uniform(1 - strength, 1 + strength)
    bias = rng.uniform(-strength, strength) * 255 * 0.5
    mean = image.mean()
    return np.clip((image - mean) * gain + mean + bias, 0, 255).astype(np.uint8)


def batch(images: list[TrainingImage], size: int, count: int, rng: np.random.Generator,
          jitter: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, 3, S, S) float32 in [0, 1]; (N, 1, S, S) mask, distance and BCE target."""
    parts = [random_patch(images, size, rng, jitter) for _ in range(count)]
    x = np.stack([p[0] for p in parts]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    m, d, b = (np.stack([p[i] for p in parts])[:, None] for i in (1, 2, 3))
    return x, m, d, b
