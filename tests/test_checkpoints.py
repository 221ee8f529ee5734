"""One-file checkpoints: exact round trips, sparse packing, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_net

from models import checkpoints
from models.checkpoints import CheckpointError, _pack, _unpack, load, resolve, save
from models.config import NetConfig, TargetConfig, WatershedParams
from models.network import NucleusNet


def outputs(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return net.eval()(x)


@pytest.mark.parametrize("arch,batchnorm", [("dual", True), ("paper", False)])
def test_round_trip_gives_identical_outputs(tmp_path: Path, arch: str, batchnorm: bool) -> None:
    net = tiny_net(arch, seed=3, batchnorm=batchnorm)
    if batchnorm:  # non-trivial running statistics must survive too
        net.train()
        with torch.no_grad():
            net(torch.rand(2, 3, 16, 16))
        net.eval()
    params = WatershedParams(0.45, 0.6, 3, 17)
    path = save(tmp_path / "m.pt", net, mpp=0.5, watershed=params,
                targets=TargetConfig("per_image"), provenance={"val_images": ["a", "b"]},
                metrics={"val_dice": 0.8})
    bundle = load(path)
    assert bundle.config == net.config
    assert bundle.mpp == 0.5 and bundle.watershed == params
    assert bundle.targets == TargetConfig("per_image")
    assert bundle.provenance["val_images"] == ["a", "b"] and bundle.metrics["val_dice"] == 0.8
    assert bundle.path == path and len(bundle.sha256) == 64
    x = torch.rand(1, 3, 32, 32)
    for a, b in zip(outputs(net, x), outputs(bundle.net, x)):
        assert torch.equal(a, b)


def test_sparse_packing_round_trip(tmp_path: Path) -> None:
    net = tiny_net("dual", seed=1)
    conv = net.encoder.blocks[1][0]
    with torch.no_grad():
        mask = torch.rand_like(conv.weight) < 0.8
        conv.weight[mask] = 0.0
    very = net.encoder.blocks[2][0]
    with torch.no_grad():
        very.weight[torch.rand_like(very.weight) < 0.99] = 0.0
    packed = _pack(net.state_dict())
    key = "encoder.blocks.1.0.weight"
    assert isinstance(packed[key], dict) and packed[key]["sparse_shape"] == list(conv.weight.shape)
    assert packed[key]["values"].numel() == int((conv.weight != 0).sum())
    # 80 % zeros: a bitmask (1 bit per weight) beats int32 indices; 99 %: indices win
    assert "bitmask" in packed[key] and "indices" not in packed[key]
    assert packed[key]["bitmask"].numel() == -(-conv.weight.numel() // 8)
    assert "indices" in packed["encoder.blocks.2.0.weight"]
    assert isinstance(packed["encoder.blocks.0.0.weight"], torch.Tensor)  # dense stays dense
    unpacked = _unpack(packed)
    for name, tensor in net.state_dict().items():
        assert torch.equal(unpacked[name], tensor), name
    # and through a file
    path = save(tmp_path / "sparse.pt", net, mpp=0.25, watershed=WatershedParams(),
                targets=TargetConfig())
    x = torch.rand(1, 3, 16, 16)
    for a, b in zip(outputs(net, x), outputs(load(path).net, x)):
        assert torch.equal(a, b)


def test_corrupt_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    good = save(tmp_path / "good.pt", tiny_net(), mpp=0.5, watershed=WatershedParams(),
                targets=TargetConfig())
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable model checkpoint"):
        load(bad)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable model checkpoint"):
        load(text)


def test_other_torch_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save(tiny_net().state_dict(), path)
    with pytest.raises(CheckpointError, match="not a wsi-nuclei checkpoint"):
        load(path)


def test_mismatched_weights_are_reported(tmp_path: Path) -> None:
    path = save(tmp_path / "m.pt", tiny_net(), mpp=0.5, watershed=WatershedParams(),
                targets=TargetConfig())
    payload = torch.load(path, weights_only=True)
    payload["net"]["widths"] = [8, 16, 32]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="weights do not match"):
        load(path)


def test_checkpoint_error_is_a_value_error_for_the_cli() -> None:
    assert issubclass(CheckpointError, ValueError)


def test_resolve_by_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("pruned80.pt", "dense.pt"):
        save(weights / name, tiny_net(), mpp=0.5, watershed=WatershedParams(),
             targets=TargetConfig())
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", weights)
    monkeypatch.chdir(tmp_path)
    assert resolve("dense") == weights / "dense.pt"
    assert resolve("pruned80.pt") == weights / "pruned80.pt"
    assert load("dense").config == NetConfig(arch="dual", widths=(4, 8, 16), dropout=0.0)
    with pytest.raises(CheckpointError) as info:
        resolve("pruned95")
    message = str(info.value)
    assert "'pruned95' not found" in message and "dense.pt, pruned80.pt" in message
    assert "\n" not in message


def test_resolve_without_shipped_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", tmp_path / "empty")
    with pytest.raises(CheckpointError, match="shipped models: none"):
        load(tmp_path / "missing.pt")


def test_half_precision_storage_is_smaller_and_loads_as_float32(tmp_path: Path) -> None:
    torch.manual_seed(0)  # big enough that weights, not metadata, dominate the file
    net = NucleusNet(NetConfig(arch="dual", widths=(16, 32, 64), batchnorm=True)).eval()
    full = save(tmp_path / "full.pt", net, mpp=0.25, watershed=WatershedParams(), targets=TargetConfig())
    half = save(tmp_path / "half.pt", net, mpp=0.25, watershed=WatershedParams(), targets=TargetConfig(),
                half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load(half)
    assert all(p.dtype == torch.float32 for p in loaded.net.parameters())
    x = torch.rand(1, 3, 32, 32)
    a, b = outputs(net.eval(), x), outputs(loaded.net, x)
    assert torch.allclose(a[0], b[0], atol=1e-2) and torch.allclose(a[1], b[1], atol=1e-2)


def test_saved_files_follow_the_umask_and_leave_no_temporaries(tmp_path: Path) -> None:
    """Checkpoints and score JSON get the usual 0644 under umask 022 (mkstemp would give
    0600, unreadable to the rest of a group sharing a models folder)."""
    import os
    import stat

    from pipeline.commands_models import write_json

    old = os.umask(0o022)
    try:
        model = save(tmp_path / "m.pt", tiny_net("dual"), mpp=0.25, watershed=WatershedParams(),
                     targets=TargetConfig())
        scores = write_json({"aji": 0.5}, tmp_path / "scores.json")
    finally:
        os.umask(old)
    for path in (model, scores):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "scores.json"]
    assert load(model).mpp == 0.25


@pytest.mark.parametrize("arch", ["dual", "paper"])
def test_folded_batchnorm_gives_the_same_outputs(tmp_path: Path, arch: str) -> None:
    """Inference folds BatchNorm into the convs: no BN left, same outputs to float
    rounding, the checkpoint's own network untouched."""
    net = tiny_net(arch, seed=5, batchnorm=True)
    net.train()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
        net(torch.rand(4, 3, 32, 32))
    net.eval()
    path = save(tmp_path / "bn.pt", net, mpp=0.5, watershed=WatershedParams(), targets=TargetConfig())
    plain, folded = load(path), load(path, fold_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.net.modules())
    x = torch.rand(2, 3, 64, 64)
    for a, b in zip(outputs(plain.net, x), outputs(folded.net, x)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.equal(a, torch.zeros_like(a))
    assert sum(p.numel() for p in folded.net.parameters()) < sum(p.numel() for p in plain.net.parameters())


def test_default_model_is_the_first_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pruned20x.pt when shipped, then dense20x.pt, pruned80.pt, dense.pt."""
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", tmp_path)
    assert checkpoints.default_model() == "dense.pt"
    for name in ("dense.pt", "pruned80.pt", "dense20x.pt", "pruned20x.pt"):
        (tmp_path / name).write_bytes(b"")
        assert checkpoints.default_model() == name
