"""One-file model checkpoints: architecture, weights, resolution, watershed parameters,
provenance and validation metrics.

Everything inside is a plain container of tensors/numbers/strings so that
``torch.load(weights_only=True)`` can read it: opening a checkpoint never runs code.
Unstructured-pruned weights are stored as the non-zero values plus where they are: a
bitmask (1 bit per weight) or, when fewer than 1 in 32 weights survive, their int32
indices, whichever is smaller; an 80 %-sparse float16 checkpoint is then about 3.5x
smaller than its dense twin.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.config import NetConfig, TargetConfig, WatershedParams, from_dict
from models.network import NucleusNet
from pipeline.atomic import atomic_path

FORMAT = "wsi-nuclei/1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SPARSE_MIN_ZEROS = 0.5  # store a tensor sparse only if at least this fraction is zero


class CheckpointError(ValueError):
    """A model file that is missing, corrupt or not a wsi-nuclei checkpoint."""


@dataclass
class ModelBundle:
    """A loaded model with everything needed to run and describe it."""

    net: NucleusNet
    mpp: float
    watershed: WatershedParams
    targets: TargetConfig
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""

    @property
    def config(self) -> NetConfig:
        return self.net.config


# The model a run uses unless told otherwise: the first of these that is shipped. 20x
# networks first: they read 40x slides at 0.5 um/px (4x fewer pixels); dense20x.pt segments
# a slide faster than pruned80.pt at the same accuracy (bench.slide_speed; the README's
# performance table). pruned20x.pt takes over once it is shipped (models/weights/README.md).
DEFAULT_MODELS = ("pruned20x.pt", "dense20x.pt", "pruned80.pt", "dense.pt")


def default_model() -> str:
    """The first shipped model of :data:`DEFAULT_MODELS`."""
    return next((name for name in DEFAULT_MODELS if (WEIGHTS_DIR / name).exists()), DEFAULT_MODELS[-1])


def resolve(name: str | os.PathLike) -> Path:
    """A path as given, else a shipped weight file (``dense.pt``, ``pruned80`` ...)."""
    path = Path(name)
    if path.exists():
        return path
    for candidate in (WEIGHTS_DIR / path.name, WEIGHTS_DIR / f"{path.name}.pt"):
        if candidate.exists():
            return candidate
    shipped = sorted(p.name for p in WEIGHTS_DIR.glob("*.pt"))
    raise CheckpointError(f"model {str(name)!r} not found (not a file; shipped models: "
                          f"{', '.join(shipped) or 'none'})")


def _pack(state: dict[str, torch.Tensor], half: bool = False) -> dict[str, Any]:
    """Sparse (bitmask or indices, values) for mostly-zero float tensors; float16 storage
    with ``half`` (loaded back as float32: the shipped files stay a few MB)."""
    packed: dict[str, Any] = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        if half and tensor.dtype == torch.float32:
            tensor = tensor.half()
        if tensor.is_floating_point() and tensor.numel() >= 64:
            zeros = float((tensor == 0).sum()) / tensor.numel()
            if zeros >= SPARSE_MIN_ZEROS:
                flat = tensor.flatten()
                nonzero = flat != 0
                entry: dict[str, Any] = {"sparse_shape": list(tensor.shape),
                                         "values": flat[nonzero].clone()}
                if 32 * int(nonzero.sum()) < flat.numel():  # int32 indices are smaller
                    entry["indices"] = torch.nonzero(nonzero, as_tuple=True)[0].to(torch.int32)
                else:
                    entry["bitmask"] = torch.from_numpy(np.packbits(nonzero.numpy()))
                packed[key] = entry
                continue
        packed[key] = tensor.clone()
    return packed


def _unpack(packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in packed.items():
        if isinstance(value, dict):
            shape = value["sparse_shape"]
            numel = int(np.prod(shape))
            flat = torch.zeros(numel, dtype=value["values"].dtype)
            if "bitmask" in value:
                where = np.unpackbits(value["bitmask"].numpy(), count=numel).astype(bool)
                flat[torch.from_numpy(where)] = value["values"]
            else:
                flat[value["indices"].long()] = value["values"]
            state[key] = flat.reshape(shape)
        else:
            state[key] = value
        if state[key].dtype == torch.float16:
            state[key] = state[key].float()
    return state


def save(path: str | os.PathLike, net: NucleusNet, *, mpp: float,
         watershed: WatershedParams, targets: TargetConfig,
         provenance: dict[str, Any] | None = None,
         metrics: dict[str, Any] | None = None, half: bool = False) -> Path:
    """Write a checkpoint atomically (temp file + rename); ``half`` stores float16."""
    payload = {
        "format": FORMAT,
        "net": asdict(net.config),
        "state_dict": _pack(net.state_dict(), half),
        "input_scale": 1.0 / 255.0,
        "mpp": float(mpp),
        "watershed": watershed.to_dict(),
        "targets": asdict(targets),
        "provenance": provenance or {},
        "metrics": metrics or {},
    }
    return atomic_torch_save(payload, path)


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`pipeline.atomic.atomic_path` (the project's one atomic
    write: hidden name in the same folder, then rename; usual permissions), so a crash never
    leaves a half-written checkpoint."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(name: str | os.PathLike, device: str | torch.device = "cpu", *,
         fold_bn: bool = False) -> ModelBundle:
    """Load a checkpoint by path or shipped name; :class:`CheckpointError` if unusable.

    ``fold_bn``: the network as inference runs it (BatchNorm folded into the convs, see
    :func:`models.inference.fold_batchnorm`): for segmenting, never for training or saving."""
    path = resolve(name)
    try:
        # TorchVersion: provenance of checkpoints written before it was stored as str
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable model checkpoint ({exc.__class__.__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a wsi-nuclei checkpoint (format {FORMAT} expected)")
    try:
        config = from_dict(NetConfig, payload["net"])
        net = NucleusNet(config)
        net.load_state_dict(_unpack(payload["state_dict"]))
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: weights do not match the stored architecture ({exc})") from exc
    net.eval()
    if fold_bn:
        from models.inference import fold_batchnorm

        net = fold_batchnorm(net)
    net.to(device)
    return ModelBundle(
        net=net,
        mpp=float(payload["mpp"]),
        watershed=from_dict(WatershedParams, payload.get("watershed", {})),
        targets=from_dict(TargetConfig, payload.get("targets", {})),
        provenance=payload.get("provenance", {}),
        metrics=payload.get("metrics", {}),
        path=path,
        sha256=file_sha256(path),
    )
