"""The tile grid: cores that partition the model-pixel image, windows with a halo.

Every window starts and ends on the network's pooling grid, which is what makes a window's
output equal the whole-image output (see ``models.inference``); interior windows share one
size (so they batch together), border windows are trimmed (see :func:`plan_tiles`).
The tile size and cluster-margin defaults live here, once.
"""

from __future__ import annotations

from models.config import NetConfig
from pipeline.errors import ConfigError
from pipeline.types import Box, Tile

# Largest nucleus cluster (model px) resolved inside the halo without recomputation;
# larger foreground components are recomputed on a bigger window (see pipeline/stitch/grown.py).
DEFAULT_CLUSTER_MARGIN = 64
DEFAULT_TILE_SIZE = 1024


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def halo_for(net: NetConfig, cluster_margin: int = DEFAULT_CLUSTER_MARGIN) -> int:
    """Halo = receptive-field margin + room for a nucleus cluster, on the pooling grid."""
    from models.inference import context_margin  # torch: not needed to read the defaults

    return context_margin(net) + round_up(cluster_margin, net.size_multiple)


def plan_tiles(shape: tuple[int, int], tile_size: int, halo: int, multiple: int,
               edge_halo: int | None = None) -> list[Tile]:
    """Row-major grid of tiles over an image of ``shape`` (model pixels).

    Windows are the core grown by ``halo``, except where the core meets the image border:
    there only ``edge_halo`` (the receptive-field margin; no nucleus lies beyond the
    image) is added past the border, and the last row/column's window ends at the core's
    end rounded up to ``multiple``. Why: at tile 1024 a full window on a 100-px wide last
    column computes 14x the pixels it keeps. Every window still starts and ends on the
    pooling grid, which is all that exact stitching needs.
    """
    if tile_size <= 0 or tile_size % multiple:
        raise ConfigError(f"tile size {tile_size} must be a positive multiple of {multiple}")
    edge = halo if edge_halo is None else edge_halo
    if halo % multiple or edge % multiple:
        raise ConfigError(f"halo {halo} and edge halo {edge} must be multiples of {multiple}")
    height, width = shape
    tiles = []
    rows = -(-height // tile_size)
    cols = -(-width // tile_size)
    for row in range(rows):
        for col in range(cols):
            y0, x0 = row * tile_size, col * tile_size
            core = Box(y0, x0, min(y0 + tile_size, height), min(x0 + tile_size, width))
            window = Box(y0 - (edge if row == 0 else halo), x0 - (edge if col == 0 else halo),
                         round_up(core.y1, multiple) + (edge if row == rows - 1 else halo),
                         round_up(core.x1, multiple) + (edge if col == cols - 1 else halo))
            tiles.append(Tile(len(tiles), row, col, core, window))
    return tiles


def aligned_window(box: Box, margin: int, multiple: int) -> Box:
    """Smallest pooling-grid-aligned window that holds ``box`` grown by ``margin``."""
    grown = box.grow(margin)
    y0 = (grown.y0 // multiple) * multiple
    x0 = (grown.x0 // multiple) * multiple
    return Box(y0, x0, y0 + round_up(grown.y1 - y0, multiple), x0 + round_up(grown.x1 - x0, multiple))
