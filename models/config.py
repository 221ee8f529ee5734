"""Configuration of the nucleus model: architecture, targets and post-processing.

All configs are frozen dataclasses so that they can be stored verbatim in a checkpoint
(``dataclasses.asdict``) and rebuilt from it without any code outside this package.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Architecture = Literal["paper", "dual"]
# (batchnorm, dropout) of each architecture when not given
ARCH_DEFAULTS: dict[str, tuple[bool, float]] = {"paper": (False, 0.1), "dual": (True, 0.0)}
DistanceNorm = Literal["per_nucleus", "per_image"]


@dataclass(frozen=True)
class NetConfig:
    """Architecture of the two-branch network.

    ``paper``: two independent plain U-Nets (semantic + regression) as in Mahbod et al.
    ``dual``: one shared encoder with a semantic and a regression decoder (the authors'
    later dual-decoder U-Net), which costs about 3/4 of ``paper`` per pixel.
    ``widths`` may be overridden per conv after structured pruning (``*_channels``), so
    that a physically smaller network can be rebuilt from its checkpoint alone.
    """

    arch: Architecture = "paper"
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    batchnorm: bool = ARCH_DEFAULTS["paper"][0]
    dropout: float = ARCH_DEFAULTS["paper"][1]
    in_channels: int = 3
    # Per-conv channel counts after structured pruning; None = derived from ``widths``.
    semantic_channels: tuple[int, ...] | None = None
    regression_channels: tuple[int, ...] | None = None
    encoder_channels: tuple[int, ...] | None = None

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def size_multiple(self) -> int:
        """Input height/width must be a multiple of this (one 2x pooling per level)."""
        return 2 ** (self.depth - 1)

    @property
    def context_radius(self) -> int:
        """Half-width (px) of the receptive field: outputs farther than this from a
        window edge do not depend on how the window was padded."""
        radius = 0
        for level in range(self.depth):
            convs = 2 if level == self.depth - 1 else 4  # encoder + decoder pairs
            radius += convs * 2**level
        # pooling/upsampling alignment adds less than one cell of the coarsest level
        radius += 2 ** (self.depth - 1) - 1
        return radius

    @classmethod
    def for_arch(cls, arch: Architecture, widths: tuple[int, ...],
                 batchnorm: bool | None = None, dropout: float | None = None) -> NetConfig:
        """A config with the defaults that serve each architecture, unless overridden:
        ``paper`` as the authors built it (no batch-norm, dropout 0.1 between the two convs
        of a block), ``dual`` as shipped (batch-norm, no dropout)."""
        bn_default, dropout_default = ARCH_DEFAULTS[arch]
        return cls(arch=arch, widths=tuple(widths),
                   batchnorm=bn_default if batchnorm is None else batchnorm,
                   dropout=dropout_default if dropout is None else dropout)


@dataclass(frozen=True)
class TargetConfig:
    """How the regression target (distance map) is built from instance labels."""

    distance_norm: DistanceNorm = "per_nucleus"


@dataclass(frozen=True)
class WatershedParams:
    """Marker-controlled watershed that turns (probability, distance) into instances.

    Tuned on a validation split of the training images, never on test images, and then
    kept fixed (e.g. across pruning ratios) so that post-processing does not hide effects.
    """

    fg_threshold: float = 0.5
    marker_threshold: float = 0.5
    min_marker_size: int = 4
    min_size: int = 30

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentations (``models.augment``); 0 / False switches one off, so that each
    can be measured by ablation. Defaults: what the multi-dataset models are trained with."""

    stain: float = 0.15  # HED optical densities scaled by 1 +- stain, shifted by +- 0.05 stain
    hue: float = 0.04  # hue shift (fraction of the colour circle)
    saturation: float = 0.25  # saturation scaled by 1 +- saturation
    brightness: float = 0.08  # contrast gain 1 +- b, brightness shift +- b/2 of full scale
    scale: float = 0.2  # random rescale by 1 +- scale
    rotate: bool = True  # any angle (flips and right angles are always drawn)
    shear: float = 0.1  # shear factor
    blur: float = 0.3  # chance of a Gaussian blur
    jpeg: float = 0.3  # chance of JPEG re-compression

    @classmethod
    def legacy(cls, jitter: float) -> AugmentConfig:
        """The augmentation of the models trained before multi-dataset training: HED and
        brightness/contrast jitter of one strength, nothing else."""
        return cls(stain=jitter, hue=0.0, saturation=0.0, brightness=jitter, scale=0.0,
                   rotate=False, shear=0.0, blur=0.0, jpeg=0.0)


@dataclass(frozen=True)
class TrainConfig:
    """Training schedule; every field is recorded in the checkpoint's provenance."""

    patch_size: int = 256
    batch_size: int = 8
    steps: int = 6000
    lr: float = 1e-3
    weight_decay: float = 1e-5
    val_fraction: float = 0.2
    val_every: int = 500
    checkpoint_every: int = 250
    seed: int = 0
    downsample: int = 1
    color_jitter: float = 0.08  # the legacy augmentation's strength, used when augment is None
    augment: AugmentConfig | None = None
    threads: int = 0
    # knowledge distillation: targets become (1 - distill) * truth + distill * teacher output
    teacher: str | None = None
    distill: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):  # read back from a checkpoint's JSON-like record
            object.__setattr__(self, "augment", from_dict(AugmentConfig, self.augment))

    @property
    def augmentation(self) -> AugmentConfig:
        return self.augment if self.augment is not None else AugmentConfig.legacy(self.color_jitter)


def from_dict(cls: type, data: dict[str, Any]):
    """Rebuild a config dataclass, turning JSON lists back into tuples and ignoring
    unknown keys (so that older checkpoints keep loading after a field is added)."""
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)
