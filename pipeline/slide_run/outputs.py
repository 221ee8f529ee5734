"""Phase 3, the outputs, tasks in parallel and then one: ``write_nuclei`` (table, GeoJSON:
the single writer of each), ``write_layers`` (tissue mask, RGB root image) and the label
pyramid's fine levels per block, then ``finalize_slide`` (coarse levels, store metadata,
preview)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.slide_run.executors import NoRetry, completed, one
from pipeline.slide_run.tile_file import tile_nuclei
from pipeline.types import Box


@dataclass(frozen=True)
class FinalJob:
    path: str
    mpp_override: float | None
    slide_id: str
    store: Any
    out_dir: str
    work_dir: str
    tiles: tuple[tuple[int, int], ...]  # (tile index, id offset) in tile order
    tissue: Any
    gzip: bool
    slide_mpp: float
    model_name: str
    painted: tuple[Box, ...] = ()  # level-0 label blocks holding nuclei (pyramid scope)
    model_sha256: str = ""  # recorded in the table metadata
    cells: bool = False  # cells were made (phase 1b): cell features and columns
    stains: Any = None  # the slide's stain vectors (StainVectors.to_dict()), for the table metadata


def write_layers(job: FinalJob) -> None:
    """Phase 3, one part (in parallel with :func:`write_nuclei` and the label pyramid's
    blocks): the tissue mask and the RGB root image. Only this part writes the store's
    root attributes until :func:`finalize_slide`."""
    from pipeline.overview import slide_overview
    from pipeline.slide.open import open_slide
    from pipeline.writers.labels import IMAGE_SIDE, write_image, write_tissue

    write_tissue(job.store, job.tissue.mask, job.tissue.level0_per_pixel)
    with open_slide(job.path, mpp_override=job.mpp_override) as reader:
        overview = slide_overview(reader, IMAGE_SIDE)  # chunked: memory stays bounded
    write_image(job.store, *overview)  # the store's root image; the preview reuses it


def write_nuclei(job: FinalJob) -> int:
    """Phase 3, one part (in parallel with :func:`write_layers` and the label pyramid's
    blocks): the nucleus table (Parquet and the store's AnnData) and the GeoJSON, one tile
    file at a time; returns the count. With cells, each row also has its cell's columns
    and the GeoJSON holds QuPath cells (the nucleus inside) instead of nucleus detections."""
    from pipeline.slide_run.cells import cell_columns
    from pipeline.writers.cells import CELL_COLUMNS
    from pipeline.writers.features import feature_texts
    from pipeline.writers.geojson import GeoJSONWriter
    from pipeline.writers.table import write_table

    out = Path(job.out_dir)
    count = 0

    def frames() -> Iterator[dict[str, np.ndarray]]:
        nonlocal count
        with GeoJSONWriter(_geojson_path(job), gzip=job.gzip) as writer:
            for index, offset in job.tiles:
                cols, bodies = tile_nuclei(job.work_dir, index, texts=not job.cells)
                n = len(cols["id"])
                if n == 0:
                    continue
                if job.cells:
                    extra, bodies = cell_columns(job.work_dir, index)
                    cols.update(extra)
                # the worker made each nucleus's text; only the global id is spliced in here
                cols["id"] = cols["id"].astype(np.uint64) + np.uint64(offset)
                writer.write_texts(feature_texts(cols["id"].tolist(), bodies))
                count += n
                yield cols

    write_table(out, frames(), store=job.store, metadata={
        "slide": job.path, "slide_id": job.slide_id, "model": job.model_name,
        "model_sha256": job.model_sha256, "stain_vectors": job.stains},
        extra_columns=CELL_COLUMNS if job.cells else ())
    return count


def finalize_slide(job: FinalJob) -> dict[str, Any]:
    """Phase 3, last part, after all others: the label pyramid's coarse levels (above those
    the blocks made), the store's metadata (NGFF multiscales, labels, omero) and the
    preview, which draws on the image, the labels and the table."""
    from pipeline.writers.labels import PYRAMID_BLOCK_LEVELS, build_pyramid, read_image
    from pipeline.writers.ngff import finalize

    out = Path(job.out_dir)
    build_pyramid(job.store, job.painted, first_level=PYRAMID_BLOCK_LEVELS + 1)
    finalize(job.store, name=job.slide_id, extra_attrs={"wsi-nuclei": {"slide": job.path,
                                                                       "model": job.model_name}})
    preview = out / "preview.png"
    _write_preview(job, preview, read_image(job.store, _preview_level(job.store)))
    return {"zarr": str(job.store.path), "geojson": str(_geojson_path(job)),
            "table": str(out / "nuclei.parquet"), "preview": str(preview)}


def _geojson_path(job: FinalJob) -> Path:
    return Path(job.out_dir) / ("nuclei.geojson.gz" if job.gzip else "nuclei.geojson")


def _write_outputs_part(part: tuple[str, Any]) -> Any:
    """One of the parallel parts of phase 3 (one task function for the executor)."""
    from pipeline.writers.labels import build_pyramid_block

    name, arg = part
    if name == "pyramid":
        return build_pyramid_block(*arg)
    return write_layers(arg) if name == "layers" else write_nuclei(arg)


def write_outputs(executor: Any, job: FinalJob) -> tuple[int, dict[str, str]]:
    """Phase 3: nuclei (table, GeoJSON), layers (tissue, image) and the label pyramid's
    fine levels block by block, all in parallel; then the coarse levels, metadata and
    preview. Returns the nuclei written and the output paths."""
    from pipeline.writers.labels import pyramid_blocks

    parts: list[tuple[str, Any]] = [("nuclei", job), ("layers", job)]
    parts += [("pyramid", (job.store, block)) for block in pyramid_blocks(job.store, job.painted)]
    nuclei = 0
    with completed(executor, NoRetry(_write_outputs_part), parts) as results:
        for (name, _), result in results:
            if name == "nuclei":
                nuclei = int(result)
    return nuclei, one(executor, finalize_slide, job)


def _preview_level(store: Any) -> int:
    """The root image's level the preview is made from: level 1 where the preview would
    box-average level 0 by 2 (level 0 over ``PREVIEW_SIDE``, at most ``IMAGE_SIDE``: twice
    that), for level 1 *is* that 2 x 2 box mean (``write_image``): a quarter of the pixels
    to read and none to average; else level 0."""
    import math

    from pipeline.writers.labels import open_array
    from pipeline.writers.preview import PREVIEW_SIDE

    _, h, w = open_array(store, "s0", mode="r").shape  # (c, y, x); as many levels as the nuclei
    return 1 if store.n_levels > 1 and math.ceil(max(h, w) / PREVIEW_SIDE) == 2 else 0


def _write_preview(job: FinalJob, path: Path, overview: tuple[np.ndarray, float] | None) -> None:
    """``preview.png`` (pipeline.writers.preview); ``overview``: the slide overview already
    read for the store, so that the slide is not read whole twice."""
    from pipeline.slide.open import open_slide
    from pipeline.writers.preview import make_preview

    with open_slide(job.path, mpp_override=job.mpp_override) as reader:
        make_preview(path, reader, job.store, job.tissue, Path(job.out_dir) / "nuclei.parquet", overview)


