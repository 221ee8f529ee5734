"""A slide's plan (level, tissue, tiles: learnt by a worker, no pixels) and the claim of
its work folder: partial work is reused only when this run would make it again."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SlideReadError
from pipeline.slide_run.config import WORK_DIR
from pipeline.slide_run.executors import NetworkTask
from pipeline.types import Box, ReadPlan, SlideInfo, Tile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlidePlan:
    """What the client learns about a slide from a worker (no pixels)."""

    info: SlideInfo
    plan: ReadPlan
    tiles: tuple[Tile, ...]  # tiles with tissue
    n_tiles_total: int
    tissue: Any  # pipeline.tissue.TissueMask (small, low resolution)
    halo: int
    margin: int
    multiple: int
    # the planning worker's network runtime (fingerprint.runtime_fingerprint): the slide's
    # tiles are made on this runtime only
    runtime: dict[str, Any] = field(default_factory=dict)
    damaged: tuple[tuple[int, int, int, int, str], ...] = ()  # seen by the tissue mask's reads
    stains: dict[str, Any] = field(default_factory=dict)  # measure.stain.StainVectors.to_dict()

    def stain_vectors(self) -> Any:
        """The slide's ``measure.stain.StainVectors`` (QuPath's H&E defaults if none were set)."""
        from pipeline.measure.stain import StainVectors

        return StainVectors.from_dict(self.stains) if self.stains else StainVectors()


@dataclass(frozen=True)
class PrepareJob:
    path: str
    mpp_override: float | None
    model: str
    device: str
    tissue: bool
    tile_size: int
    cluster_margin: int
    stain_vectors: str | None = None  # RunConfig.stain_vectors


def prepare_slide(job: PrepareJob) -> SlidePlan:
    """Open the slide, choose the level, compute the tissue mask and the tile list."""
    from models.inference import context_margin
    from pipeline.cluster import get_worker_model
    from pipeline.fingerprint import runtime_fingerprint
    from pipeline.slide.open import open_slide
    from pipeline.slide.region import plan_read
    from pipeline.tiling import halo_for, plan_tiles
    from pipeline.tissue import full_mask, tissue_mask

    bundle = get_worker_model(job.model, job.device)
    cfg = bundle.config
    halo = halo_for(cfg, job.cluster_margin)
    with open_slide(job.path, mpp_override=job.mpp_override) as reader:
        plan = plan_read(reader.info, bundle.mpp)
        tissue = tissue_mask(reader) if job.tissue else full_mask(reader.info)
        info = reader.info
        tiles = plan_tiles(plan.shape, job.tile_size, halo, cfg.size_multiple, context_margin(cfg))
        kept = tuple(t for t in tiles if tissue.covers(level0_box(t.core, plan.scale)))
        stains = slide_stains(reader, plan, kept, job.stain_vectors)
        damaged = damage_records(reader)
        if damaged and not reader.reads_ok:  # not a damaged region: an unreadable slide
            raise SlideReadError(f"no region of the slide can be read: {damaged[0][4]}")
    return SlidePlan(info, plan, kept, len(tiles), tissue, halo, context_margin(cfg),
                     cfg.size_multiple, runtime_fingerprint(bundle), damaged, stains.to_dict())


STAIN_SAMPLES = 12  # windows read at model resolution to estimate a slide's stain vectors
STAIN_SAMPLE_SIDE = 192  # model px: 12 x 192² = 0.44 Mpx, a few reads whatever the slide's size


def slide_stains(reader: Any, plan: ReadPlan, tiles: tuple[Tile, ...], given: str | None) -> Any:
    """The slide's stain vectors (``measure.stain``): ``given`` (``--stain-vectors``), or
    estimated from windows at the model's resolution spread over the tiles with tissue.

    At the model's resolution, not the tissue mask's: averaging pixels mixes haematoxylin
    and eosin, which pulls the two estimated vectors together (on CMU-1-Small-Region, 6 and
    11 degrees at 4 µm/px). Pixels that are not H&E-coloured (glass, marker pen, dye, dirt:
    ``tissue.tissue_signal``) are left out, else a teal marking dye passes for haematoxylin;
    the glass among them gives the background."""
    from pipeline.measure.stain import StainVectors, stains_of_pixels
    from pipeline.slide.region import read_region
    from pipeline.tissue import SAT_FLOOR, tissue_signal

    if given is not None:
        return StainVectors.parse(given)
    if not tiles:
        return StainVectors(source="default: no tissue")
    picks = [tiles[i] for i in np.unique(np.linspace(0, len(tiles) - 1, STAIN_SAMPLES).round().astype(int))]
    windows = []
    for tile in picks:
        cy, cx = (tile.core.y0 + tile.core.y1) // 2, (tile.core.x0 + tile.core.x1) // 2
        half = STAIN_SAMPLE_SIDE // 2
        box = Box(max(0, cy - half), max(0, cx - half), min(plan.shape[0], cy + half),
                  min(plan.shape[1], cx + half))
        if not box.is_empty():
            windows.append(read_region(reader, plan, box).reshape(-1, 3))
    pixels = np.concatenate(windows)
    found = stains_of_pixels(pixels, tissue_signal(pixels[None])[0] > SAT_FLOOR)
    log.info("%s: stain vectors %s (%s)", reader.info.path, found.to_qupath(), found.source)
    return found


def level0_box(box: Box, scale: float) -> Box:
    """Level-0 pixels covered by a model-pixel box."""
    return Box(int(np.floor(box.y0 * scale)), int(np.floor(box.x0 * scale)),
               int(np.ceil(box.y1 * scale)), int(np.ceil(box.x1 * scale)))


def damage_records(reader: Any) -> tuple[tuple[int, int, int, int, str], ...]:
    """The reader's damaged stored tiles as level-0 boxes (y0, x0, y1, x1, error)."""
    from pipeline.slide.region import nominal_downsample

    out = []
    def order(item: tuple[tuple[int, Box], str]) -> tuple[int, int, int]:
        return item[0][0], item[0][1].y0, item[0][1].x0

    for (level, box), error in sorted(reader.damaged.items(), key=order):
        ds = nominal_downsample(reader.info, level)
        out.append((int(box.y0 * ds), int(box.x0 * ds), min(int(box.y1 * ds), reader.info.height),
                    min(int(box.x1 * ds), reader.info.width), error))
    return tuple(out)




PREPARE_SLIDE = NetworkTask(prepare_slide)  # planning loads the model, on a GPU worker where there are any


def worker_runtime(job: tuple[str, str]) -> dict[str, Any]:
    """The network runtime a worker runs ``(model, device)`` on, without planning a slide:
    what a skipped slide's fingerprint is compared with."""
    from pipeline.cluster import get_worker_model
    from pipeline.fingerprint import runtime_fingerprint

    return runtime_fingerprint(get_worker_model(*job))


WORKER_RUNTIME = NetworkTask(worker_runtime)


def skip_note(done: dict[str, Any], settings: dict[str, Any], runtime: dict[str, Any]) -> str:
    """Why a finished slide's results may not be what this run would make: its settings
    and its network runtime (``runtime``: :func:`fingerprint.run_runtime` of a worker's),
    each difference with its values where they are short."""
    from pipeline.fingerprint import described

    old = done.get("fingerprint") or {}
    changed = described(old.get("settings"), settings)
    if old.get("settings"):  # else "fingerprint missing" says it all
        changed += [f"runtime.{d}" for d in described((old.get("slide") or {}).get("runtime"), runtime)]
    if not changed:
        return ""
    return f"made with other settings ({'; '.join(changed)}); --overwrite recomputes it"


def claim_work_dir(out: Path, path: str, settings: dict[str, Any], plan: SlidePlan,
                   batch_size: int) -> dict[str, Any]:
    """Make ``out/.work`` hold only work this run would make: partial results of an
    interrupted run with another fingerprint (other settings, model, slide file or network
    runtime; or none, from an older version) are discarded with the label store they fed.
    Returns the fingerprint, recorded in the work folder and later in the summary."""
    from pipeline.fingerprint import (
        described,
        fingerprint,
        read_work_fingerprint,
        slide_fingerprint,
        write_work_fingerprint,
    )

    work = out / WORK_DIR
    current = fingerprint(settings, slide_fingerprint(path, plan, batch_size))
    if work.exists():
        changed = described(read_work_fingerprint(work), current)
        if changed:
            log.warning("%s: discarding partial work of an earlier run (%s differ)", path,
                        "; ".join(changed))
            shutil.rmtree(work)
            shutil.rmtree(out / "nuclei.zarr", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    write_work_fingerprint(work, current)
    return current

