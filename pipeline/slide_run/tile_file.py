"""The tile file: one atomic ``.npz`` per tile in a slide's work folder, written by the
tile tasks, read back by the label blocks, the nuclei writer and a resumed run. This
module is the format's only owner: what is written, what is read back, and the summary
a resumed run takes from a tile file instead of recomputing the tile."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.types import Box, Tile

PHASES = ("read", "network", "watershed", "save", "cells")
# the feature texts (GeoJSON bodies, ~1 kB per nucleus, ~4 kB per cell) are the bulk of a
# tile or cell file: Zstandard level 1 packs them smaller than the npz's deflate level 1
# in under half its time (a 5 MB cell tile's texts: 20 vs 57 ms), and unpacks faster
TEXT_ZSTD_LEVEL = 1
# stored slide tiles found damaged: level-0 (y0, x0, y1, x1, error)
Damage = tuple[tuple[int, int, int, int, str], ...]


@dataclass(frozen=True)
class TileSummary:
    index: int
    count: int
    extent: Box
    recomputed: int
    giants: tuple[Box, ...]  # giant components met (model-pixel boxes as far as seen)
    seconds: float
    cached: bool
    # worker-seconds per phase (``PHASES``); zeros for cached tiles
    phases: tuple[float, ...] = (0.0,) * len(PHASES)
    dropped: int = 0  # nuclei centred off the tissue, not kept
    # stored slide tiles this tile's reads found damaged: painted as glass, so the nuclei
    # there are missing; kept in the tile file (a resumed run reports them too), and such
    # tiles are recomputed on a re-run of a partial slide
    damaged: Damage = ()
    # with cells: the box of the cells made in the tile task (None: none), and how many of
    # the tile's nuclei are left without a cell for phase 1b
    cell_box: Box | None = None
    cells_left: int = 0


@dataclass(frozen=True)
class TileCells:
    """The cells of some of a tile's nuclei: those the tile task could make (in its tile
    file), those phase 1b made (its cell file), or all of them (both merged)."""

    box: Box  # model px of ``labels``
    labels: np.ndarray  # int32: the cells of ``ids`` (tile-local nucleus ids), 0 elsewhere
    ids: np.ndarray  # the nuclei whose cells these are, ascending
    columns: dict[str, np.ndarray]  # ``writers.cells.CELL_COLUMNS``, rows in ``ids`` order
    bodies: list[str]  # QuPath cell features without their ids, in ``ids`` order
    seconds: float = 0.0


def tile_file(work_dir: str | Path, index: int) -> Path:
    return Path(work_dir) / f"tile-{index:07d}.npz"


def measure_tile(job: Any, result: Any, rgb: np.ndarray | None = None
                 ) -> tuple[dict[str, np.ndarray], list[str]]:
    """The tile's table columns and each nucleus's GeoJSON text (all of it but the id,
    which needs the global nucleus number), made on the worker, vectorised over the tile,
    so the single writer of phase 3 only splices ids into text. ``job``: the tile task's
    ``TileJob``; ``result``: ``stitch.tile.segment_tile``'s instances; ``rgb``: the
    slide's pixels over ``result.extent`` (stain intensities, with ``job.stains``)."""
    from pipeline.writers.features import feature_bodies
    from pipeline.writers.outlines import trace_tile
    from pipeline.writers.table import instance_measurements

    scale = job.plan.scale
    offset = (result.extent.y0, result.extent.x0)
    shift = (float(job.origin_shift[0]), float(job.origin_shift[1]))
    outlines = trace_tile(result.labels, offset, scale, shift)
    columns = instance_measurements(result.labels, result.prob, offset, scale, job.slide_mpp,
                                    outlines=outlines, rgb=rgb, stains=job.stains)
    values = {k: columns[k].to_numpy() for k in columns}
    return values, feature_bodies(outlines.polygons, values)


def save_tile(job: Any, tile: Tile, result: Any, seconds: float, dropped: int = 0,
              damaged: Damage = (), rgb: np.ndarray | None = None,
              measured: tuple[dict[str, np.ndarray], list[str]] | None = None,
              cells: TileCells | None = None) -> None:
    """The tile file of ``result``: its labels, :func:`measure_tile`'s columns and texts
    (``measured``, or measured here on ``rgb``), and the cells made in the tile task."""
    values, texts = measured if measured is not None else measure_tile(job, result, rgb)
    offset = (result.extent.y0, result.extent.x0)
    save_arrays(tile_file(job.work_dir, tile.index),
                labels=pack_labels(result.labels),
                extent=np.array([*offset, result.extent.y1, result.extent.x1]),
                stats=np.array([result.count, result.recomputed, dropped]),
                giants=np.array([(b.y0, b.x0, b.y1, b.x1) for b in result.giants],
                                np.int64).reshape(-1, 4),
                seconds=np.array(seconds), features=pack_texts(texts),
                damaged_boxes=np.array([r[:4] for r in damaged], np.int64).reshape(-1, 4),
                damaged_errors=np.array([r[4] for r in damaged], dtype=np.str_),
                **{f"col_{k}": v for k, v in values.items()},
                **(cell_arrays(cells, "cell_") if cells is not None else {}))


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """A tile or cell file, atomically; the packed texts and labels and the table columns
    are written without deflate (deflate shrinks float64 measurements by a third at half
    again the file's write time)."""
    from pipeline.atomic import save_npz_atomic

    packed = [k for k in arrays if k.endswith(("features", "labels")) or "col_" in k]
    save_npz_atomic(path, **arrays, stored=packed)


def cell_arrays(cells: TileCells, prefix: str = "") -> dict[str, np.ndarray]:
    """``cells`` as the arrays of an npz (in a tile file behind ``prefix``)."""
    b = cells.box
    return {f"{prefix}labels": pack_labels(cells.labels), f"{prefix}box": np.array([b.y0, b.x0, b.y1, b.x1]),
            f"{prefix}ids": np.asarray(cells.ids, np.int64), f"{prefix}features": pack_texts(cells.bodies),
            **{f"{prefix}col_{k}": v for k, v in cells.columns.items()}}


def read_cells(f: Any, prefix: str = "", measured: bool = True) -> TileCells | None:
    """The :class:`TileCells` an open npz holds behind ``prefix`` (None if none); only
    their labels, box and ids with ``measured=False`` (no columns, no texts)."""
    if f"{prefix}ids" not in f.files:
        return None
    columns = {k[len(prefix) + 4:]: f[k] for k in f.files if measured and k.startswith(f"{prefix}col_")}
    return TileCells(Box(*(int(v) for v in f[f"{prefix}box"])), unpack_labels(f[f"{prefix}labels"]),
                     f[f"{prefix}ids"], columns, unpack_texts(f[f"{prefix}features"]) if measured else [])


def pack_texts(texts: list[str]) -> np.ndarray:
    """Texts as one Zstandard-compressed UTF-8 array (saved without deflate)."""
    import imagecodecs

    data = "\n".join(texts).encode("utf-8")
    return np.frombuffer(imagecodecs.zstd_encode(data, level=TEXT_ZSTD_LEVEL), np.uint8)


def pack_labels(labels: np.ndarray) -> np.ndarray:
    """A label image (int32) as Zstandard level 1 bytes behind its shape (saved without
    deflate): on a 1,046 x 1,036 tile 3 ms to pack and 3 to unpack, 65 kB, against the
    npz's deflate 13 ms, 8 ms and 143 kB. Tile files are written once and read by phase 1b,
    phase 2 and every neighbour's cells."""
    import imagecodecs

    a = np.ascontiguousarray(labels, np.int32)
    shape = np.array(a.shape, np.int64).reshape(2).view(np.uint8)
    return np.concatenate([shape, np.frombuffer(imagecodecs.zstd_encode(a.tobytes(), level=1), np.uint8)])


def unpack_labels(packed: np.ndarray) -> np.ndarray:
    """The label image :func:`pack_labels` packed (int32, writable)."""
    import imagecodecs

    h, w = (int(v) for v in np.frombuffer(packed[:16].tobytes(), np.int64))
    out = np.empty((h, w), np.int32)
    if out.size:
        imagecodecs.zstd_decode(packed[16:].tobytes(), out=out.reshape(-1).view(np.uint8))
    return out


def unpack_texts(packed: np.ndarray) -> list[str]:
    """The texts :func:`pack_texts` packed."""
    import imagecodecs

    text = imagecodecs.zstd_decode(packed.tobytes()).decode("utf-8")
    return text.split("\n") if text else []


def cached_summary(work_dir: str, tile: Tile) -> TileSummary:
    """The summary of a tile an earlier run saved, as its task returned it then."""
    with np.load(tile_file(work_dir, tile.index)) as f:
        y0, x0, y1, x1 = (int(v) for v in f["extent"])
        count, recomputed, dropped = (int(v) for v in f["stats"])
        giants = tuple(Box(*(int(v) for v in row)) for row in f["giants"])
        damaged = tuple((*(int(v) for v in box), str(error))
                        for box, error in zip(f["damaged_boxes"], f["damaged_errors"]))
        made = "cell_ids" in f.files
        return TileSummary(tile.index, count, Box(y0, x0, y1, x1), recomputed, giants,
                           float(f["seconds"]), True, dropped=dropped, damaged=damaged,
                           cell_box=Box(*(int(v) for v in f["cell_box"])) if made else None,
                           cells_left=count - (len(f["cell_ids"]) if made else 0))


def tile_cells(work_dir: str, index: int, measured: bool = True) -> TileCells | None:
    """The cells the tile task made (None if it made none)."""
    with np.load(tile_file(work_dir, index)) as f:
        return read_cells(f, "cell_", measured)


def tile_cell_ids(work_dir: str, index: int) -> np.ndarray:
    """The nuclei whose cells the tile task made (only that array is read)."""
    with np.load(tile_file(work_dir, index)) as f:
        return f["cell_ids"] if "cell_ids" in f.files else np.zeros(0, np.int64)


def tile_labels(work_dir: str, index: int) -> np.ndarray:
    """The tile's owned instances (tile-local ids 1..count) over its extent."""
    with np.load(tile_file(work_dir, index)) as f:
        return unpack_labels(f["labels"])


def tile_nuclei(work_dir: str, index: int, texts: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
    """The tile's table columns (tile-local ``id``) and each nucleus's GeoJSON text
    without its id (``writers.geojson.feature_texts`` splices the global one in); no texts
    with ``texts=False`` (a run with cells writes its cells' instead)."""
    with np.load(tile_file(work_dir, index)) as f:
        columns = {k[4:]: f[k] for k in f.files if k.startswith("col_")}
        if not texts or not len(columns["id"]):
            return columns, []
        return columns, unpack_texts(f["features"])
