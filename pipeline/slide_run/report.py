"""What a finished slide's ``summary.json`` says about the run: counts, regions that could
not be read or segmented, timings and versions (``pipeline.writers.summary`` writes it)."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.slide_run.blocks import LabelBlocks
from pipeline.slide_run.plan import SlidePlan, level0_box
from pipeline.slide_run.tile_file import PHASES, TileSummary
from pipeline.types import Box

log = logging.getLogger(__name__)


def slide_report(plan: SlidePlan, tiles: list[TileSummary], blocks: LabelBlocks,
                 timings: dict[str, float]) -> dict[str, Any]:
    """The summary's entries about the slide's plan, tiles and label blocks."""
    return {
        "dimensions": [plan.info.width, plan.info.height],
        "slide_mpp": plan.info.mpp, "model_mpp": plan.plan.mpp, "level_read": plan.plan.level,
        "scale": plan.plan.scale, "tissue_area_um2": _tissue_area(plan),
        "tiles_total": plan.n_tiles_total, "tiles_processed": len(plan.tiles),
        "tiles_skipped_no_tissue": plan.n_tiles_total - len(plan.tiles),
        "tiles_from_cache": sum(s.cached for s in tiles),
        "clusters_recomputed": sum(s.recomputed for s in tiles),
        "giant_clusters": giant_clusters(tiles, plan.plan.scale),
        "nuclei_outside_tissue_dropped": sum(s.dropped for s in tiles),
        "label_blocks": blocks.count, "label_blocks_from_cache": blocks.from_cache,
        "label_pixel_collisions": blocks.collisions,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "tile_phases_s": {name: round(sum(s.phases[k] for s in tiles), 3)
                          for k, name in enumerate(PHASES)},
        "origin_shift_xy": list(plan.info.bounds_xy),
        "tiles_with_damage": sum(bool(s.damaged) for s in tiles),
        "unreadable_regions": unreadable_regions(plan, tiles),
        "stain_vectors": plan.stains,
    }


def missing_regions(path: str, report: dict[str, Any]) -> list[str]:
    """What the slide's results lack, one phrase each, each told to the user in a log line
    here: regions that could not be read, and giant clusters (foreground components too
    large for any window: ``stitch.grown.giant_side``), whose nuclei are not segmented. A slide
    with any is ``partial`` (the run exits 1)."""
    lacking = []
    if report["unreadable_regions"]:
        n = len(report["unreadable_regions"])
        log.error("%s: %d region(s) could not be read; the slide's other results are "
                  "complete (summary.json: unreadable_regions)", path, n)
        lacking.append(f"{n} unreadable region(s)")
    if report["giant_clusters"]:
        n = len(report["giant_clusters"])
        log.warning("%s: %d giant cluster(s) of foreground, too large for any window, were not "
                    "segmented: their nuclei are missing; the slide's other results are complete "
                    "(summary.json: giant_clusters, level-0 boxes y0, x0, y1, x1)", path, n)
        lacking.append(f"{n} giant cluster(s) not segmented")
    return lacking


def unreadable_regions(plan: SlidePlan, tiles: list[TileSummary]) -> list[dict[str, Any]]:
    """Each damaged stored tile once (level-0 box, error), for summary.json."""
    found = {r[:4]: r[4] for s in tiles for r in s.damaged}
    found.update({r[:4]: r[4] for r in plan.damaged})
    return [{"box_level0_yx": list(box), "error": error} for box, error in sorted(found.items())]



def giant_clusters(tiles: list[TileSummary], scale: float) -> list[list[int]]:
    """Level-0 boxes (y0, x0, y1, x1) of the giant foreground components the tiles met
    (not segmented; see ``stitch.grown.giant_side``): the boxes each tile saw, overlapping ones
    merged, so each giant is listed once."""
    merged = [b for s in tiles for b in s.giants]
    changed = True
    while changed:  # a few boxes per slide at most: quadratic merging is fine
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                a, b = merged[i], merged[j]
                if not a.intersect(b).is_empty():
                    merged[i] = Box(min(a.y0, b.y0), min(a.x0, b.x0), max(a.y1, b.y1), max(a.x1, b.x1))
                    del merged[j]
                    changed = True
                    break
            if changed:
                break
    boxes = sorted((level0_box(b, scale) for b in merged), key=lambda b: (b.y0, b.x0))
    return [[b.y0, b.x0, b.y1, b.x1] for b in boxes]



def _tissue_area(plan: SlidePlan) -> float | None:
    if plan.info.mpp is None:
        return None
    return float(plan.tissue.area_um2(plan.info.mpp))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("wsi-nuclei", "torch", "openvino", "numpy", "scikit-image", "zarr", "openslide-python",
                 "openslide-bin", "dask", "distributed", "shapely"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
