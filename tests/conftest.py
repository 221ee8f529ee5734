"""Shared test fixtures: one torch thread, synthetic annotated folders, tiny models and the
``shared_data`` skip for tests that read ../shared/data (MoNuSeg)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from models import checkpoints
from models.config import NetConfig, TargetConfig, WatershedParams
from models.network import NucleusNet

# The test machine is shared with long jobs: keep every test single-threaded.
torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("WSI_NUCLEI_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
MONUSEG = SHARED_DATA / "monuseg"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``shared_data`` are skipped, not failed, without the shared data."""
    if item.get_closest_marker("shared_data") and not MONUSEG.is_dir():
        pytest.skip(f"needs the shared MoNuSeg data at {MONUSEG}")


@pytest.fixture
def monuseg() -> Path:
    """The shared MoNuSeg folder (with train/ and test/), or a skip."""
    if not MONUSEG.is_dir():
        pytest.skip(f"needs the shared MoNuSeg data at {MONUSEG}")
    return MONUSEG


# ---------------------------------------------------------------- synthetic data


def disc_labels(shape: tuple[int, int], rng: np.random.Generator, n: int,
                radius: tuple[float, float] = (3.0, 6.0), touching: float = 0.3) -> np.ndarray:
    """Instance labels (uint32) of up to ``n`` non-overlapping discs (clean nuclei: every
    one convex and whole); a fraction gets a neighbour that touches it."""
    labels = np.zeros(shape, dtype=np.uint32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    next_id = 1
    for _ in range(n):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        r = rng.uniform(*radius)
        centres = [(cy, cx, r)]
        if rng.random() < touching:
            a, r2 = rng.uniform(0, 2 * np.pi), rng.uniform(*radius)
            gap = r + r2 + 0.8
            centres.append((cy + gap * np.sin(a), cx + gap * np.cos(a), r2))
        for y, x, rr in centres:
            disc = (yy - y) ** 2 + (xx - x) ** 2 <= rr * rr
            if disc.sum() >= 5 and not labels[disc].any():
                labels[disc] = next_id
                next_id += 1
    return labels


def render_he(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A crude H&E-looking RGB image: purple nuclei on pink stroma, with noise."""
    background = np.array([228, 170, 205], dtype=np.float32)
    nucleus = np.array([85, 45, 135], dtype=np.float32)
    rgb = np.where((labels > 0)[..., None], nucleus, background)
    rgb = rgb + rng.normal(0, 8, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_annotated_folder(root: Path, n_images: int = 4, size: int = 64, seed: int = 0,
                           nuclei: int = 10, touching: float = 0.3) -> Path:
    """An annotated folder in the MoNuSeg layout (images/*.png, labels/*.tif)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        labels = disc_labels((size, size), rng, nuclei, touching=touching)
        Image.fromarray(render_he(labels, rng)).save(root / "images" / f"img{i}.png")
        tifffile.imwrite(root / "labels" / f"img{i}.tif", labels)
    return root


@pytest.fixture
def make_annotated_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_annotated_folder(name="data", **write_annotated_folder kwargs)``."""

    def make(name: str = "data", **kwargs) -> Path:
        return write_annotated_folder(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def synthetic_folder(make_annotated_folder: Callable[..., Path]) -> Path:
    """Four 64x64 annotated images with ~10 disc nuclei each."""
    return make_annotated_folder()


# ---------------------------------------------------------------- tiny models

TINY_WIDTHS = (4, 8, 16)


def tiny_net(arch: str = "dual", seed: int = 0, batchnorm: bool = False) -> NucleusNet:
    """A 3-level network small enough to run in milliseconds on one thread."""
    torch.manual_seed(seed)
    net = NucleusNet(NetConfig(arch=arch, widths=TINY_WIDTHS, batchnorm=batchnorm, dropout=0.0))
    return net.eval()


def save_tiny_checkpoint(path: Path, *, mpp: float = 0.5, arch: str = "dual",
                         val_images: list[str] | None = None,
                         watershed: WatershedParams | None = None) -> Path:
    """A checkpoint of an untrained tiny network, with training-like provenance."""
    provenance = {"val_images": val_images or [], "train_images": [], "steps": 0}
    return checkpoints.save(path, tiny_net(arch), mpp=mpp,
                            watershed=watershed or WatershedParams(min_size=5, min_marker_size=2),
                            targets=TargetConfig(), provenance=provenance,
                            metrics={"val_dice": 0.0, "split": "validation"})


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """An untrained tiny model at 0.5 um/px whose validation images are img0 and img1."""
    return save_tiny_checkpoint(tmp_path / "tiny.pt", val_images=["img0", "img1"])
