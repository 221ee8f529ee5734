"""The two-branch nucleus network: a semantic (nucleus vs background) branch and a
deep-regression (distance map) branch, as plain U-Nets (Mahbod et al. 2022).

Every convolution's output width is explicit (``channels``), so that a network whose
filters were removed by structured pruning is rebuilt from its checkpoint config alone.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import NetConfig


def unet_channels(widths: tuple[int, ...]) -> tuple[int, ...]:
    """Output channels of every conv of a U-Net, in module order.

    Encoder: two convs per level; decoder: one transposed conv then two convs per level.
    """
    enc = [w for w in widths for _ in range(2)]
    dec = []
    for w in reversed(widths[:-1]):
        dec += [w, w, w]
    return tuple(enc + dec)


def encoder_channels(widths: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(w for w in widths for _ in range(2))


def decoder_channels(widths: tuple[int, ...]) -> tuple[int, ...]:
    return unet_channels(widths)[2 * len(widths):]


class ConvBlock(nn.Sequential):
    """conv3x3 -> (BN) -> ReLU -> dropout -> conv3x3 -> (BN) -> ReLU."""

    def __init__(self, cin: int, c1: int, c2: int, batchnorm: bool, dropout: float):
        layers: list[nn.Module] = [nn.Conv2d(cin, c1, 3, padding=1, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(c1))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers.append(nn.Conv2d(c1, c2, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(c2))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Encoder(nn.Module):
    def __init__(self, cin: int, channels: tuple[int, ...], batchnorm: bool, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList()
        for level in range(len(channels) // 2):
            c1, c2 = channels[2 * level], channels[2 * level + 1]
            self.blocks.append(ConvBlock(cin, c1, c2, batchnorm, dropout))
            cin = c2
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for level, block in enumerate(self.blocks):
            if level:
                x = self.pool(x)
            x = block(x)
            feats.append(x)
        return feats


def _block_out(block: nn.Sequential) -> int:
    convs = [m for m in block if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


class Decoder(nn.Module):
    """Upsampling path with concatenated skips and a 1x1 head."""

    def __init__(self, skips: list[int], channels: tuple[int, ...], batchnorm: bool,
                 dropout: float):
        super().__init__()
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        cin = skips[-1]
        for i, skip in enumerate(reversed(skips[:-1])):
            cu, c1, c2 = channels[3 * i: 3 * i + 3]
            self.ups.append(nn.ConvTranspose2d(cin, cu, 2, stride=2))
            self.blocks.append(ConvBlock(cu + skip, c1, c2, batchnorm, dropout))
            cin = c2
        self.head = nn.Conv2d(cin, 1, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(feats[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class UNet(nn.Module):
    """Plain U-Net with a single-channel output (logit or distance)."""

    def __init__(self, cin: int, channels: tuple[int, ...], depth: int, batchnorm: bool,
                 dropout: float):
        super().__init__()
        self.encoder = Encoder(cin, channels[: 2 * depth], batchnorm, dropout)
        skips = [_block_out(b) for b in self.encoder.blocks]
        self.decoder = Decoder(skips, channels[2 * depth:], batchnorm, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class NucleusNet(nn.Module):
    """Both branches behind one forward: returns (nucleus logit, distance map).

    Input: float RGB in [0, 1], shape (N, 3, H, W) with H, W multiples of
    ``config.size_multiple``. ``semantic`` and ``regression`` are separate submodules
    (``paper``) so that each branch can be pruned and evaluated on its own.
    """

    def __init__(self, config: NetConfig):
        super().__init__()
        self.config = config
        d, bn, p = config.depth, config.batchnorm, config.dropout
        if config.arch == "paper":
            self.semantic = UNet(config.in_channels,
                                 config.semantic_channels or unet_channels(config.widths),
                                 d, bn, p)
            self.regression = UNet(config.in_channels,
                                   config.regression_channels or unet_channels(config.widths),
                                   d, bn, p)
        elif config.arch == "dual":
            enc = config.encoder_channels or encoder_channels(config.widths)
            self.encoder = Encoder(config.in_channels, enc, bn, p)
            skips = [_block_out(b) for b in self.encoder.blocks]
            dec = decoder_channels(config.widths)
            self.semantic_decoder = Decoder(skips, config.semantic_channels or dec, bn, p)
            self.regression_decoder = Decoder(skips, config.regression_channels or dec, bn, p)
        else:
            raise ValueError(f"unknown architecture {config.arch!r}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.arch == "paper":
            return self.semantic(x), self.regression(x)
        feats = self.encoder(x)
        return self.semantic_decoder(feats), self.regression_decoder(feats)

    def branch_modules(self, branch: str) -> list[nn.Module]:
        """Modules holding the weights of a branch: ``semantic``, ``regression`` or
        ``both``. For ``dual`` the shared encoder belongs to both branches."""
        if self.config.arch == "paper":
            parts = {"semantic": [self.semantic], "regression": [self.regression]}
        else:
            parts = {"semantic": [self.semantic_decoder],
                     "regression": [self.regression_decoder]}
            if branch == "both":
                return [self.encoder, self.semantic_decoder, self.regression_decoder]
        if branch == "both":
            return parts["semantic"] + parts["regression"]
        if branch not in parts:
            raise ValueError(f"branch must be semantic, regression or both, not {branch!r}")
        return parts[branch]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
