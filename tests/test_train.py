"""A tiny end-to-end training run on a synthetic folder, then ``--resume``."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_WIDTHS

from models.checkpoints import load
from models.config import AugmentConfig, NetConfig, TargetConfig, TrainConfig, WatershedParams
from models.datasets import MONUSEG_MPP, split_by_slide
from models.network import NucleusNet
from models.train import learning_rate, train

NET = NetConfig(arch="dual", widths=TINY_WIDTHS, batchnorm=True, dropout=0.0)
CFG = TrainConfig(patch_size=32, batch_size=4, steps=30, lr=3e-3, val_every=10,
                  checkpoint_every=10, seed=0, color_jitter=0.05, threads=1)


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def run(tmp_path: Path, make_annotated_folder) -> tuple[Path, Path]:
    data = make_annotated_folder(n_images=5, size=48, nuclei=8, seed=2)
    out = tmp_path / "run"
    best = train(data, out, NET, TargetConfig(), CFG)
    torch.set_num_threads(1)
    return data, best


def test_tiny_training_learns_and_writes_a_checkpoint(run: tuple[Path, Path]) -> None:
    data, best = run
    out = best.parent
    rows = read_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [10, 20, 30]
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0], losses
    for r in rows:
        assert 0.0 <= float(r["val_dice"]) <= 1.0 and float(r["val_mse"]) >= 0
    payload = torch.load(best, weights_only=False)
    assert payload["format"] == "wsi-nuclei/1" and payload["mpp"] == MONUSEG_MPP
    provenance = payload["provenance"]
    assert provenance["data"] == str(data.resolve())
    assert len(provenance["val_images"]) == 1 and len(provenance["train_images"]) == 4
    assert set(provenance["val_images"]).isdisjoint(provenance["train_images"])
    assert payload["metrics"]["split"] == "validation"
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["step"] == 30
    final = load(out / "final.pt")  # the end of the schedule, whatever validation said
    assert final.provenance["steps"] == 30
    for key, value in final.net.state_dict().items():
        assert torch.equal(value, state["model"][key]), key


def test_best_checkpoint_loads(run: tuple[Path, Path]) -> None:
    _, best = run
    bundle = load(best)
    assert bundle.config == NET and bundle.mpp == MONUSEG_MPP


def test_resume_continues_from_last(run: tuple[Path, Path]) -> None:
    _, best = run
    out = best.parent
    before = torch.load(out / "last.pt", weights_only=False)
    train(None, out, NET, TargetConfig(), CFG, resume=True, steps=40)
    torch.set_num_threads(1)
    after = torch.load(out / "last.pt", weights_only=False)
    assert after["step"] == 40 and after["train"]["steps"] == 40
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [10, 20, 30, 40]
    changed = [not torch.equal(before["model"][k], after["model"][k])
               for k in before["model"] if before["model"][k].is_floating_point()]
    assert any(changed)
    # the resumed run kept the stored configuration (not the defaults of a new run)
    assert after["train"]["patch_size"] == 32 and tuple(after["net"]["widths"]) == TINY_WIDTHS


def test_resume_without_last_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no .*last.pt"):
        train(None, tmp_path / "empty", NET, TargetConfig(), CFG, resume=True)


def test_split_is_deterministic_and_disjoint() -> None:
    names = [f"n{i}" for i in range(10)]
    a = split_by_slide(names, 0.2, seed=0)
    assert a == split_by_slide(list(reversed(names)), 0.2, seed=0)
    assert len(a[1]) == 2 and set(a[0]) | set(a[1]) == set(names)
    assert not set(a[0]) & set(a[1])


def test_learning_rate_schedule() -> None:
    cfg = TrainConfig(steps=1000, lr=1e-3)
    rates = np.array([learning_rate(s, cfg) for s in range(1000)])
    assert rates[0] < rates[99] == pytest.approx(1e-3)
    assert rates[-1] == pytest.approx(1e-5, rel=0.05)
    assert np.all(np.diff(rates[100:]) <= 1e-12)


def test_init_starts_from_a_checkpoint(run: tuple[Path, Path]) -> None:
    data, best = run
    start = load(best)
    out = best.parent.parent / "from-init"
    # one step with a negligible learning rate: the weights are the checkpoint's
    train(data, out, NetConfig(arch="paper", widths=(4, 8)), TargetConfig(),
          replace(CFG, steps=1, lr=1e-12, weight_decay=0.0), init=best)
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["net"]["arch"] == start.config.arch == "dual"
    for key, value in start.net.named_parameters():
        assert torch.allclose(state["model"][key], value, atol=1e-6), key
    fresh = NucleusNet(start.config).state_dict()
    assert any(not torch.allclose(fresh[k], v) for k, v in start.net.named_parameters())


def test_training_on_from_a_pruned_checkpoint_keeps_its_shape_and_record(
        run: tuple[Path, Path], tmp_path: Path) -> None:
    """Fine-tuning a structured-pruned model longer (``train --init pruned.pt``, then
    ``--resume``): the thin architecture and the pruning record survive both."""
    from models import checkpoints
    from models.pruning.structured import structured_prune

    data, best = run
    dense = load(best)
    thin = structured_prune(dense.net, 0.5)
    record = {"method": "structured", "ratio": 0.5}
    pruned = checkpoints.save(tmp_path / "pruned.pt", thin, mpp=dense.mpp, watershed=dense.watershed,
                              targets=dense.targets, provenance={"pruning": record})
    out = tmp_path / "longer"
    cfg = replace(CFG, steps=4, val_every=2, checkpoint_every=2)
    train(data, out, NET, TargetConfig(), cfg, init=pruned)
    train(None, out, NET, TargetConfig(), cfg, resume=True, steps=6)
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["step"] == 6
    assert state["init"]["pruning"] == record
    result = load(out / "best.pt")
    assert result.provenance["pruning"] == record
    assert result.provenance["init"]["sha256"] == load(pruned).sha256
    assert result.config == thin.config
    assert sum(p.numel() for p in result.net.parameters()) == sum(p.numel() for p in thin.parameters())


# ---------------------------------------------------------------- distillation


def test_soften_targets_blends_truth_and_teacher() -> None:
    from models.data import TrainingImage, soften_targets

    item = TrainingImage(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), np.float32),
                         np.full((4, 4), 0.8, np.float32))
    prob, dist = np.zeros((4, 4), np.float32), np.full((4, 4), 0.2, np.float32)
    assert np.array_equal(soften_targets(item, prob, dist, 0.0).bce_target, item.mask)
    assert np.array_equal(item.bce_target, item.mask)
    soft = soften_targets(item, prob, dist, 0.25)
    assert np.allclose(soft.bce_target, 0.75) and np.allclose(soft.distance, 0.65)
    assert np.array_equal(soft.mask, item.mask)  # the Dice term keeps the truth
    assert soft.image is item.image and soft.bce_target.dtype == np.float32
    assert np.allclose(soften_targets(item, prob, dist, 1.0).distance, 0.2)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        soften_targets(item, prob, dist, 1.5)
    with pytest.raises(ValueError, match="does not match"):
        soften_targets(item, prob[:2], dist, 0.5)


def _teacher_gap(run: Path, config: NetConfig, teacher: NucleusNet, data: Path) -> float:
    """Mean squared distance between the outputs of a run's final weights and the
    teacher's (``best.pt`` is chosen against the truth, so it is not the one to compare)."""
    from models.data import load_folder
    from models.inference import predict_image

    student = NucleusNet(config)
    student.load_state_dict(torch.load(run / "last.pt", weights_only=False)["model"])
    gaps = []
    for sample in load_folder(data):
        ps, ds = predict_image(student.eval(), sample.image)
        pt, dt = predict_image(teacher.eval(), sample.image)
        gaps.append(float(np.mean((ps - pt) ** 2 + (ds - dt) ** 2)))
    return float(np.mean(gaps))


def test_distillation_pulls_the_student_to_the_teacher(tmp_path: Path, make_annotated_folder) -> None:
    """With ``distill=1`` the BCE and MSE targets are the teacher's outputs: a student
    trained so ends much closer to an (untrained, truth-unlike) teacher than one trained on
    the truth; the teacher is recorded and must work at the student's resolution. (No
    batch-norm: after 30 steps its running statistics, not the weights, would decide.)"""
    from models import checkpoints

    data = make_annotated_folder(n_images=5, size=48, nuclei=8, seed=2)
    net = replace(NET, batchnorm=False)
    torch.manual_seed(7)
    teacher = NucleusNet(net).eval()
    path = checkpoints.save(tmp_path / "teacher.pt", teacher, mpp=MONUSEG_MPP,
                            watershed=WatershedParams(), targets=TargetConfig())
    taught = train(data, tmp_path / "taught", net, TargetConfig(),
                   replace(CFG, teacher=str(path), distill=1.0))
    train(data, tmp_path / "plain", net, TargetConfig(), CFG)
    torch.set_num_threads(1)
    gap_taught = _teacher_gap(tmp_path / "taught", net, teacher, data)
    assert gap_taught < 0.5 * _teacher_gap(tmp_path / "plain", net, teacher, data)
    config = load(taught).provenance["train_config"]
    assert config["teacher"] == str(path) and config["distill"] == 1.0
    far = checkpoints.save(tmp_path / "teacher20x.pt", teacher, mpp=2 * MONUSEG_MPP,
                           watershed=WatershedParams(), targets=TargetConfig())
    with pytest.raises(ValueError, match="um/px"):
        train(data, tmp_path / "bad", net, TargetConfig(), replace(CFG, teacher=str(far), distill=0.5))


@pytest.mark.parametrize(("argv", "batchnorm", "dropout"), [
    (["--arch", "paper"], False, 0.1),                      # the authors' U-Nets
    (["--arch", "dual"], True, 0.0),                        # as shipped
    (["--arch", "paper", "--batchnorm", "--dropout", "0"], True, 0.0),  # explicit wins
])
def test_train_command_defaults_follow_the_architecture(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str], batchnorm: bool,
        dropout: float) -> None:
    import models.train
    from pipeline.cli import main

    seen = {}

    def fake_train(data, out, net_cfg, target_cfg, cfg, **kwargs):
        seen["net"] = net_cfg
        return tmp_path / "best.pt"

    monkeypatch.setattr(models.train, "train", fake_train)
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *argv]) == 0
    assert (seen["net"].batchnorm, seen["net"].dropout) == (batchnorm, dropout)


def test_augmentation_ablation_runs_each_variant_once(run: tuple[Path, Path], tmp_path: Path) -> None:
    """``python -m models.ablation``: ``all`` and ``no-<name>`` fine-tunes from one start,
    each tuned and recorded; a second call reuses the finished variants."""
    from models.ablation import main, variants

    assert list(variants()) == ["all", "no-stain", "no-scale", "no-optics", "no-deform", "legacy"]
    no_stain = variants(["stain"], jitter=0.08)["no-stain"]
    assert (no_stain.stain, no_stain.hue, no_stain.saturation) == (0.08, 0.0, 0.0)
    assert no_stain.scale == AugmentConfig().scale and variants(["deform"])["no-deform"].rotate is False
    with pytest.raises(ValueError, match="unknown"):
        variants(["sharpness"])
    data, best = run
    out = tmp_path / "ablation"
    argv = ["--data", str(data), "--init", str(best), "--out", str(out), "--steps", "2",
            "--patch-size", "32", "--batch-size", "2", "--downsample", "1", "--only", "stain"]
    assert main(argv) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["all", "no-stain", "legacy"]
    assert report["results"][1]["augment"]["hue"] == 0.0 and report["results"][0]["delta_vs_all"] == 0.0
    assert all(0.0 <= r["tuned_val_aji"] <= 1.0 for r in report["results"])
    first = (out / "no-stain" / "result.json").stat().st_mtime_ns
    assert main(argv) == 0 and (out / "no-stain" / "result.json").stat().st_mtime_ns == first
    # --done keeps each finished result outside OUT; a new machine (OUT gone) skips those
    done = tmp_path / "done"
    assert main([*argv, "--done", str(done)]) == 0
    assert sorted(p.name for p in done.iterdir()) == ["all.json", "legacy.json", "no-stain.json"]
    kept = json.loads((done / "no-stain.json").read_text())
    shutil.rmtree(out)
    assert main([*argv, "--out", str(out), "--done", str(done)]) == 0
    assert not (out / "no-stain").exists()
    again = json.loads((out / "ablation.json").read_text())["results"][1]
    assert {k: v for k, v in again.items() if k != "delta_vs_all"} == kept
    # a replicate of one variant with another seed: its own name, the others untouched
    assert main([*argv, "--done", str(done), "--seed", "1", "--variants", "all"]) == 0
    assert sorted(p.name for p in done.iterdir()) == ["all.json", "all@seed1.json", "legacy.json",
                                                      "no-stain.json"]
    assert [r["variant"] for r in json.loads((out / "ablation.json").read_text())["results"]] == ["all@seed1"]
