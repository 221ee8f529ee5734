"""Evaluation on annotated folders, watershed tuning and their CLI commands."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import save_tiny_checkpoint
from PIL import Image
from scipy import ndimage as ndi

import models.evaluate
from models.checkpoints import CheckpointError, ModelBundle, load
from models.config import WatershedParams
from models.data import downsample_image, downsample_labels, list_pairs, load_sample
from models.evaluate import (
    Prediction,
    evaluate_folder,
    native_index,
    predict_folder,
    resolution_factor,
    score_predictions,
    segment,
    upsample_labels,
)
from models.inference import predict_image
from models.targets import distance_map
from models.tune import default_grid, retune_checkpoint, tune_watershed
from pipeline.cli import main
from pipeline.label_sampling import block_rows
from pipeline.slide.memory import MemorySlide
from pipeline.slide.region import plan_read, read_region
from pipeline.types import Box

TOP_KEYS = {"dice", "aji", "pq", "f1", "semantic_dice", "regression_mse", "n_images",
            "per_image", "model", "watershed"}
ROW_KEYS = {"name", "n_true", "n_pred", "dice", "aji", "pq", "dq", "sq", "precision", "recall",
            "split_rate", "merge_rate", "f1", "semantic_dice", "regression_mse"}


def perfect_predictions(folder: Path, factor: int = 1) -> list[Prediction]:
    """Predictions equal to the (downsampled) truth targets: what an ideal network gives."""
    out = []
    for label_path in sorted((folder / "labels").glob("*.tif")):
        truth = tifffile.imread(label_path)
        small = downsample_labels(truth, factor)
        h, w = truth.shape[0] // factor, truth.shape[1] // factor
        small = small[:h, :w]
        out.append(Prediction(label_path.stem, (small > 0).astype(np.float32) * 0.9,
                              distance_map(small), truth, factor, 0.25 * factor, 1.0, 0.0))
    return out


def halve_folder(src: Path, dst: Path) -> Path:
    """The annotated folder ``src`` as a 20x scan would give it: images box-downsampled 2x,
    labels sampled at the centres (nearest)."""
    (dst / "images").mkdir(parents=True)
    (dst / "labels").mkdir(parents=True)
    for image_path, label_path in list_pairs(src):
        sample = load_sample(image_path, label_path)
        Image.fromarray(downsample_image(sample.image, 2)).save(dst / "images" / image_path.name)
        tifffile.imwrite(dst / "labels" / label_path.name, downsample_labels(sample.labels, 2))
    return dst


def spy_predict_image(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Record every image the network is given by ``predict_folder``."""
    seen: list[np.ndarray] = []

    def spy(net, image):
        seen.append(image.copy())
        return predict_image(net, image)

    monkeypatch.setattr(models.evaluate, "predict_image", spy)
    return seen


def colour_network(net, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A "network" that finds the synthetic purple nuclei by colour in the image it is
    given: its instances land where the native labels are only if the image and the label
    mappings agree on the geometry."""
    mask = image[..., 0] < 156  # nuclei red ~85, stroma ~228
    labels, _ = ndi.label(mask)
    return (mask * np.float32(0.9)).astype(np.float32), distance_map(labels)


def test_resolution_factor() -> None:
    assert resolution_factor(0.25) == 1 and resolution_factor(0.5) == 2
    assert resolution_factor(0.5034, 0.2517) == 2
    for bad in (0.125, 0.3, 0.6):
        with pytest.raises(ValueError, match="not an integer multiple"):
            resolution_factor(bad)


def test_upsample_labels() -> None:
    small = np.array([[1, 2], [0, 3]], dtype=np.int32)
    up = upsample_labels(small, 2, (5, 3))
    expected = np.array([[1, 1, 2], [1, 1, 2], [0, 0, 3], [0, 0, 3], [0, 0, 0]])
    np.testing.assert_array_equal(up, expected)
    np.testing.assert_array_equal(upsample_labels(small, 1, (2, 2)), small)


def test_non_integer_factors_map_labels_like_the_pipeline() -> None:
    model = np.arange(16).reshape(4, 4)
    # 0.5: native pixel y is model pixel 2y + 1 (the pipeline's block_rows)
    np.testing.assert_array_equal(upsample_labels(model, 0.5, (2, 2)), [[5, 7], [13, 15]])
    # 1.5: floor((y + 0.5) / 1.5) = 0, 1, 1, 2, 2 (clipped to the model grid)
    up = upsample_labels(np.arange(3)[None, :] * np.ones((3, 1), int), 1.5, (5, 5))
    np.testing.assert_array_equal(up[0], [0, 1, 1, 2, 2])
    np.testing.assert_array_equal(up[0], block_rows(0, 5, 1.5, 3))
    # targets go the other way: model pixel i is native pixel floor((i + 0.5) * scale)
    np.testing.assert_array_equal(native_index(4, 0.5, 2), [0, 0, 1, 1])
    np.testing.assert_array_equal(native_index(3, 1.5, 5), [0, 2, 3])
    np.testing.assert_array_equal(native_index(3, 2.0, 5), [1, 3, 4])  # = downsample_labels
    labels = np.arange(36).reshape(6, 6)
    np.testing.assert_array_equal(labels[np.ix_(native_index(3, 2, 6), native_index(3, 2, 6))],
                                  downsample_labels(labels, 2))


def legacy_predictions(bundle: ModelBundle, folder: Path) -> list[Prediction]:
    """What ``predict_folder`` computed before it learnt other data resolutions (0.25 um/px
    data, integer factor only): the reference of the integer path."""
    factor = round(bundle.mpp / 0.25)
    out = []
    for image_path, label_path in list_pairs(folder):
        sample = load_sample(image_path, label_path)
        image = downsample_image(sample.image, factor)
        prob, dist = predict_image(bundle.net, image)
        small = downsample_labels(sample.labels, factor)[: image.shape[0], : image.shape[1]]
        inter = int(((small > 0) & (prob > 0.5)).sum())
        total = int((small > 0).sum()) + int((prob > 0.5).sum())
        sem = 1.0 if total == 0 else 2.0 * inter / total
        mse = float(np.mean((dist.astype(np.float64)
                             - distance_map(small, bundle.targets.distance_norm)) ** 2))
        out.append(Prediction(sample.name, prob, dist, sample.labels, factor, bundle.mpp, sem, mse))
    return out


@pytest.mark.parametrize("model_mpp", [0.5, 0.25])
def test_integer_factor_scores_are_unchanged(make_annotated_folder, tmp_path: Path,
                                             model_mpp: float,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_annotated_folder(size=67, n_images=2)  # odd: the floor-sized grid is kept
    bundle = load(save_tiny_checkpoint(tmp_path / "m.pt", mpp=model_mpp))
    ws = WatershedParams(min_marker_size=1, min_size=3)
    expected = score_predictions(legacy_predictions(bundle, folder), ws)
    seen = spy_predict_image(monkeypatch)
    for kwargs in ({}, {"data_mpp": 0.25}):
        result = evaluate_folder(bundle, folder, watershed=ws, progress=False, **kwargs)
        data = result.pop("data")
        result.pop("model")
        assert result == expected
        assert data["mpp"] == 0.25 and data["factor"] == round(model_mpp / 0.25)
        assert data["scale"] == model_mpp / 0.25
    k = round(model_mpp / 0.25)
    assert seen[0].shape == (67 // k, 67 // k, 3)


@pytest.mark.parametrize(("data_mpp", "model_mpp", "model_shape"), [
    (0.5, 0.25, (64, 64)),  # a 20x folder, a 40x model: up-sampled 2x
    (0.2428, 0.25, (63, 63)),  # ceil(64 / 1.0297)
    (0.2428, 0.5, (32, 32)),  # ceil(64 / 2.0593): not a box mean (drift 1.9 px)
])
def test_other_resolutions_are_read_like_a_slide(
        make_annotated_folder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        data_mpp: float, model_mpp: float, model_shape: tuple[int, int]) -> None:
    folder = make_annotated_folder(n_images=2)
    if data_mpp == 0.5:
        folder = halve_folder(folder, tmp_path / "20x")
    bundle = load(save_tiny_checkpoint(tmp_path / "m.pt", mpp=model_mpp))
    seen = spy_predict_image(monkeypatch)
    predictions = predict_folder(bundle, folder, progress=False, data_mpp=data_mpp)
    assert len(seen) == len(predictions) == 2
    for image, pred, (image_path, _) in zip(seen, predictions, list_pairs(folder)):
        native = np.asarray(Image.open(image_path).convert("RGB"))
        slide = MemorySlide(native, data_mpp)
        plan = plan_read(slide.info, model_mpp)
        assert plan.shape == model_shape and image.shape == (*model_shape, 3)
        np.testing.assert_array_equal(image, read_region(slide, plan, Box(0, 0, *plan.shape)))
        assert pred.prob.shape == pred.dist.shape == model_shape
        assert pred.truth.shape == native.shape[:2]
        assert pred.factor == pytest.approx(model_mpp / data_mpp)
        assert segment(pred, bundle.watershed).shape == native.shape[:2]
    result = evaluate_folder(bundle, folder, progress=False, data_mpp=data_mpp)
    assert result["data"]["mpp"] == data_mpp and result["data"]["factor"] is None
    assert result["data"]["scale"] == pytest.approx(model_mpp / data_mpp)
    assert all(0.0 <= result[k] <= 1.0 for k in ("dice", "aji", "pq", "f1", "semantic_dice"))
    json.dumps(result)


@pytest.mark.parametrize(("data_mpp", "model_mpp"), [(0.5, 0.25), (0.25, 0.25), (0.25, 0.5),
                                                     (0.2428, 0.25), (0.2428, 0.5)])
def test_a_network_that_sees_nuclei_scores_well_at_any_resolution(
        make_annotated_folder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        data_mpp: float, model_mpp: float) -> None:
    """Images, instances and targets stay aligned. Correct mappings give Dice and semantic
    Dice >= 0.89 here; shifting the targets by one native pixel or the instances by one
    model pixel gives <= 0.83 in every non-integer case (tried by hand)."""
    folder = make_annotated_folder(n_images=2, size=96, nuclei=14, touching=0.0)
    if data_mpp == 0.5:
        folder = halve_folder(folder, tmp_path / "20x")
    bundle = load(save_tiny_checkpoint(tmp_path / "m.pt", mpp=model_mpp))
    monkeypatch.setattr(models.evaluate, "predict_image", colour_network)
    result = evaluate_folder(bundle, folder, progress=False, data_mpp=data_mpp,
                             watershed=WatershedParams(min_marker_size=1, min_size=2))
    assert result["dice"] > 0.85 and result["semantic_dice"] > 0.85, result
    assert result["f1"] > 0.95 and result["aji"] > 0.75, result


def test_perfect_predictions_score_one(make_annotated_folder) -> None:
    folder = make_annotated_folder(touching=0.0)
    params = WatershedParams(min_marker_size=1, min_size=5)
    result = score_predictions(perfect_predictions(folder), params)
    assert result["n_images"] == 4
    for key in ("dice", "aji", "pq", "f1"):
        assert result[key] == pytest.approx(1.0), key
    for row in result["per_image"]:
        assert row["n_pred"] == row["n_true"] > 0


def test_ideal_outputs_separate_touching_nuclei(synthetic_folder: Path) -> None:
    result = score_predictions(perfect_predictions(synthetic_folder),
                               WatershedParams(min_marker_size=1, min_size=5))
    assert result["f1"] == pytest.approx(1.0) and result["aji"] > 0.95


def test_half_resolution_predictions_are_scored_at_native_resolution(synthetic_folder: Path) -> None:
    result = score_predictions(perfect_predictions(synthetic_folder, 2),
                               WatershedParams(min_marker_size=1, min_size=2))
    row = result["per_image"][0]
    assert row["n_pred"] >= 0.8 * row["n_true"]
    assert 0.6 < result["dice"] < 1.0 and 0.4 < result["aji"] < 1.0


def test_evaluate_folder_with_a_tiny_model(synthetic_folder: Path, tiny_checkpoint: Path) -> None:
    bundle = load(tiny_checkpoint)
    result = evaluate_folder(bundle, synthetic_folder, progress=False)
    assert TOP_KEYS <= set(result)
    assert result["n_images"] == 4 and len(result["per_image"]) == 4
    assert result["model"]["sha256"] == bundle.sha256
    assert result["model"]["path"] == str(tiny_checkpoint)
    assert result["watershed"] == bundle.watershed.to_dict()
    assert result["data"] == {"folder": str(synthetic_folder.resolve()), "mpp": 0.25,
                              "factor": 2, "scale": 2.0}
    for row in result["per_image"]:
        assert set(row) == ROW_KEYS
        truth = tifffile.imread(synthetic_folder / "labels" / f"{row['name']}.tif")
        assert row["n_true"] == len(np.unique(truth)) - 1
        assert all(0.0 <= row[k] <= 1.0 for k in ("dice", "aji", "pq", "f1", "semantic_dice"))
    assert result["aji"] == pytest.approx(np.mean([r["aji"] for r in result["per_image"]]))
    json.dumps(result)  # JSON-able
    # a subset by name, and another watershed without running the network again
    some = evaluate_folder(bundle, synthetic_folder, names=["img2"], progress=False,
                           watershed=WatershedParams(fg_threshold=0.9))
    assert [r["name"] for r in some["per_image"]] == ["img2"]
    assert some["watershed"]["fg_threshold"] == 0.9
    with pytest.raises(FileNotFoundError, match="no annotated image named nope"):
        predict_folder(bundle, synthetic_folder, names=["nope"], progress=False)


def test_tune_picks_the_best_setting_and_its_table_matches_direct_scoring(
        make_annotated_folder) -> None:
    predictions = perfect_predictions(make_annotated_folder(touching=0.0))
    grid = {"fg_threshold": (0.5, 0.95), "marker_threshold": (0.5, 0.99),
            "min_marker_size": (1,), "min_size": (1, 60)}
    params, table = tune_watershed(predictions, grid)
    assert len(table) == 8
    assert params == WatershedParams(0.5, 0.5, 1, 1)
    best = max(r["aji"] for r in table)
    assert best == pytest.approx(1.0)
    for row in table:  # the min_size shortcut equals a full post-processing + scoring
        ws = WatershedParams(row["fg_threshold"], row["marker_threshold"],
                             row["min_marker_size"], row["min_size"])
        assert row["aji"] == pytest.approx(score_predictions(predictions, ws)["aji"]), row
    with pytest.raises(ValueError, match="unknown grid keys"):
        tune_watershed(predictions, {"threshold": (0.5,)})


def test_default_grid_scales_with_resolution() -> None:
    fine, coarse = default_grid(0.25), default_grid(0.5)
    assert len(list(itertools.product(*fine.values()))) == 135
    assert fine["min_size"] == tuple(4 * s for s in coarse["min_size"])
    assert coarse["fg_threshold"] == fine["fg_threshold"]


def test_default_grid_finds_markers_of_per_image_targets() -> None:
    """A nucleus a quarter the radius of the image's largest peaks at ~0.25 of a per-image
    map: below every per-nucleus marker threshold, above the lowest per-image one."""
    yy, xx = np.mgrid[:96, :96]
    labels = np.zeros((96, 96), np.uint16)
    labels[(yy - 40) ** 2 + (xx - 40) ** 2 <= 20 ** 2] = 1
    labels[(yy - 80) ** 2 + (xx - 80) ** 2 <= 5 ** 2] = 2
    small_peak = distance_map(labels, "per_image")[labels == 2].max()
    assert small_peak < min(default_grid(0.25)["marker_threshold"])
    assert small_peak > min(default_grid(0.25, "per_image")["marker_threshold"])
    assert max(distance_map(labels, "per_nucleus")[labels == 2]) == pytest.approx(1.0)


def test_retune_checkpoint(synthetic_folder: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    grid = {"fg_threshold": (0.3, 0.5), "marker_threshold": (0.5,), "min_marker_size": (2,),
            "min_size": (1, 5)}
    out, params, record = retune_checkpoint(tiny_checkpoint, synthetic_folder,
                                            tmp_path / "tuned.pt", grid=grid, progress=False)
    tuned, original = load(out), load(tiny_checkpoint)
    assert tuned.watershed == params
    assert record["val_images"] == ["img0", "img1"] and record["settings"] == 4
    stored = tuned.provenance["watershed_tuning"]
    assert stored["best_aji"] == record["best_aji"] and stored["val_images"] == ["img0", "img1"]
    assert stored["previous"] == original.watershed.to_dict()
    assert tuned.provenance["val_images"] == original.provenance["val_images"]
    assert tuned.metrics == original.metrics
    # the same network
    for a, b in zip(original.net.state_dict().values(), tuned.net.state_dict().values()):
        assert (a == b).all()


def test_retune_needs_a_validation_split(synthetic_folder: Path, tmp_path: Path) -> None:
    model = save_tiny_checkpoint(tmp_path / "noval.pt", val_images=[])
    with pytest.raises(CheckpointError, match="val_images"):
        retune_checkpoint(model, synthetic_folder, tmp_path / "out.pt", progress=False)


def test_cli_evaluate_writes_json(synthetic_folder: Path, tiny_checkpoint: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scores" / "eval.json"
    code = main(["--quiet", "evaluate", "--model", str(tiny_checkpoint), "--data",
                 str(synthetic_folder), "--json", str(out), "--device", "cpu",
                 "--images", "img0,img3"])
    assert code == 0
    result = json.loads(out.read_text())
    assert TOP_KEYS <= set(result) and result["n_images"] == 2
    printed = capsys.readouterr().out
    assert "img0" in printed and "img3" in printed and "mean" in printed
    assert "regression_mse" in printed.splitlines()[0]
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temp file left
    assert result["data"]["mpp"] == 0.25 and result["data"]["scale"] == 2.0  # MoNuSeg default


def test_cli_evaluate_mpp(synthetic_folder: Path, tiny_checkpoint: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = models.evaluate.evaluate_folder
    monkeypatch.setattr(models.evaluate, "evaluate_folder",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    out = tmp_path / "eval.json"
    assert main(["--quiet", "evaluate", "--model", str(tiny_checkpoint), "--data",
                 str(synthetic_folder), "--json", str(out), "--device", "cpu",
                 "--images", "img0", "--mpp", "0.3"]) == 0
    assert calls[-1]["data_mpp"] == 0.3
    data = json.loads(out.read_text())["data"]
    assert data["mpp"] == 0.3 and data["scale"] == pytest.approx(0.5 / 0.3)
    assert data["factor"] is None
    assert "0.3 µm/px" in capsys.readouterr().out
    assert main(["--quiet", "evaluate", "--model", str(tiny_checkpoint), "--data",
                 str(synthetic_folder), "--device", "cpu", "--images", "img0"]) == 0
    assert calls[-1]["data_mpp"] == 0.25
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tiny_checkpoint), "--data", str(synthetic_folder),
                 "--device", "cpu", "--mpp", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "positive" in err and len(err.splitlines()) == 1


def test_cli_threads_sets_torch_threads(synthetic_folder: Path, tiny_checkpoint: Path) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["--quiet", "evaluate", "--model", str(tiny_checkpoint), "--data",
                     str(synthetic_folder), "--device", "cpu", "--images", "img0",
                     "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["--quiet", "evaluate", "--model", str(tiny_checkpoint), "--data",
                     str(synthetic_folder), "--device", "cpu", "--images", "img0"]) == 0
        assert torch.get_num_threads() == 1  # 0 (the default) leaves torch's setting alone
    finally:
        torch.set_num_threads(before)


def test_cli_errors_are_one_line(synthetic_folder: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", "--model", str(tmp_path / "missing.pt"), "--data",
                 str(synthetic_folder)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wsi-nuclei evaluate: error:") and "not found" in err
    assert len(err.splitlines()) == 1
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    assert main(["evaluate", "--model", str(garbage), "--data", str(synthetic_folder)]) == 2
    assert "not a readable model checkpoint" in capsys.readouterr().err


def test_cli_tune(synthetic_folder: Path, tiny_checkpoint: Path, tmp_path: Path,
                  capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import models.tune

    small = {"fg_threshold": (0.5,), "marker_threshold": (0.4, 0.6), "min_marker_size": (2,),
             "min_size": (5,)}
    monkeypatch.setattr(models.tune, "default_grid", lambda mpp, distance_norm="per_nucleus": small)
    out = tmp_path / "tuned.pt"
    assert main(["--quiet", "tune", "--model", str(tiny_checkpoint), "--data",
                 str(synthetic_folder), "--out", str(out), "--device", "cpu"]) == 0
    assert load(out).provenance["watershed_tuning"]["settings"] == 2
    assert "best watershed" in capsys.readouterr().out
    # --half: float16 on disk, the same network to float16 precision
    half = tmp_path / "tuned-half.pt"
    assert main(["--quiet", "tune", "--model", str(tiny_checkpoint), "--data",
                 str(synthetic_folder), "--out", str(half), "--device", "cpu", "--half"]) == 0
    stored = torch.load(half, weights_only=True)["state_dict"]
    assert {t.dtype for t in stored.values() if isinstance(t, torch.Tensor) and t.is_floating_point()} \
        == {torch.float16}
    for (k, a), b in zip(load(out).net.state_dict().items(), load(half).net.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), k


@pytest.mark.shared_data
def test_evaluate_runs_on_real_monuseg(monuseg: Path, tmp_path: Path) -> None:
    """Only that the whole path works on real 1000x1000 tiles (tiny untrained model)."""
    names = sorted(p.stem for p in (monuseg / "test" / "images").glob("*.png"))[:1]
    model = save_tiny_checkpoint(tmp_path / "tiny.pt")
    result = evaluate_folder(load(model), monuseg / "test", names=names, progress=False)
    assert result["n_images"] == 1 and result["per_image"][0]["n_true"] > 100
    assert np.isfinite([result[k] for k in ("dice", "aji", "pq", "f1", "regression_mse")]).all()


def test_prepare_maps_the_model_resolution_image_the_network_sees(
        synthetic_folder: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = spy_predict_image(monkeypatch)
    bundle = load(tiny_checkpoint)
    plain = predict_folder(bundle, synthetic_folder, names=["img1"], progress=False)
    given: list[np.ndarray] = []

    def invert(image: np.ndarray) -> np.ndarray:
        given.append(image.copy())
        return 255 - image

    prepared = predict_folder(bundle, synthetic_folder, names=["img1"], progress=False, prepare=invert)
    assert len(seen) == 2 and len(given) == 1
    assert (given[0] == seen[0]).all()  # the resampled image, as the network saw it unprepared
    assert (seen[1] == 255 - seen[0]).all()
    assert not np.array_equal(prepared[0].prob, plain[0].prob)


def test_cli_evaluate_stain_normalise(synthetic_folder: Path, tiny_checkpoint: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.commands_models import normalise_image

    calls = []
    real = models.evaluate.evaluate_folder
    monkeypatch.setattr(models.evaluate, "evaluate_folder",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    for flag in ([], ["--stain-normalise"]):
        out = tmp_path / f"eval{len(flag)}.json"
        assert main(["--quiet", "evaluate", "--model", str(tiny_checkpoint), "--data",
                     str(synthetic_folder), "--json", str(out), "--device", "cpu",
                     "--images", "img0", *flag]) == 0
        assert json.loads(out.read_text())["stain_normalise"] is bool(flag)
        assert calls[-1]["prepare"] is (normalise_image if flag else None)
