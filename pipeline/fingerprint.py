"""What made a slide's results: a fingerprint that keeps resume from mixing settings.

A tile saved by an interrupted run is reused only if the same model, read plan, tile size,
halo, watershed parameters and output format would make it again; otherwise stitching
would join tiles cut and segmented differently (a run killed with ``--tile-size 512`` and
resumed with the default once reported 1,660 nuclei where a clean run finds 3,618).

Two parts, both plain JSON-able dicts:

* ``settings``: what the run's options and model decide, known without opening the slide;
  a finished slide's summary is compared with it to say why a skipped slide differs.
* ``slide``: what the worker learnt when planning the slide (read plan, halo, the file's
  size and modification time, the device kind), so that a replaced slide file, or a
  resume on a GPU of a run begun on a CPU, is not mixed either.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_text

log = logging.getLogger(__name__)

# Bump when the saved tile files or the outputs change layout or meaning: older partial
# work is then recomputed, and older finished slides say so when skipped.
# 5: nuclei.zarr root = RGB slide copy, tissue mask in labels/tissue; 6: GeoJSON without ids, UTF-8 µ;
# 7: tile files record the damaged regions their reads met
OUTPUT_FORMAT_VERSION = 7

FINGERPRINT_FILE = "fingerprint.json"


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
        "chunk": cfg.chunk,
    }


def slide_fingerprint(path: str, plan: Any) -> dict[str, Any]:
    """What planning the slide decided (``plan``: a run.SlidePlan), and the file's identity."""
    stat = _file_identity(path)
    return {
        "read_plan": {"level": plan.plan.level, "scale": plan.plan.scale,
                      "shape": list(plan.plan.shape), "mpp": plan.plan.mpp},
        "halo": plan.halo,
        "margin": plan.margin,
        "multiple": plan.multiple,
        "device": plan.device,
        "file": stat,
    }


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
