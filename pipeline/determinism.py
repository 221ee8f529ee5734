"""Deterministic CUDA numerics, so that tiled inference on a GPU can equal whole-image inference.

Exact stitching (``docs/design.md``) needs every pixel's network output to be the same
whatever window it is computed in. On the CPU that holds as measured (``tests/test_run.py``).
On CUDA two settings break it by default: TF32 (Ampere and later GPUs multiply float32 in
convolutions with a 10-bit mantissa, and PyTorch allows it for cuDNN by default) and cuDNN's
benchmark mode (which times several algorithms per input shape and keeps the fastest, so two
window shapes, or two runs, may sum in a different order). This module turns both off and
asks cuDNN for deterministic algorithms.

``WSI_NUCLEI_CUDA_DETERMINISTIC=0`` in the environment (workers inherit it; SLURM jobs get
it through ``sbatch``'s default ``--export=ALL`` or the job prologue) leaves PyTorch's own
settings alone: faster on recent GPUs, but tiled results may then differ from whole-image
results for pixels near a threshold. Only torch is imported here, so ``bench/gpu_check.py``
can use it on a machine without Dask.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)

ENV_VAR = "WSI_NUCLEI_CUDA_DETERMINISTIC"
_OFF = ("0", "false", "no", "off")


def deterministic_wanted(environ: Mapping[str, str] | None = None) -> bool:
    """True unless ``WSI_NUCLEI_CUDA_DETERMINISTIC`` says 0/false/no/off."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "1")
    return value.strip().lower() not in _OFF


def pin_cuda_numerics(device: torch.device | str, deterministic: bool | None = None) -> bool:
    """On a CUDA ``device``: no TF32, no cuDNN benchmark, deterministic cuDNN algorithms.

    Process-wide flags (they apply to every CUDA computation of this process), set before
    the first forward pass. ``deterministic=None`` reads :func:`deterministic_wanted`.
    Nothing is touched for other devices. Returns whether the flags were set.
    """
    if torch.device(device).type != "cuda":
        return False
    if deterministic is None:
        deterministic = deterministic_wanted()
    if not deterministic:
        log.info("%s=0: PyTorch's CUDA defaults kept (TF32 convolutions, no determinism); "
                 "tiled results may differ from whole-image results", ENV_VAR)
        return False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return True


def cuda_flags() -> dict[str, bool]:
    """The flags :func:`pin_cuda_numerics` sets, as they are now (for reports)."""
    return {"cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cudnn.benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn.deterministic": bool(torch.backends.cudnn.deterministic)}
