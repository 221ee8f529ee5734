"""Running the network on pixels: the one definition of "model output" that whole-image
evaluation and tiled slide inference share.

The canonical output for an image is the network run on the image reflect-padded by
:func:`context_margin` pixels on every side. Any window whose pixels lie farther than
``config.context_radius`` from its edge, and whose origin is aligned to
``config.size_multiple`` in the same padded frame, sees exactly the same input in its
receptive field, so tiled results can equal whole-image results.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from models.config import NetConfig
from models.network import NucleusNet


def context_margin(config: NetConfig) -> int:
    """Receptive-field radius rounded up to the pooling grid."""
    m = config.size_multiple
    return -(-config.context_radius // m) * m


def fold_batchnorm(net: NucleusNet) -> NucleusNet:
    """An inference copy of ``net`` with every BatchNorm folded into the conv before it.

    Why: in eval mode a BatchNorm is an affine map per channel, so it can live in the
    conv's weights and bias; the CPU then skips one pass over every feature map (~19 % of
    the pruned network's time in a profile). Outputs equal the unfolded network's to float
    rounding (``docs/design.md``). ``net`` is untouched; the copy is for inference only
    (no BatchNorm left to train or re-estimate).
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(net).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                folded = fuse_conv_bn_eval(conv, bn)
                conv.weight, conv.bias = folded.weight, folded.bias
                setattr(module, bn_name, nn.Identity())
    return fused


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory in the heap for reuse (``mallopt``: no mmap per large
    block, no trimming); False where that is not possible (not glibc). Process-wide, once.

    Why: eager torch allocates every activation map afresh; with glibc's defaults each one
    above the mmap threshold is a new mmap, so every forward pass page-faults its whole
    working set (~200k minor faults, ~30 % of ``pruned80.pt``'s time at 1376^2, as system
    time; ``bench.runtime_speed --malloc retain``: ~1.5x faster with identical outputs).
    The same as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment,
    but it also works in a process that has already started. Cost: the process keeps its
    peak RSS (a worker's peak is one tile's working set anyway).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, most = -1, -3, 2**31 - 1
    return bool(libc.mallopt(m_trim_threshold, most)) and bool(libc.mallopt(m_mmap_threshold, most))


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    return torch.device(device)


def predict_batch(net: NucleusNet, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Network outputs for uint8 windows (N, H, W, 3), H and W multiples of
    ``size_multiple``: nucleus probability and distance map, float32 (N, H, W)."""
    m = net.config.size_multiple
    if images.shape[1] % m or images.shape[2] % m:
        raise ValueError(f"window {images.shape[1:3]} is not a multiple of {m}")
    device = next(net.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if device.type == "cpu":  # oneDNN NHWC convolutions: 1.4-1.7x faster here (bench.model_speed)
        x = x.contiguous(memory_format=torch.channels_last)
        use_channels_last(net)
    with torch.inference_mode():
        logit, dist = net(x)
        prob = torch.sigmoid(logit)
    return prob[:, 0].cpu().numpy(), dist[:, 0].cpu().numpy()


def use_channels_last(net: NucleusNet) -> None:
    """Store the conv weights channels-last (once; in place, the same parameters), so that
    every convolution of the CPU forward pass runs in NHWC."""
    weight = next((p for p in net.parameters() if p.dim() == 4), None)
    if weight is not None and not weight.is_contiguous(memory_format=torch.channels_last):
        net.to(memory_format=torch.channels_last)


def predict_image(net: NucleusNet, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical whole-image output (probability, distance) for an RGB uint8 image."""
    margin = context_margin(net.config)
    m = net.config.size_multiple
    h, w = image.shape[:2]
    extra_h = -(h + 2 * margin) % m
    extra_w = -(w + 2 * margin) % m
    padded = reflect_pad(image, ((margin, margin + extra_h), (margin, margin + extra_w)))
    prob, dist = predict_batch(net, padded[None])
    return prob[0, margin:margin + h, margin:margin + w], dist[0, margin:margin + h, margin:margin + w]


def reflect_pad(image: np.ndarray, pads: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """Mirror padding without repeating the edge pixel (numpy ``reflect``)."""
    extra = ((0, 0),) * (image.ndim - 2)
    return np.pad(image, tuple(pads) + extra, mode="reflect")
