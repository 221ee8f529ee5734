"""Pruning: exact magnitude masks, branch scoping, masked fine-tuning, structured surgery,
checkpoints, the ``prune`` command and the resumable sweep."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_checkpoint, tiny_net
from torch import nn

from models import checkpoints
from models.config import NetConfig, TargetConfig, WatershedParams
from models.network import NucleusNet, count_parameters
from models.pruning import (
    apply_masks,
    finetune,
    global_masks,
    layerwise_masks,
    magnitude_masks,
    prunable_layers,
    sparsity_report,
    structured_prune,
    sweep,
)
from models.pruning.structured import (
    KEEP_PRESETS,
    channel_plan,
    conv_graph,
    conv_macs,
    filter_selection,
    keep_schedule,
)
from models.pruning.sweep import CSV_COLUMNS
from pipeline.cli import main

ARCHS = [(arch, bn) for arch in ("paper", "dual") for bn in (False, True)]


def _net(arch: str = "paper", batchnorm: bool = True, seed: int = 0) -> NucleusNet:
    return tiny_net(arch, seed=seed, batchnorm=batchnorm)


# ---------------------------------------------------------------- unstructured


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 1.0])
def test_layerwise_exact_per_layer(sparsity: float) -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layers = prunable_layers(net, "both")
    apply_masks(net, layerwise_masks(layers, sparsity))
    for name, module in layers.items():
        n = module.weight.numel()
        assert int((module.weight == 0).sum()) == round(sparsity * n), name
    # kept weights are the largest: every pruned |w| <= every kept |w| within a layer
    for name, module in layers.items():
        w, orig = module.weight.detach(), before[f"{name}.weight"]
        pruned, kept = orig[w == 0].abs(), orig[w != 0].abs()
        if len(pruned) and len(kept):
            assert pruned.max() <= kept.min()
    # biases, BN and the 1x1 heads are never pruned
    state = net.state_dict()
    for key, value in before.items():
        if not any(key == f"{n}.weight" for n in layers):
            assert torch.equal(state[key], value), key
    assert not any(n.endswith("head") for n in layers)


def test_layerwise_ties_are_deterministic() -> None:
    net = _net()
    layers = prunable_layers(net, "both")
    first = next(iter(layers.values()))
    with torch.no_grad():
        first.weight.fill_(0.5)
    a = layerwise_masks(layers, 0.25)
    b = layerwise_masks(layers, 0.25)
    assert all(torch.equal(a[k], b[k]) for k in a)
    flat = a[next(iter(layers))].flatten()
    k = round(0.25 * flat.numel())
    assert not flat[:k].any() and flat[k:].all()  # ties: lower flat index pruned first


@pytest.mark.parametrize("arch", ["paper", "dual"])
def test_global_exact_total_uneven_layers(arch: str) -> None:
    net = _net(arch)
    # give layers very different scales so that one threshold prunes them unevenly
    with torch.no_grad():
        for i, module in enumerate(prunable_layers(net, "both").values()):
            module.weight.mul_(0.2 + i)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    apply_masks(net, global_masks(prunable_layers(net, "both"), 0.6))
    report = sparsity_report(net, "both")
    assert report["prunable_weights"] - report["prunable_nonzero"] == round(0.6 * report["prunable_weights"])
    per_layer = [row["sparsity"] for row in report["layers"]]
    assert max(per_layer) - min(per_layer) > 0.3
    pruned, kept = [], []
    for name in prunable_layers(net, "both"):
        w, orig = net.state_dict()[f"{name}.weight"], before[f"{name}.weight"]
        pruned.append(orig[w == 0].abs())
        kept.append(orig[w != 0].abs())
    assert torch.cat(pruned).max() <= torch.cat(kept).min()  # one global threshold


@pytest.mark.parametrize("arch", ["paper", "dual"])
@pytest.mark.parametrize("method", ["layerwise", "global"])
def test_branch_scope(arch: str, method: str) -> None:
    net = _net(arch)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        logit0, dist0 = net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    apply_masks(net, magnitude_masks(net, method, 0.9, "semantic"))
    with torch.no_grad():
        logit1, dist1 = net(x)
    assert torch.equal(dist0, dist1)  # regression branch (and dual's encoder) untouched
    assert not torch.equal(logit0, logit1)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("semantic.", "semantic_decoder.")) for k in changed)
    assert sparsity_report(net, "semantic")["prunable_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert sparsity_report(net, "regression")["prunable_sparsity"] == 0.0
    if arch == "dual":
        assert not any(n.startswith("encoder.") for n in prunable_layers(net, "semantic"))
        assert any(n.startswith("encoder.") for n in prunable_layers(net, "both"))


def test_masks_survive_finetuning(make_annotated_folder) -> None:
    folder = make_annotated_folder(n_images=3, size=64)
    net = _net("dual")
    masks = magnitude_masks(net, "global", 0.7, "both")
    apply_masks(net, masks)
    pruned = {k: v.clone() for k, v in net.state_dict().items()}
    finetune(net, folder, 2, masks=masks, lr=1e-2, batch_size=2, patch_size=32,
             train_names=["img0", "img1"], progress=False)
    layers = prunable_layers(net, "both")
    moved = 0
    for name, module in layers.items():
        w = module.weight.detach()
        assert torch.all(w[~masks[name]] == 0), name
        moved += int((w[masks[name]] != pruned[f"{name}.weight"][masks[name]]).sum())
    assert moved > 0.5 * sum(int(m.sum()) for m in masks.values())
    assert sparsity_report(net)["prunable_sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_batchnorm_recalibration_matches_batch_statistics(make_annotated_folder) -> None:
    """After re-estimation on one batch, eval mode (running statistics) gives what train
    mode (batch statistics) gives on that batch; weights and momenta are untouched."""
    import numpy as np

    from models.data import batch, load_training_items
    from models.pruning.finetune import recalibrate_batchnorm

    folder = make_annotated_folder(n_images=3, size=64)
    items = load_training_items(folder, None, 1, "per_nucleus")
    net = _net("dual", batchnorm=True)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:  # stale statistics, as after pruning
            m.running_mean.fill_(3.0)
            m.running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    x = torch.from_numpy(batch(items, 32, 4, np.random.default_rng(5), 0.0)[0])
    with torch.no_grad():
        stale = net.eval()(x)[1]
        wanted = net.train()(x)[1]
    assert recalibrate_batchnorm(net, items, 1, patch_size=32, batch_size=4, seed=5) == len(bns)
    assert not net.training and all(m.momentum == 0.1 for m in bns)
    with torch.no_grad():
        got = net(x)[1]
    assert torch.allclose(got, wanted, atol=1e-2) and not torch.allclose(stale, wanted, atol=1e-2)
    for k, v in weights.items():
        assert torch.equal(net.state_dict()[k], v), k
    assert recalibrate_batchnorm(_net("dual", batchnorm=False), items, 1, patch_size=32) == 0


def test_sweep_labels_name_the_options() -> None:
    from models.pruning.sweep import method_label

    assert method_label("global") == "global"
    assert method_label("layerwise", bn_batches=8) == "layerwise+bn"
    assert method_label("structured", "thin-top", distill=0.5) == "structured[thin-top]+kd"


def test_finetune_rejects_unknown_images(make_annotated_folder) -> None:
    folder = make_annotated_folder(n_images=2)
    with pytest.raises(FileNotFoundError):
        finetune(_net(), folder, 1, train_names=["nope"], patch_size=32, progress=False)


def test_pruned_checkpoint_smaller_and_equal(tmp_path: Path) -> None:
    config = NetConfig(arch="paper", widths=(8, 16, 32), batchnorm=True, dropout=0.0)
    torch.manual_seed(0)
    net = NucleusNet(config).eval()
    kwargs = {"mpp": 0.5, "watershed": WatershedParams(), "targets": TargetConfig()}
    dense = checkpoints.save(tmp_path / "dense.pt", net, **kwargs)
    apply_masks(net, magnitude_masks(net, "global", 0.9))
    pruned = checkpoints.save(tmp_path / "pruned.pt", net, **kwargs)
    assert pruned.stat().st_size < 0.5 * dense.stat().st_size
    loaded = checkpoints.load(pruned).net
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---------------------------------------------------------------- structured


@pytest.mark.parametrize("arch,bn", ARCHS)
@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.9])
def test_structured_removes_requested_fraction(arch: str, bn: bool, ratio: float) -> None:
    net = _net(arch, bn)
    small = structured_prune(net, ratio).eval()
    assert count_parameters(small) <= (1 - ratio) * count_parameters(net)
    assert count_parameters(small) > 0.5 * (1 - ratio) * count_parameters(net)  # not overshooting
    assert count_parameters(net) == count_parameters(_net(arch, bn))  # input untouched
    with torch.no_grad():
        logit, dist = small(torch.rand(2, 3, 64, 64))
    assert logit.shape == dist.shape == (2, 1, 64, 64)
    widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert min(widths) >= 1 and sorted(set(widths))[0] == 1  # heads keep 1, convs >= 2
    assert sorted(set(widths))[1] >= 2


def test_structured_branch_and_schedule() -> None:
    net = _net("dual", True)
    small = structured_prune(net, 0.7, branch="semantic")
    assert count_parameters(small.encoder) == count_parameters(net.encoder)
    assert count_parameters(small.regression_decoder) == count_parameters(net.regression_decoder)
    assert count_parameters(small.semantic_decoder) <= 0.3 * count_parameters(net.semantic_decoder)
    plan = channel_plan(net, 0.7, keep=(1.0, 1.0, 0.3))
    deep = [plan[n.name] for n in conv_graph(net) if n.prunable and n.level == 2]
    top = [plan[n.name] for n in conv_graph(net) if n.prunable and n.level == 0]
    assert max(deep) / 16 < min(top) / 4  # deep level thinned more than the top one
    with pytest.raises(ValueError):
        structured_prune(net, 0.999)


def _randomise_bn(net: NucleusNet) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))


@pytest.mark.parametrize("arch,bn", ARCHS)
def test_structured_surgery_is_exact(arch: str, bn: bool, tmp_path: Path) -> None:
    """Filters that contribute nothing (weights, bias, BN shift and mean zero) are removed
    without changing the output: the surgery copies the right slices everywhere."""
    net = _net(arch, bn)
    _randomise_bn(net)
    ratio = 0.75
    counts = channel_plan(net, ratio)
    selection = filter_selection(net, counts)
    modules = dict(net.named_modules())
    dropped_any = 0
    with torch.no_grad():
        for node in conv_graph(net):
            conv = modules[node.name]
            n_out = conv.out_channels
            drop = torch.ones(n_out, dtype=torch.bool)
            drop[selection[node.name]] = False
            dropped_any += int(drop.sum())
            if isinstance(conv, nn.ConvTranspose2d):
                conv.weight[:, drop] = 0
            else:
                conv.weight[drop] = 0
            if conv.bias is not None:
                conv.bias[drop] = 0
            if node.bn:
                modules[node.bn].bias[drop] = 0
                modules[node.bn].running_mean[drop] = 0
    assert dropped_any > 0
    again = filter_selection(net, counts)
    assert all(torch.equal(again[k], selection[k]) for k in selection)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
        small = structured_prune(net, ratio).eval()
        got = small(x)
    assert count_parameters(small) <= (1 - ratio) * count_parameters(net)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    # the smaller net is rebuilt from its checkpoint file alone
    path = checkpoints.save(tmp_path / "slim.pt", small, mpp=0.5, watershed=WatershedParams(),
                            targets=TargetConfig())
    loaded = checkpoints.load(path).net
    assert loaded.config == small.config
    with torch.no_grad():
        for e, g in zip(got, loaded(x)):
            assert torch.equal(e, g)


def test_structured_checkpoint_loads_in_fresh_process(tmp_path: Path) -> None:
    """Nothing but the file (no pruning code, no in-process state) rebuilds the slim net."""
    net = structured_prune(_net("dual", True), 0.8, keep="thin-top").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        logit, dist = net(x)
    path = checkpoints.save(tmp_path / "slim.pt", net, mpp=0.5, watershed=WatershedParams(),
                            targets=TargetConfig())
    torch.save({"x": x, "logit": logit, "dist": dist}, tmp_path / "io.pt")
    script = (
        "import sys, torch\n"
        "from models import checkpoints\n"
        "torch.set_num_threads(1)\n"
        f"bundle = checkpoints.load({str(path)!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    logit, dist = bundle.net(io['x'])\n"
        "assert 'models.pruning' not in sys.modules, 'loading needed the pruning code'\n"
        "assert torch.equal(logit, io['logit']) and torch.equal(dist, io['dist'])\n"
        "print(sum(p.numel() for p in bundle.net.parameters()))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == count_parameters(net)


@pytest.mark.parametrize("arch", ["paper", "dual"])
def test_conv_macs_match_a_traced_count(arch: str) -> None:
    """The analytic MAC count equals the one measured from the real tensor shapes."""
    for net in (_net(arch), structured_prune(_net(arch), 0.7, keep=(1.0, 0.5, 1.0))):
        traced = 0

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            nonlocal traced
            if isinstance(module, nn.ConvTranspose2d):  # one tap per input pixel and pair
                traced += inputs[0][0].numel() * module.weight[0].numel()
            else:
                traced += output[0].numel() * module.weight[0].numel()

        handles = [m.register_forward_hook(hook) for m in net.modules()
                   if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
        with torch.no_grad():
            net(torch.zeros(1, 3, 32, 48))
        for h in handles:
            h.remove()
        assert conv_macs(net, 32, 48) == traced


def test_keep_presets_trade_macs_at_equal_size() -> None:
    net = NucleusNet(NetConfig(arch="dual", widths=(8, 16, 32, 64), batchnorm=True, dropout=0.0))
    slim = {name: structured_prune(net, 0.8, keep=name) for name in KEEP_PRESETS}
    sizes = {name: count_parameters(m) for name, m in slim.items()}
    assert all(size <= 0.2 * count_parameters(net) for size in sizes.values())
    assert max(sizes.values()) > 0.9 * min(sizes.values())  # about the same size ...
    macs = {name: conv_macs(m) for name, m in slim.items()}
    assert macs["thin-top"] < macs["uniform"] < macs["thin-deep"]  # ... different cost
    assert keep_schedule(None, 4) == keep_schedule("uniform", 4) == (1.0,) * 4
    assert keep_schedule("thin-top", 3) == pytest.approx((0.6, 0.8, 1.0))
    with pytest.raises(ValueError):
        keep_schedule("fast", 4)
    with pytest.raises(ValueError):
        keep_schedule((1.0, 0.5), 4)


# ---------------------------------------------------------------- commands


def test_cli_prune(tmp_path: Path, make_annotated_folder) -> None:
    model = save_tiny_checkpoint(tmp_path / "tiny.pt", val_images=["img0"])
    out = tmp_path / "pruned.pt"
    assert main(["--quiet", "prune", "--model", str(model), "--method", "global",
                 "--ratio", "0.8", "--out", str(out)]) == 0
    dense, pruned = checkpoints.load(model), checkpoints.load(out)
    assert pruned.mpp == dense.mpp and pruned.watershed == dense.watershed
    assert pruned.targets == dense.targets
    record = pruned.provenance["pruning"]
    assert record["method"] == "global" and record["ratio"] == 0.8 and record["branch"] == "both"
    assert record["nonzero_after"] < record["nonzero_before"] == record["parameters_before"]
    assert sparsity_report(pruned.net)["prunable_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert pruned.provenance["val_images"] == ["img0"]

    data = make_annotated_folder(n_images=3, size=64)
    slim = tmp_path / "slim.pt"
    assert main(["--quiet", "prune", "--model", str(model), "--method", "structured",
                 "--ratio", "0.6", "--finetune-steps", "1", "--data", str(data),
                 "--batch-size", "2", "--patch-size", "32", "--out", str(slim)]) == 0
    record = checkpoints.load(slim).provenance["pruning"]
    assert record["parameters_after"] <= 0.4 * record["parameters_before"]
    assert record["finetune_steps"] == 1 and record["finetune_data"] == str(data.resolve())
    assert record["macs_512_after"] < 0.5 * record["macs_512_before"]
    fast = tmp_path / "fast.pt"
    assert main(["--quiet", "prune", "--model", str(model), "--method", "structured",
                 "--ratio", "0.6", "--keep", "thin-top", "--out", str(fast)]) == 0
    record = checkpoints.load(fast).provenance["pruning"]
    assert record["keep_preset"] == "thin-top" and len(record["keep_schedule"]) == 3
    with pytest.raises(SystemExit):
        main(["--quiet", "prune", "--model", str(model), "--method", "structured",
              "--ratio", "0.6", "--keep", "fastest", "--out", str(fast)])
    # fine-tuning without data is a usage error
    assert main(["--quiet", "prune", "--model", str(model), "--method", "layerwise",
                 "--ratio", "0.5", "--finetune-steps", "1", "--out", str(slim)]) == 2
    assert main(["--quiet", "prune", "--model", str(model), "--method", "layerwise",
                 "--ratio", "0.5", "--bn-recalibrate", "2", "--out", str(slim)]) == 2
    recal = tmp_path / "recal.pt"
    assert main(["--quiet", "prune", "--model", str(model), "--method", "layerwise",
                 "--ratio", "0.5", "--bn-recalibrate", "2", "--data", str(data),
                 "--batch-size", "2", "--patch-size", "32", "--half", "--out", str(recal)]) == 0
    # the tiny model has no BatchNorm: nothing was re-estimated, and the record says so
    assert checkpoints.load(recal).provenance["pruning"]["bn_recalibration_batches"] == 0


def test_sweep_resumes_and_plots(tmp_path: Path) -> None:
    dense = checkpoints.load(save_tiny_checkpoint(tmp_path / "tiny.pt"))
    calls: list[tuple[float, str]] = []

    def fake(bundle, folder, watershed):
        assert watershed == dense.watershed
        report = sparsity_report(bundle.net)
        calls.append((report["prunable_sparsity"], str(folder)))
        s = 1 - report["prunable_sparsity"]
        return {"dice": s, "aji": s * 0.8, "pq": s * 0.7, "f1": s, "semantic_dice": s,
                "regression_mse": 1 - s}

    out = tmp_path / "sweep"
    kwargs = {"methods": ("layerwise", "global"), "branches": ("semantic", "both"),
              "evaluator": fake, "progress": False}
    sweep(dense, tmp_path, out, ratios=(0.0, 0.5), **kwargs)
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 8 and len(calls) == 5  # ratio 0 (dense) scored once
    both = [r for r in rows if r["branch"] == "both" and r["ratio"] == "0.5"]
    assert all(float(r["sparsity"]) == pytest.approx(0.5, abs=1e-3) for r in both)
    calls.clear()
    sweep(dense, tmp_path, out, ratios=(0.0, 0.5, 0.9), **kwargs)
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 12 and len(calls) == 4  # only the new ratio ran
    assert len({(r["method"], r["branch"], r["ratio"]) for r in rows}) == 12
    png = out / "sweep.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "sweep.md").read_text()
    assert "## semantic_dice" in summary and "## aji" in summary
    assert "| layerwise | 0 | 0 % |" in summary  # the fake loses 50 % at ratio 0.5


def test_tolerated_ratio_stops_at_the_first_failure() -> None:
    from models.pruning.sweep import summarize_sweep, tolerated_ratio

    def rows(values: dict[float, float]) -> list[dict[str, str]]:
        return [{"method": "global", "branch": "both", "ratio": f"{r:g}", "finetune_steps": "0",
                 "aji": str(v), "regression_mse": str(v), "semantic_dice": str(v)}
                for r, v in values.items()]

    # 0.5: -1 % ok; 0.8: -1.99 % ok; 0.9: -3 % fails; 0.95 recovers but does not count
    series = rows({0.0: 0.6, 0.5: 0.594, 0.8: 0.58806, 0.9: 0.582, 0.95: 0.6})
    assert tolerated_ratio(series, "aji", True) == 0.8
    # for an error, the loss is an increase: +1 % ok, +2.5 % fails
    assert tolerated_ratio(rows({0.0: 0.01, 0.5: 0.0101, 0.8: 0.01025}), "regression_mse", False) == 0.5
    assert tolerated_ratio(rows({0.5: 0.6}), "aji", True) is None  # no dense row
    assert "| global | 0 | 80 % |" in summarize_sweep(series)


def test_sweep_structured_rows_and_old_csv_layout(tmp_path: Path) -> None:
    dense = checkpoints.load(save_tiny_checkpoint(tmp_path / "tiny.pt"))

    def fake(bundle, folder, watershed):
        return {"dice": 0.5, "aji": 0.4, "pq": 0.3, "f1": 0.5, "semantic_dice": 0.6,
                "regression_mse": 0.01}

    out = tmp_path / "sweep"
    out.mkdir()
    old_columns = [c for c in CSV_COLUMNS if c != "gmacs_512"]  # a file from before the column
    with open(out / "sweep.csv", "w", newline="") as f:
        csv.writer(f).writerow(old_columns)
    sweep(dense, tmp_path, out, ratios=(0.0, 0.75), methods=("structured",),
          branches=("both",), evaluator=fake, progress=False, keep="thin-top")
    sweep(dense, tmp_path, out, ratios=(0.75,), methods=("structured",),
          branches=("both",), evaluator=fake, progress=False)
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert list(rows[0]) == old_columns
    assert [(r["method"], r["ratio"]) for r in rows] == [
        ("structured[thin-top]", "0"), ("structured[thin-top]", "0.75"), ("structured", "0.75")]
    assert all(float(r["sparsity"]) >= 0.75 for r in rows[1:])
    assert int(rows[1]["parameters"]) <= 0.25 * int(rows[0]["parameters"])


def test_cli_prune_sweep_with_the_real_evaluator(tmp_path: Path, make_annotated_folder) -> None:
    """The command end to end: real network outputs, fixed watershed, scores in the CSV."""
    model = save_tiny_checkpoint(tmp_path / "tiny.pt")
    test = make_annotated_folder("test", n_images=2, size=64)
    out = tmp_path / "sweep"
    args = ["--quiet", "prune-sweep", "--model", str(model), "--data", str(test),
            "--out", str(out), "--ratios", "0,0.9", "--methods", "global",
            "--branches", "semantic,both"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["branch"], r["ratio"]) for r in rows] == [
        ("semantic", "0"), ("semantic", "0.9"), ("both", "0"), ("both", "0.9")]
    for r in rows:
        assert 0.0 <= float(r["semantic_dice"]) <= 1.0 and float(r["regression_mse"]) >= 0.0
        assert 0.0 <= float(r["aji"]) <= 1.0
    assert rows[0]["semantic_dice"] == rows[2]["semantic_dice"]  # dense scored once
    assert rows[1]["regression_mse"] == rows[0]["regression_mse"]  # regression untouched
    assert main(args) == 0  # resume: nothing left to do
    assert len(list(csv.DictReader(open(out / "sweep.csv")))) == 4
    assert (out / "sweep.png").stat().st_size > 0


@pytest.mark.parametrize("arch", ["dual", "paper"])
def test_structured_keeps_both_signs_of_a_head_in_proportion(arch: str) -> None:
    """The conv feeding a head keeps channels that raise and channels that lower its output
    (ReLU inputs: the head weight's sign is the channel's direction), in proportion, even
    when one sign has the weaker filters: ranking by magnitude alone kept only negative
    channels of a trained semantic head, capping its probability at the bias."""
    net = _net(arch, True)
    heads = [m for name, m in net.named_modules() if name.endswith("head")]
    with torch.no_grad():
        for head in heads:
            w = head.weight
            sign = -torch.ones(w.shape[1])
            sign[: w.shape[1] // 4] = 1  # a quarter raise, the rest lower, as in a trained head
            w.copy_(sign.view(1, -1, 1, 1) * (0.2 + torch.rand(w.shape[1])).view(1, -1, 1, 1))
        for name, m in net.named_modules():  # the raising channels have the weakest filters
            if isinstance(m, nn.Conv2d) and any(f"{name}" in n for n in _feeding_heads(net)):
                m.weight[: m.out_channels // 4] *= 0.01
    small = structured_prune(net, 0.8)
    for head in (m for name, m in small.named_modules() if name.endswith("head")):
        w = head.weight.reshape(-1)
        positive, negative = int((w > 0).sum()), int((w < 0).sum())
        assert positive >= 1 and negative >= 1
        assert abs(positive / len(w) - 0.25) <= 1 / len(w) + 1e-9, (positive, negative)  # in proportion


def _feeding_heads(net: NucleusNet) -> list[str]:
    return [n.inputs[0] for n in conv_graph(net) if not n.prunable]
