"""Tiny real slides for end-to-end naming tests (test_discovery, test_workflows).

Why: naming bugs show only when the real ``wsi-nuclei run`` writes real outputs, and a
256 x 256 synthetic pyramidal TIFF goes through the whole pipeline in ~2 s with
``pruned80.pt`` (one tile, ``--cluster none``). Different seeds give different nucleus
counts, so a slide reported with another slide's count is caught.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.pyramid_tiff import write_pyramidal_tiff
from pipeline.synthetic import synthetic_he

MODEL = "pruned80.pt"  # the fastest shipped model
SIDE = 256  # one tile of TILE
TILE = 256
RUN_FLAGS = ["--model", MODEL, "--tile-size", str(TILE), "--device", "cpu"]


def write_slides(root: Path, names: list[str]) -> list[Path]:
    """One synthetic slide per relative name under ``root`` (seed = its position + 1)."""
    paths = []
    for seed, name in enumerate(names, start=1):
        rgb, _ = synthetic_he(SIDE, SIDE, seed=seed, mpp=0.25)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(write_pyramidal_tiff(path, rgb, mpp=0.25, compression="zlib"))
    return paths


def results(out: Path) -> dict[str, tuple[str, str, int]]:
    """Output folder name -> (slide, status, nuclei) of every summary under ``out``."""
    found = {}
    for summary in sorted(out.glob("*/summary.json")):
        data = json.loads(summary.read_text())
        found[summary.parent.name] = (data["slide"], data["status"], data.get("nuclei", -1))
    return found
