"""Several annotated datasets: specs, the split by slide, balanced sampling, augmentations,
a multi-dataset training run, and tuning / evaluation per dataset."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_WIDTHS, save_tiny_checkpoint, write_annotated_folder

from models import augment
from models.checkpoints import load
from models.config import AugmentConfig, NetConfig, TargetConfig, TrainConfig
from models.data import batch, list_pairs
from models.datasets import (
    BalancedSampler,
    DatasetSpec,
    parse_dataset,
    resolution_factor,
    slide_of,
    split_by_slide,
    unique_names,
)
from models.train import train
from models.tune import retune_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_cropped_folder(root: Path, crops_per_slide: dict[str, int], size: int = 48,
                         seed: int = 0) -> Path:
    """An annotated folder whose images are named ``<slide>_<crop>`` like TNBC's."""
    n = sum(crops_per_slide.values())
    write_annotated_folder(root, n_images=n, size=size, seed=seed, nuclei=8)
    names = [f"{s}_{c + 1}" for s, k in crops_per_slide.items() for c in range(k)]
    for i, name in enumerate(names):
        (root / "images" / f"img{i}.png").rename(root / "images" / f"{name}.png")
        (root / "labels" / f"img{i}.tif").rename(root / "labels" / f"{name}.tif")
    return root


def test_dataset_specs_parse_folder_and_mpp(tmp_path: Path) -> None:
    assert parse_dataset("a/tnbc/train:0.5") == DatasetSpec(Path("a/tnbc/train"), 0.5)
    assert parse_dataset("a/tnbc/train") == DatasetSpec(Path("a/tnbc/train"), 0.25)
    assert parse_dataset("C:/data/x").folder == Path("C:/data/x")  # a colon of the path
    with pytest.raises(ValueError, match="positive"):
        parse_dataset("a:-1")
    specs = [parse_dataset("x/monuseg/train"), parse_dataset("y/monuseg/test"), parse_dataset("z/tnbc")]
    assert unique_names(specs) == ["monuseg", "monuseg-2", "tnbc"]
    assert resolution_factor(0.25, 0.5) == 2 and resolution_factor(0.5, 0.5) == 1
    with pytest.raises(ValueError, match="whole number"):
        resolution_factor(0.3, 0.5)


def test_split_keeps_every_slide_on_one_side() -> None:
    names = [f"tnbc_{s:02d}_{c}" for s, k in [(1, 7), (2, 3), (3, 5), (4, 8), (5, 4), (6, 3), (7, 3)]
             for c in range(1, k + 1)]
    train, val = split_by_slide(names, 0.2, seed=0)
    assert set(train) | set(val) == set(names) and not set(train) & set(val)
    val_slides = {slide_of(n) for n in val}
    assert len(val_slides) == 2  # 7 slides: at least two validate
    assert not val_slides & {slide_of(n) for n in train}
    assert split_by_slide(list(reversed(names)), 0.2, seed=0) == (train, val)
    assert split_by_slide(names, 0.2, seed=1) != (train, val)


def test_images_without_crop_numbers_are_their_own_slides() -> None:
    names = [f"TCGA-{i:02d}-5592-01Z-00-DX1" for i in range(30)]
    assert {slide_of(n) for n in names} == set(names)
    train, val = split_by_slide(names, 0.2, seed=0)
    assert len(val) == 6 and len(train) == 24


@pytest.mark.shared_data
def test_monuseg_split_is_the_one_the_shipped_models_validated_on() -> None:
    """Multi-dataset training must keep MoNuSeg's validation images those the shipped
    models never trained on, or --init from them would leak into validation."""
    folder = SHARED / "monuseg" / "train"
    if not folder.is_dir():
        pytest.skip("needs ../shared/data")
    names = [image.stem for image, _ in list_pairs(folder)]
    recorded = load("dense20x.pt").provenance["val_images"]
    assert split_by_slide(names, 0.2, seed=0)[1] == sorted(recorded)


def test_sampling_is_balanced_per_dataset_and_per_slide() -> None:
    big = ["big"]  # one huge image
    many = [["s1"] * 9, ["s2"]]  # a slide with nine crops, one with one
    groups = [[big], [[f"{s[0]}-{i}" for i in range(len(s))] for s in many]]
    areas = [[[1e6]], [[1.0] * 9, [1.0]]]
    sampler = BalancedSampler(groups, areas)
    rng = np.random.default_rng(0)
    counts = Counter(sampler.pick(rng).split("-")[0] for _ in range(20000))
    assert counts["big"] / 20000 == pytest.approx(0.5, abs=0.02)
    assert counts["s1"] / 20000 == pytest.approx(0.25, abs=0.02)
    assert counts["s2"] / 20000 == pytest.approx(0.25, abs=0.02)


def _striped(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((size, size), np.float32)
    labels[20:40, 10:70] = 1
    labels[55:80, 30:50] = 1
    image = np.where(labels[..., None] > 0, 60, 220).astype(np.uint8).repeat(3, axis=2)
    return image, labels


def test_warps_move_image_and_targets_together() -> None:
    image, mask = _striped()
    rng = np.random.default_rng(3)
    cfg = AugmentConfig(stain=0, hue=0, saturation=0, brightness=0, blur=0, jpeg=0)
    moved = 0
    for _ in range(10):
        matrix = augment.warp_matrix(rng, cfg)
        img, m = augment.warp_crop([image, mask], 64, matrix, rng)
        dark = img[..., 0] < 140
        agree = np.mean(dark == (m > 0.5))
        assert agree > 0.98, agree
        moved += int(not np.allclose(matrix, np.eye(2)))
    assert moved == 10


def test_each_photometric_augmentation_changes_the_image_only_when_on() -> None:
    image, _ = _striped()
    image = np.clip(image.astype(int) + np.array([10, -20, 15]), 0, 255).astype(np.uint8)
    off = AugmentConfig(stain=0, hue=0, saturation=0, brightness=0, scale=0, rotate=False, shear=0,
                        blur=0, jpeg=0)
    assert np.array_equal(augment.photometric(image, np.random.default_rng(0), off), image)
    for name, value in [("stain", 0.3), ("hue", 0.1), ("saturation", 0.5), ("brightness", 0.3),
                        ("blur", 1.0), ("jpeg", 1.0)]:
        out = augment.photometric(image, np.random.default_rng(0), replace(off, **{name: value}))
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert np.abs(out.astype(int) - image).mean() > 0.5, name
    assert augment.warp_matrix(np.random.default_rng(0), off) is None


def test_batches_keep_binary_masks_under_every_augmentation(make_annotated_folder) -> None:
    from models.data import load_training_items

    folder = make_annotated_folder(n_images=2, size=48, nuclei=8, seed=4)
    items = load_training_items(folder, None, 1, "per_nucleus")
    x, m, d, b = batch(items, 64, 4, np.random.default_rng(0), AugmentConfig())  # 64 > 48: padded
    assert x.shape == (4, 3, 64, 64) and 0 <= x.min() and x.max() <= 1
    assert set(np.unique(m)) <= {0.0, 1.0} and m.sum() > 0
    assert d.min() >= -1e-6 and d.max() <= 1 + 1e-6


NET = NetConfig(arch="dual", widths=TINY_WIDTHS, batchnorm=True, dropout=0.0)
CFG = TrainConfig(patch_size=32, batch_size=4, steps=12, lr=3e-3, val_every=6, checkpoint_every=6,
                  seed=0, threads=1, augment=AugmentConfig())


@pytest.fixture
def two_datasets(tmp_path: Path) -> list[DatasetSpec]:
    a = write_annotated_folder(tmp_path / "alpha" / "train", n_images=5, size=48, seed=1, nuclei=8)
    b = write_cropped_folder(tmp_path / "beta", {"b_01": 3, "b_02": 2, "b_03": 2, "b_04": 1,
                                                 "b_05": 2, "b_06": 1}, seed=2)
    return [DatasetSpec(a, 0.25), DatasetSpec(b, 0.25)]


def test_multi_dataset_training_records_each_split_and_resumes(tmp_path: Path, two_datasets) -> None:
    out = tmp_path / "run"
    train(two_datasets, out, NET, TargetConfig(), CFG)
    torch.set_num_threads(1)
    bundle = load(out / "final.pt")
    records = bundle.provenance["datasets"]
    assert [r["name"] for r in records] == ["alpha", "beta"]
    beta = records[1]
    assert len(beta["val_slides"]) == 2  # six slides: two validate
    assert not set(beta["val_slides"]) & set(beta["train_slides"])
    assert {slide_of(n) for n in beta["val_images"]} == set(beta["val_slides"])
    assert bundle.provenance["train_config"]["augment"]["jpeg"] == 0.3
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"val_dice_alpha", "val_dice_beta", "val_score_beta"} <= set(rows[0])
    for r in rows:  # the overall score is the mean of the datasets' scores
        assert float(r["val_score"]) == pytest.approx(
            (float(r["val_score_alpha"]) + float(r["val_score_beta"])) / 2, abs=2e-5)
    train(None, out, NET, TargetConfig(), CFG, resume=True, steps=18)
    torch.set_num_threads(1)
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["step"] == 18 and len(state["data"]) == 2
    assert load(out / "final.pt").provenance["datasets"] == records


def test_tuning_weighs_each_dataset_equally(tmp_path: Path, two_datasets) -> None:
    out = tmp_path / "run"
    train(two_datasets, out, NET, TargetConfig(), replace(CFG, steps=6))
    torch.set_num_threads(1)
    grid = {"fg_threshold": (0.4, 0.5), "marker_threshold": (0.5,), "min_marker_size": (1,),
            "min_size": (2,)}
    path, _, record = retune_checkpoint(out / "final.pt", None, tmp_path / "tuned.pt", grid=grid,
                                        progress=False)
    assert [d["name"] for d in record["data"]] == ["alpha", "beta"]
    recorded = load(out / "final.pt").provenance
    assert record["val_images"] == sorted(recorded["val_images"])
    assert load(path).provenance["watershed_tuning"]["settings"] == 2


def test_evaluate_reports_each_dataset_and_their_mean(tmp_path: Path, two_datasets, capsys) -> None:
    from pipeline.cli import main

    model = save_tiny_checkpoint(tmp_path / "m.pt", mpp=0.25)
    out = tmp_path / "scores.json"
    folders = [f"{s.folder}:0.25" for s in two_datasets]
    assert main(["--quiet", "evaluate", "--model", str(model), "--device", "cpu", "--data", *folders,
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "alpha" in text and "beta" in text and "mean" in text
    payload = json.loads(out.read_text())
    assert set(payload["datasets"]) == {"alpha", "beta"}
    assert payload["datasets"]["beta"]["n_images"] == 11
    mean = payload["mean_over_datasets"]["f1"]
    assert mean == pytest.approx((payload["datasets"]["alpha"]["f1"] + payload["datasets"]["beta"]["f1"]) / 2)


def test_int8_calibration_shares_patches_and_skips_validation_slides(tmp_path: Path, two_datasets) -> None:
    from models.quantize import balanced_patches, load_calibration, training_names

    out = tmp_path / "run"
    train(two_datasets, out, NET, TargetConfig(), replace(CFG, steps=6))
    torch.set_num_threads(1)
    provenance = load(out / "final.pt").provenance
    beta = two_datasets[1].folder
    names = training_names(provenance, beta / "images")
    assert names == set(provenance["datasets"][1]["train_images"])
    assert not names & set(provenance["datasets"][1]["val_images"])
    images = load_calibration(beta, 0.25, 0.25, names)
    assert len(images) == len(names)
    patches = balanced_patches([images, images[:1]], 7, 32)
    assert len(patches) == 7 and all(p.shape == (32, 32, 3) for p in patches)
    assert parse_dataset(f"{beta}:0.5", 0.25).mpp == 0.5  # --calib FOLDER:MPP
    assert parse_dataset(str(beta), 0.3).mpp == 0.3  # --calib FOLDER with --calib-mpp
