"""What made a slide's results: a fingerprint that keeps resume from mixing settings.

A tile saved by an interrupted run is reused only if the same model, read plan, tile size,
halo, watershed parameters and output format would make it again; otherwise stitching
would join tiles cut and segmented differently (a run killed with ``--tile-size 512`` and
resumed with the default once reported 1,660 nuclei where a clean run finds 3,618).

Two parts, both plain JSON-able dicts:

* ``settings``: what the run's options and model decide, known without opening the slide;
  a finished slide's summary is compared with it to say why a skipped slide differs.
* ``slide``: what the worker learnt when planning the slide (read plan, halo, the file's
  size and modification time) and its network ``runtime`` (:func:`runtime_fingerprint`),
  so that a replaced slide file, or a resume on a GPU of a run begun on a CPU, is not
  mixed either.

The runtime is also pinned per slide: every tile task compares its worker's runtime with
the planning worker's and refuses to run on another (:func:`check_runtime`), so a cluster
of mixed workers never stitches one slide from two runtimes' tiles.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_text

log = logging.getLogger(__name__)

# Bump when the saved tile files or the outputs change layout or meaning: older partial
# work is then recomputed, and older finished slides say so when skipped.
# 5: nuclei.zarr root = RGB slide copy, tissue mask in labels/tissue; 6: GeoJSON without ids, UTF-8 µ;
# 7: tile files record the damaged regions their reads met; 8: stain intensities per nucleus;
# 9: feature texts of tile and cell files packed with Zstandard; 10: tile files hold the cells
# their tile task made, cell files only those of tiles with cells left to phase 1b;
# 11: label images of tile and cell files packed with Zstandard, cell files hold only the
# cells phase 1b made
OUTPUT_FORMAT_VERSION = 11

FINGERPRINT_FILE = "fingerprint.json"
# CPU flags of the INT8 dot-product instructions: without them OpenVINO's INT8 kernels
# take another path whose intermediate sums saturate (measured: ONEDNN_MAX_CPU_ISA=AVX2 on
# a VNNI CPU moves probabilities by up to 0.13); AVX2 and AVX-512 without VNNI agree
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
ISA_CAP_ENV = "ONEDNN_MAX_CPU_ISA"  # oneDNN's cap on the instruction set, honoured by OpenVINO


class RuntimeMismatch(RuntimeError):
    """A tile task on a worker whose network runtime differs from the planning worker's."""


def settings_fingerprint(cfg: Any, model_sha256: str, watershed: Any) -> dict[str, Any]:
    """The run options and model that decide a slide's results (``cfg``: a RunConfig)."""
    return {
        "format_version": OUTPUT_FORMAT_VERSION,
        "model_sha256": model_sha256,
        "watershed": asdict(watershed),
        "tile_size": cfg.tile_size,
        "cluster_margin": cfg.cluster_margin,
        "mpp_override": cfg.mpp,
        "tissue_mask": cfg.tissue_mask,
        "keep_outside_tissue": cfg.keep_outside_tissue,
        "stain_vectors": cfg.stain_vectors,
        # only when on: results made before the switch existed keep their fingerprint
        **({"stain_normalise": True} if cfg.stain_normalise else {}),
        "cell_expansion": cfg.cell_expansion,
        "cell_constrain_scale": cfg.cell_constrain_scale,
        "chunk": cfg.chunk,
        "package_version": _version("wsi-nuclei"),
    }


def slide_fingerprint(path: str, plan: Any, batch_size: int) -> dict[str, Any]:
    """What planning the slide decided (``plan``: a ``slide_run.plan.SlidePlan``), the
    runtime of the network (:func:`run_runtime`), and the file's identity."""
    stat = _file_identity(path)
    return {
        "read_plan": {"level": plan.plan.level, "scale": plan.plan.scale,
                      "shape": list(plan.plan.shape), "mpp": plan.plan.mpp},
        "halo": plan.halo,
        "margin": plan.margin,
        "multiple": plan.multiple,
        "runtime": run_runtime(plan.runtime, batch_size),
        "file": stat,
    }


def run_runtime(runtime: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
    """A worker's runtime with the run's batch size where it changes outputs: on CUDA
    (cuDNN chooses algorithms by shape); on the CPU, torch and OpenVINO give each window
    the same outputs in any batch (measured: 0 difference, batches of 1, 2 and 4)."""
    return {**runtime, "batch_size": batch_size} if runtime.get("kind") == "cuda" else dict(runtime)


def runtime_fingerprint(bundle: Any) -> dict[str, Any]:
    """What of this process's network runtime changes a slide's outputs (``bundle``: the
    worker's model): the runtime kind (``cpu``, ``cuda``, ``openvino-int8``, ...), the
    versions of what computes, the OpenVINO model's files, the INT8 instruction set, and
    whether CUDA numerics are pinned (``pipeline.determinism``). Cached per process."""
    kind = getattr(bundle.net, "runtime", None) or next(bundle.net.parameters()).device.type
    return dict(_runtime_identity(kind, str(bundle.path) if bundle.path else None))


@functools.lru_cache(maxsize=8)
def _runtime_identity(kind: str, checkpoint: str | None) -> tuple[tuple[str, Any], ...]:
    from models.runtime import openvino_path

    out: dict[str, Any] = {"kind": kind, "torch": _version("torch")}
    if kind.startswith("openvino") and checkpoint:
        xml = openvino_path(Path(checkpoint))
        out["openvino"] = _version("openvino")
        out["openvino_model_sha256"] = _sha256_of(xml, xml.with_suffix(".bin"))
        if kind == "openvino-int8":
            out["int8_isa"] = int8_isa(_cpu_flags(), os.environ)
    if kind == "cuda":
        from pipeline.determinism import deterministic_wanted

        out["cuda_deterministic"] = deterministic_wanted()
    return tuple(out.items())


def int8_isa(cpu_flags: set[str] | frozenset[str], environ: Mapping[str, str]) -> str:
    """``vnni`` or ``no-vnni``: which of OpenVINO's INT8 paths this CPU takes (``unknown``
    where the flags cannot be read), with oneDNN's instruction-set cap applied."""
    if not cpu_flags:
        return "unknown"
    cap = environ.get(ISA_CAP_ENV, "").strip().upper()
    capped = cap not in ("", "ALL", "DEFAULT") and "VNNI" not in cap and "AMX" not in cap
    return "vnni" if cpu_flags & VNNI_FLAGS and not capped else "no-vnni"


def check_runtime(planned: Mapping[str, Any], mine: Mapping[str, Any]) -> None:
    """Raise :class:`RuntimeMismatch` when this worker's runtime (``mine``) is not the one
    the slide was planned with: its tiles would not stitch exactly with the others."""
    changed = differences(planned, mine)
    if changed:
        raise RuntimeMismatch(
            "this worker's network runtime differs from the one the slide was planned with ("
            + "; ".join(_described(name, planned, mine) for name in changed)
            + "): one slide is never stitched from two runtimes' tiles; give every worker the "
              "same runtime (WSI_NUCLEI_RUNTIME, --device, the same CPU generation for INT8)")


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return frozenset()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def _sha256_of(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def fingerprint(settings: Mapping[str, Any], slide: Mapping[str, Any]) -> dict[str, Any]:
    return {"settings": dict(settings), "slide": dict(slide)}


def _file_identity(path: str) -> dict[str, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # in-memory slides (tests), or a URL-like path
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def differences(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """Dotted names of the entries that differ (``["settings.tile_size", ...]``);
    ``["fingerprint missing"]`` when ``old`` is absent (work of an older version)."""
    if not old:
        return ["fingerprint missing"]
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif _normalised(a) != _normalised(b):
            out.append(prefix)

    walk(old, new, "")
    return out


def described(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """:func:`differences`, each with its values where they are short (``"runtime.kind:
    openvino-int8 -> cpu"``)."""
    if not old:
        return differences(old, new)
    return [_described(name, old, new) for name in differences(old, new)]


def _described(name: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    def at(tree: Any) -> Any:
        for key in name.split("."):
            tree = tree.get(key) if isinstance(tree, Mapping) else None
        return tree

    a, b = at(old), at(new)
    if isinstance(a, (Mapping, list)) or isinstance(b, (Mapping, list)) or len(f"{a}{b}") > 40:
        return name
    return f"{name}: {a} -> {b}"


def _normalised(value: Any) -> Any:
    """JSON round trip, so tuples and lists (and float reprs) compare as stored."""
    return json.loads(json.dumps(value))


def read_work_fingerprint(work_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(work_dir) / FINGERPRINT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_work_fingerprint(work_dir: str | os.PathLike[str], value: Mapping[str, Any]) -> None:
    atomic_write_text(Path(work_dir) / FINGERPRINT_FILE, json.dumps(value, indent=1, sort_keys=True))
