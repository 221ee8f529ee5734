"""The tile grid: cores that partition the model-pixel image, windows with a halo.

Every window has the same size (so windows batch together) and starts on the network's
pooling grid, which is what makes a window's output equal the whole-image output
(see ``models.inference``).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import NetConfig
from models.inference import context_margin
from pipeline.errors import ConfigError
from pipeline.types import Box, Tile

# Largest nucleus cluster (model px) resolved inside the halo without recomputation;
# larger foreground components are recomputed on a bigger window (see stitch.py).
DEFAULT_CLUSTER_MARGIN = 64
DEFAULT_TILE_SIZE = 1024


@dataclass(frozen=True)
class TilingConfig:
    """Tile core size and extra halo beyond the receptive field, in model pixels."""

    tile_size: int = DEFAULT_TILE_SIZE
    cluster_margin: int = DEFAULT_CLUSTER_MARGIN


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def halo_for(net: NetConfig, cluster_margin: int = DEFAULT_CLUSTER_MARGIN) -> int:
    """Halo = receptive-field margin + room for a nucleus cluster, on the pooling grid."""
    return context_margin(net) + round_up(cluster_margin, net.size_multiple)


def plan_tiles(shape: tuple[int, int], tile_size: int, halo: int, multiple: int) -> list[Tile]:
    """Row-major grid of tiles over an image of ``shape`` (model pixels)."""
    if tile_size <= 0 or tile_size % multiple:
        raise ConfigError(f"tile size {tile_size} must be a positive multiple of {multiple}")
    if halo % multiple:
        raise ConfigError(f"halo {halo} must be a multiple of {multiple}")
    height, width = shape
    tiles = []
    rows = -(-height // tile_size)
    cols = -(-width // tile_size)
    for row in range(rows):
        for col in range(cols):
            y0, x0 = row * tile_size, col * tile_size
            core = Box(y0, x0, min(y0 + tile_size, height), min(x0 + tile_size, width))
            window = Box(y0 - halo, x0 - halo, y0 + tile_size + halo, x0 + tile_size + halo)
            tiles.append(Tile(len(tiles), row, col, core, window))
    return tiles


def aligned_window(box: Box, margin: int, multiple: int) -> Box:
    """Smallest pooling-grid-aligned window that holds ``box`` grown by ``margin``."""
    grown = box.grow(margin)
    y0 = (grown.y0 // multiple) * multiple
    x0 = (grown.x0 // multiple) * multiple
    return Box(y0, x0, y0 + round_up(grown.y1 - y0, multiple), x0 + round_up(grown.x1 - x0, multiple))
