"""Unstructured magnitude pruning (Mahbod et al. 2022): layer-wise and network-wide.

What is prunable: the kernels of every 3x3 convolution and 2x2 transposed convolution of
the selected branch (``NucleusNet.branch_modules``). Biases and BatchNorm parameters are
never pruned (they are few and set the operating point of each channel), and the 1x1
output heads are **excluded**: a head holds only ``C`` weights that map the last feature
map to the one output, so pruning it saves nothing and would decide the output alone
(method.md §5 notes that the head is "often excluded"; we follow that).

Masks are dictionaries ``{conv module name: bool tensor of the weight's shape}`` with
``True`` = kept. Ties in ``|w|`` are broken by flat index (stable sort), so a given network
and sparsity always give the same masks. Pruning writes zeros into the weights (no
forward hooks, no ``torch.nn.utils.prune`` reparametrisation) so that a saved pruned net
is an ordinary state dict which :func:`models.checkpoints.save` packs sparse.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models.network import Decoder, NucleusNet

log = logging.getLogger(__name__)

Masks = dict[str, torch.Tensor]
BRANCHES = ("semantic", "regression", "both")


def prunable_layers(net: NucleusNet, branch: str = "both") -> dict[str, nn.Module]:
    """Conv and transposed-conv modules of a branch (heads excluded), by qualified name,
    in module order. For ``dual``, the shared encoder belongs to ``both`` only."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {', '.join(BRANCHES)}, not {branch!r}")
    heads = {id(m.head) for m in net.modules() if isinstance(m, Decoder)}
    in_scope = {id(m) for root in net.branch_modules(branch) for m in root.modules()}
    return {name: m for name, m in net.named_modules()
            if id(m) in in_scope and isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
            and id(m) not in heads}


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], not {sparsity}")


def _keep_mask(magnitudes: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Bool mask (flat) keeping all but the ``n_prune`` smallest entries; ties by index."""
    order = torch.argsort(magnitudes, stable=True)
    keep = torch.ones(magnitudes.numel(), dtype=torch.bool)
    keep[order[:n_prune]] = False
    return keep


def layerwise_masks(modules: Mapping[str, nn.Module], sparsity: float) -> Masks:
    """Every layer loses exactly ``round(sparsity * n_layer)`` of its smallest |w|."""
    _check_sparsity(sparsity)
    masks = {}
    for name, module in modules.items():
        w = module.weight.detach()
        keep = _keep_mask(w.abs().flatten().cpu(), round(sparsity * w.numel()))
        masks[name] = keep.reshape(w.shape)
    return masks


def global_masks(modules: Mapping[str, nn.Module], sparsity: float) -> Masks:
    """One magnitude threshold over all layers: exactly ``round(sparsity * N)`` of the
    ``N`` prunable weights are removed; per-layer sparsities come out uneven (the wide,
    deep layers with small weights lose most)."""
    _check_sparsity(sparsity)
    weights = [m.weight.detach().cpu() for m in modules.values()]
    if not weights:
        return {}
    flat = torch.cat([w.abs().flatten() for w in weights])
    keep = _keep_mask(flat, round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, w in zip(modules, weights):
        masks[name] = keep[start:start + w.numel()].reshape(w.shape)
        start += w.numel()
    return masks


def magnitude_masks(net: NucleusNet, method: str, sparsity: float, branch: str = "both") -> Masks:
    """Masks of ``method`` (``layerwise`` or ``global``) for one branch of ``net``."""
    layers = prunable_layers(net, branch)
    if method == "layerwise":
        return layerwise_masks(layers, sparsity)
    if method == "global":
        return global_masks(layers, sparsity)
    raise ValueError(f"unstructured method must be layerwise or global, not {method!r}")


def apply_masks(net: nn.Module, masks: Masks) -> None:
    """Zero the pruned weights in place (plain zeros: nothing attached to the module)."""
    modules = dict(net.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            weight = modules[name].weight
            weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


def mask_gradients(net: nn.Module, masks: Masks) -> None:
    """Zero the gradients of pruned weights, so that optimizer moments stay zero there
    and a fine-tuning step cannot move them (they are re-masked after the step too)."""
    modules = dict(net.named_modules())
    for name, mask in masks.items():
        grad = modules[name].weight.grad
        if grad is not None:
            grad.mul_(mask.to(device=grad.device, dtype=grad.dtype))


def sparsity_report(net: NucleusNet, branch: str = "both") -> dict[str, Any]:
    """Per-layer rows (prunable layers of ``branch``) and totals, counted from the
    weights themselves: what is actually zero, whatever produced it."""
    rows = []
    for name, module in prunable_layers(net, branch).items():
        w = module.weight.detach()
        nonzero = int(torch.count_nonzero(w))
        rows.append({"layer": name, "kind": type(module).__name__, "shape": list(w.shape),
                     "weights": w.numel(), "nonzero": nonzero,
                     "sparsity": 1.0 - nonzero / max(w.numel(), 1)})
    prunable = sum(r["weights"] for r in rows)
    prunable_nonzero = sum(r["nonzero"] for r in rows)
    params = list(net.parameters())
    return {"branch": branch, "layers": rows, "prunable_weights": prunable,
            "prunable_nonzero": prunable_nonzero,
            "prunable_sparsity": 1.0 - prunable_nonzero / max(prunable, 1),
            "parameters": sum(p.numel() for p in params),
            "nonzero_parameters": sum(int(torch.count_nonzero(p.detach())) for p in params)}
