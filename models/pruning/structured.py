"""Structured (filter) pruning: a physically smaller NucleusNet, hence a real CPU speed-up.

Zeros in dense kernels (unstructured pruning) save no time in oneDNN / cuDNN convolutions;
removing whole output filters shrinks every tensor the network computes.

Why hand-written surgery instead of a dependency-graph library (torch-pruning/DepGraph):
the model family is fixed and small (plain U-Nets, or one encoder with two decoders), its
channel dependencies are few and known exactly, and the result must be rebuilt from the
checkpoint config alone (``NetConfig.*_channels``) with no extra package at load time.
The dependencies handled here:

* a conv's output channels feed its BatchNorm (which shrinks with it) and its consumers;
* an encoder level's second conv feeds the next level's first conv (through max-pooling,
  channel-wise) *and*, as the skip, the input slice ``[cu, cu + skip)`` of the first conv
  of the decoder block at that level; for ``dual`` that skip feeds *both* decoders;
* a transposed conv's output feeds the input slice ``[0, cu)`` of the same first conv
  (concatenation order ``[up, skip]``);
* a decoder block's second conv feeds the next transposed conv (its weight's dim 0) or
  the 1x1 head.

There are no residual additions, so every conv's filters can be chosen independently
(no coupled channel groups). Filters are ranked by the L1 norm of their kernel, times
``|gamma|`` of the following BatchNorm when there is one (network-slimming criterion:
a channel whose BN scale is ~0 carries nothing whatever its kernel). The heads keep
their single output.

Size is set by parameters: every conv in scope keeps ``max(2, round(k * s_level * c))``
of its ``c`` filters, with ``s_level`` an optional per-level schedule (default 1) and
``k`` the largest factor (bisection) for which at least ``ratio`` of the scope's
parameters are removed; for a uniform schedule ``k ~ sqrt(1 - ratio)`` because conv
parameters scale with in x out channels (k ~ 0.45 for 80 %).

The schedule decides where the cut falls, and so the speed-up at a given size: the
parameters sit in the deep, low-resolution levels but the multiply-accumulates (MACs)
in the high-resolution ones (method.md §2.2). Named presets (:data:`KEEP_PRESETS`,
linear in the level from the top to the deepest level): ``uniform``; ``thin-top``
(high-resolution levels thinner: fewest MACs for the size); ``thin-deep`` (keeps the
high-resolution capacity, the most MACs). :func:`conv_macs` counts them. For the 16..256
``dual`` net with BN at 80 % of the parameters removed (2.71 M -> 0.54 M), one 512 x 512
tile costs 19.9 GMAC dense, 3.9 uniform, 2.9 thin-top, 7.0 thin-deep; measured on one CPU
thread side by side: 0.25x, 0.22x and 0.59x of the dense time (activation-bound work such
as BN/ReLU/pooling scales with k, not k^2, so time falls less than MACs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from models.network import ConvBlock, Decoder, Encoder, NucleusNet, count_parameters
from models.pruning.unstructured import BRANCHES

log = logging.getLogger(__name__)

MIN_CHANNELS = 2
# relative keep factor at the top (full-resolution) level and at the deepest level
KEEP_PRESETS: dict[str, tuple[float, float]] = {
    "uniform": (1.0, 1.0),
    "thin-top": (0.6, 1.0),
    "thin-deep": (1.0, 0.5),
}
Keep = str | Sequence[float] | None


@dataclass(frozen=True)
class ConvNode:
    """One conv of the channel graph.

    ``inputs``: what its input channels are, in concatenation order: the names of the
    producing convs, or an int for a fixed number of channels (the RGB image).
    ``level``: U-Net level (0 = full resolution) of the conv's output.
    """

    name: str
    bn: str | None
    inputs: tuple[str | int, ...]
    level: int
    prunable: bool


def _block_nodes(prefix: str, block: ConvBlock, first_inputs: tuple[str | int, ...],
                 level: int) -> list[ConvNode]:
    children = list(block.named_children())
    nodes: list[ConvNode] = []
    inputs = first_inputs
    for i, (idx, module) in enumerate(children):
        if isinstance(module, nn.Conv2d):
            following = children[i + 1][1] if i + 1 < len(children) else None
            bn = f"{prefix}.{children[i + 1][0]}" if isinstance(following, nn.BatchNorm2d) else None
            nodes.append(ConvNode(f"{prefix}.{idx}", bn, inputs, level, True))
            inputs = (f"{prefix}.{idx}",)
    return nodes


def _encoder_nodes(prefix: str, encoder: Encoder, in_channels: int) -> list[ConvNode]:
    nodes: list[ConvNode] = []
    inputs: tuple[str | int, ...] = (in_channels,)
    for level, block in enumerate(encoder.blocks):
        nodes += _block_nodes(f"{prefix}.blocks.{level}", block, inputs, level)
        inputs = (nodes[-1].name,)
    return nodes


def _decoder_nodes(prefix: str, decoder: Decoder, skips: list[str]) -> list[ConvNode]:
    nodes: list[ConvNode] = []
    previous = skips[-1]
    depth = len(skips)
    for i, block in enumerate(decoder.blocks):
        level = depth - 2 - i
        up = ConvNode(f"{prefix}.ups.{i}", None, (previous,), level, True)
        nodes.append(up)
        nodes += _block_nodes(f"{prefix}.blocks.{i}", block, (up.name, skips[level]), level)
        previous = nodes[-1].name
    nodes.append(ConvNode(f"{prefix}.head", None, (previous,), 0, False))
    return nodes


def conv_graph(net: NucleusNet) -> list[ConvNode]:
    """Every conv of ``net`` (module order) with the convs producing its input."""
    cin = net.config.in_channels
    if net.config.arch == "paper":
        nodes: list[ConvNode] = []
        for branch in ("semantic", "regression"):
            unet = getattr(net, branch)
            enc = _encoder_nodes(f"{branch}.encoder", unet.encoder, cin)
            skips = [n.name for n in enc[1::2]]
            nodes += enc + _decoder_nodes(f"{branch}.decoder", unet.decoder, skips)
        return nodes
    enc = _encoder_nodes("encoder", net.encoder, cin)
    skips = [n.name for n in enc[1::2]]
    return (enc + _decoder_nodes("semantic_decoder", net.semantic_decoder, skips)
            + _decoder_nodes("regression_decoder", net.regression_decoder, skips))


def _out_channels(module: nn.Module) -> int:
    return module.out_channels


def _filter_scores(module: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    """L1 norm of every output filter (times |gamma| of the following BN)."""
    w = module.weight.detach().abs()
    dims = (0, 2, 3) if isinstance(module, nn.ConvTranspose2d) else (1, 2, 3)
    score = w.sum(dim=dims)
    if bn is not None and bn.weight is not None:
        score = score * bn.weight.detach().abs()
    return score.cpu()


def _scope(net: NucleusNet, branch: str) -> set[str]:
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {', '.join(BRANCHES)}, not {branch!r}")
    ids = {id(m) for root in net.branch_modules(branch) for m in root.modules()}
    return {name for name, m in net.named_modules() if id(m) in ids}


def _channels_config(net: NucleusNet, counts: dict[str, int]):
    """A NetConfig whose explicit per-conv channels are ``counts`` (heads excluded)."""
    nodes = [n for n in conv_graph(net) if n.prunable]

    def seq(prefixes: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(counts[n.name] for n in nodes if n.name.startswith(prefixes))

    cfg = net.config
    if cfg.arch == "paper":
        return replace(cfg, semantic_channels=seq(("semantic.",)),
                       regression_channels=seq(("regression.",)))
    return replace(cfg, encoder_channels=seq(("encoder.",)),
                   semantic_channels=seq(("semantic_decoder.",)),
                   regression_channels=seq(("regression_decoder.",)))


def _scope_parameters(net: NucleusNet, branch: str) -> int:
    return sum(count_parameters(m) for m in net.branch_modules(branch))


def _meta_net(config) -> NucleusNet:
    with torch.device("meta"):
        return NucleusNet(config)


def keep_schedule(keep: Keep, depth: int) -> tuple[float, ...]:
    """Per-level relative keep factors from a preset name, explicit factors or None
    (uniform)."""
    if keep is None:
        keep = "uniform"
    if isinstance(keep, str):
        if keep not in KEEP_PRESETS:
            raise ValueError(f"keep schedule must be one of {', '.join(KEEP_PRESETS)} or "
                             f"{depth} numbers, not {keep!r}")
        top, deep = KEEP_PRESETS[keep]
        return tuple(top + (deep - top) * level / max(depth - 1, 1) for level in range(depth))
    schedule = tuple(float(s) for s in keep)
    if len(schedule) != depth or min(schedule) <= 0:
        raise ValueError(f"keep schedule needs {depth} positive per-level factors, got {keep}")
    return schedule


def conv_macs(net: NucleusNet, height: int = 512, width: int = 512) -> int:
    """Multiply-accumulates of all convolutions (heads included) for one ``height x
    width`` input: what a dense CPU kernel computes, zeros or not. BN, ReLU and pooling
    are a few operations per activation and left out."""
    modules = dict(net.named_modules())
    total = 0
    for node in conv_graph(net):
        module = modules[node.name]
        pixels = (height // 2**node.level) * (width // 2**node.level)
        taps = module.weight.numel()
        if isinstance(module, nn.ConvTranspose2d):
            # stride == kernel: every output pixel receives one tap per (in, out) pair
            taps //= module.kernel_size[0] * module.kernel_size[1]
        total += pixels * taps
    return total


def channel_plan(net: NucleusNet, ratio: float, keep: Keep = None,
                 branch: str = "both") -> dict[str, int]:
    """Output channels of every conv after pruning ``ratio`` of the parameters of
    ``branch``; ``keep`` is a per-level relative schedule, a preset name of
    :data:`KEEP_PRESETS` or factors such as ``(1, 1, 1, 0.7, 0.5)`` (deep levels thinner);
    the global factor is found by bisection."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"structured ratio must be in [0, 1), not {ratio}")
    schedule = keep_schedule(keep, net.config.depth)
    modules = dict(net.named_modules())
    scope = _scope(net, branch)
    nodes = conv_graph(net)
    current = {n.name: _out_channels(modules[n.name]) for n in nodes}

    def counts(k: float) -> dict[str, int]:
        out = dict(current)
        for n in nodes:
            if n.prunable and n.name in scope:
                c = current[n.name]
                out[n.name] = min(c, max(MIN_CHANNELS, round(k * schedule[n.level] * c)))
        return out

    def size(k: float) -> int:
        return _scope_parameters(_meta_net(_channels_config(net, counts(k))), branch)

    budget = (1.0 - ratio) * _scope_parameters(net, branch)
    if size(1.0) <= budget:
        return counts(1.0)
    if size(0.0) > budget:
        raise ValueError(f"cannot remove {ratio:.1%} of the parameters with at least "
                         f"{MIN_CHANNELS} channels per conv")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if size(mid) <= budget:
            lo = mid
        else:
            hi = mid
    log.debug("structured: keep factor %.4f for ratio %.3f", lo, ratio)
    return counts(lo)


def filter_selection(net: NucleusNet, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Indices (ascending) of the surviving filters of every conv: the ``counts[name]``
    highest-scoring ones (ties: lower index first).

    A conv that feeds a 1x1 head (one output: the nucleus logit or the distance) keeps
    its channels of each sign of the head's weight in proportion, each sign ranked by
    score. Its outputs are ReLUs (>= 0), so the sign of a channel's head weight decides
    whether it raises or lowers the output; ranking by magnitude alone once kept only
    the ten negative channels of the semantic head (60 % cut of ``dual``): no pixel could
    pass probability 0.51, and distillation had to turn weights through zero to recover.
    """
    modules = dict(net.named_modules())
    heads = {n.inputs[0]: modules[n.name] for n in conv_graph(net) if not n.prunable}
    selection = {}
    for n in conv_graph(net):
        module = modules[n.name]
        c = _out_channels(module)
        if counts[n.name] >= c:
            selection[n.name] = torch.arange(c)
            continue
        score = _filter_scores(module, modules[n.bn] if n.bn else None)
        head = heads.get(n.name)
        if head is None:
            order = torch.argsort(-score, stable=True)
            selection[n.name] = torch.sort(order[: counts[n.name]]).values
            continue
        selection[n.name] = _by_sign(score, head.weight.detach().reshape(-1).cpu(), counts[n.name])
    return selection


def _by_sign(score: torch.Tensor, weight: torch.Tensor, keep: int) -> torch.Tensor:
    """``keep`` channels, the best-scoring of each sign of ``weight``, the signs kept in
    proportion (at least one of each sign present)."""
    groups = [torch.nonzero(weight > 0).reshape(-1), torch.nonzero(weight <= 0).reshape(-1)]
    groups = [g for g in groups if len(g)]
    share = [max(1, round(keep * len(g) / len(weight))) for g in groups]
    share[-1] = keep - sum(share[:-1])
    kept = [g[torch.argsort(-score[g], stable=True)[:k]] for g, k in zip(groups, share)]
    return torch.sort(torch.cat(kept)).values


def _input_index(node: ConvNode, selection: dict[str, torch.Tensor],
                 widths: dict[str, int]) -> torch.Tensor:
    parts, offset = [], 0
    for source in node.inputs:
        if isinstance(source, int):
            parts.append(torch.arange(source) + offset)
            offset += source
        else:
            parts.append(selection[source] + offset)
            offset += widths[source]
    return torch.cat(parts)


def shrink(net: NucleusNet, selection: dict[str, torch.Tensor]) -> NucleusNet:
    """A new NucleusNet keeping the selected filters of every conv, weights copied."""
    old = dict(net.named_modules())
    nodes = conv_graph(net)
    widths = {n.name: _out_channels(old[n.name]) for n in nodes}
    config = _channels_config(net, {k: len(v) for k, v in selection.items()})
    small = NucleusNet(config)
    new = dict(small.named_modules())
    with torch.no_grad():
        for node in nodes:
            src, dst = old[node.name], new[node.name]
            out_idx = selection[node.name]
            in_idx = _input_index(node, selection, widths)
            out_dim, in_dim = (1, 0) if isinstance(src, nn.ConvTranspose2d) else (0, 1)
            w = src.weight.detach().index_select(out_dim, out_idx).index_select(in_dim, in_idx)
            dst.weight.copy_(w)
            if src.bias is not None:
                dst.bias.copy_(src.bias.detach()[out_idx])
            if node.bn:
                bsrc, bdst = old[node.bn], new[node.bn]
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bdst, key).copy_(getattr(bsrc, key).detach()[out_idx])
                bdst.num_batches_tracked.copy_(bsrc.num_batches_tracked)
    small.train(net.training)
    return small


def structured_prune(net: NucleusNet, ratio: float, keep: Keep = None,
                     branch: str = "both") -> NucleusNet:
    """A new, physically smaller NucleusNet with at least ``ratio`` of the parameters of
    ``branch`` removed; its config carries explicit per-conv channels, so that
    :func:`models.checkpoints.load` rebuilds it from the file alone. ``net`` is untouched."""
    counts = channel_plan(net, ratio, keep, branch)
    small = shrink(net, filter_selection(net, counts))
    before, after = _scope_parameters(net, branch), _scope_parameters(small, branch)
    log.info("structured %s: %d -> %d parameters (%.1f%% removed)", branch, before, after,
             100 * (1 - after / max(before, 1)))
    return small
