"""The CPU runtime a checkpoint's network runs on: eager PyTorch, or OpenVINO when an
OpenVINO model of that checkpoint lies beside it and OpenVINO is installed.

Why: on this project's CPUs the shipped INT8 OpenVINO model of ``pruned20x.pt`` runs a
1376^2 window 3.4x faster than eager torch (1 thread, torch with the pipeline's allocator
setting), with MoNuSeg-test AJI -0.10 % (``python -m bench.runtime_speed``). Torch stays
the reference and the fallback (CUDA, training, a checkpoint without an OpenVINO model,
``WSI_NUCLEI_RUNTIME=torch``).

An OpenVINO model of ``name.pt`` is ``name.openvino.xml`` + ``.bin`` (``python -m
models.quantize``); its ``rt_info`` records the checkpoint's SHA-256, so a model made from
other weights is never used (a warning says so, and torch runs). OpenVINO keeps every
pixel's output independent of the window it is computed in (``bench.runtime_speed``'s
window check: 0 difference over five window shapes), which exact stitching needs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from models.checkpoints import ModelBundle

log = logging.getLogger(__name__)

RUNTIME_ENV = "WSI_NUCLEI_RUNTIME"  # auto (default) | torch | openvino
RUNTIMES = ("auto", "torch", "openvino")
SOURCE_KEY = "wsi_nuclei_checkpoint_sha256"  # rt_info entry: the weights the model was made from
PRECISION_KEY = "wsi_nuclei_precision"  # rt_info entry: int8 or fp32
Forward = Callable[[np.ndarray], Sequence[np.ndarray]]  # NCHW float32 -> (logit, dist)


def _rt_text(model: Any, key: str) -> str | None:
    return model.get_rt_info(key).astype(str) if model.has_rt_info(key) else None


class CompiledNet:
    """A compiled network dressed as the ``NucleusNet`` that ``predict_batch`` expects
    (``config``, ``parameters()``, ``eval()``, ``net(x) -> (logit, dist)``), so that
    slides, evaluation and benchmarks run it through the same pre- and post-processing.
    ``runtime`` names it (recorded in a slide's resume fingerprint)."""

    def __init__(self, config: Any, forward: Forward, runtime: str):
        self.config = config
        self.runtime = runtime
        self._forward = forward
        self._device = torch.zeros(1, 1, 1, 1)  # CPU, and already "channels-last": no .to()

    def parameters(self) -> Iterator[torch.Tensor]:
        yield self._device

    def eval(self) -> CompiledNet:
        return self

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, dist = self._forward(np.ascontiguousarray(x.numpy(), dtype=np.float32))
        return torch.from_numpy(np.asarray(logit)), torch.from_numpy(np.asarray(dist))


def openvino_path(checkpoint: Path) -> Path:
    """Where the OpenVINO model of a checkpoint lives (``name.pt`` -> ``name.openvino.xml``)."""
    return checkpoint.with_suffix(".openvino.xml")


def openvino_config(threads: int) -> dict[str, Any]:
    """Threads as torch's, latency hint (one request at a time, as a pipeline worker), FP32
    for the non-quantized operations (no silent bf16 on CPUs that have it), no CPU pinning."""
    return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}


def compile_openvino(model: Any, config: Any, threads: int, runtime: str = "openvino") -> CompiledNet:
    """An OpenVINO model (in memory or a path) compiled for the CPU, wrapped."""
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", openvino_config(threads))

    def forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = compiled(x)  # copies the outputs
        return out[0], out[1]

    return CompiledNet(config, forward, runtime)


def requested_runtime() -> str:
    runtime = os.environ.get(RUNTIME_ENV, "auto").strip().lower() or "auto"
    if runtime not in RUNTIMES:
        raise ValueError(f"{RUNTIME_ENV}={runtime!r}: choose one of {', '.join(RUNTIMES)}")
    return runtime


def with_runtime(bundle: ModelBundle, device: torch.device) -> ModelBundle:
    """``bundle`` with the network slides run on ``device`` (:func:`inference_net`)."""
    net = inference_net(bundle.net, bundle.path, bundle.sha256, device)
    return bundle if net is bundle.net else replace(bundle, net=net)


def inference_net(net: Any, checkpoint: Path | None, sha256: str, device: torch.device) -> Any:
    """The network to run: ``net`` (torch), or the checkpoint's OpenVINO model on the CPU
    when there is one for these weights and OpenVINO is installed (``auto``), or
    required (``openvino``: an error if it cannot be used)."""
    runtime = requested_runtime()
    if runtime == "torch" or device.type != "cpu" or checkpoint is None:
        if runtime == "openvino" and device.type != "cpu":
            raise ValueError(f"{RUNTIME_ENV}=openvino runs on the CPU only (device {device})")
        return net
    path = openvino_path(checkpoint)
    problem = None
    if not path.exists():
        problem = f"no OpenVINO model {path.name} beside the checkpoint"
    elif importlib.util.find_spec("openvino") is None:
        problem = "OpenVINO is not installed (pip install -e '.[openvino]')"
    if problem is None:
        import openvino as ov

        model = ov.Core().read_model(path)
        if _rt_text(model, SOURCE_KEY) != sha256:
            problem = f"{path.name} was made from other weights than {checkpoint.name}"
        else:
            kind = f"openvino-{_rt_text(model, PRECISION_KEY) or 'fp32'}"
            return compile_openvino(model, net.config, max(1, torch.get_num_threads()), kind)
    if runtime == "openvino":
        raise ValueError(f"{RUNTIME_ENV}=openvino: {problem}")
    if path.exists():  # a model is there but cannot be used: say why once per process
        log.warning("running %s on torch: %s", checkpoint.name, problem)
    return net
