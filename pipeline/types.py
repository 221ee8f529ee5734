"""Small, pixel-free data types passed between the steps of the slide pipeline.

They pickle cheaply, so Dask tasks carry these (coordinates, paths) and never pixels.
Coordinates: ``(y, x)`` order, half-open boxes, integer pixels. "Level-0" means the
slide's full-resolution pixel grid; "model pixels" means the grid at the model's mpp,
with model pixel (i, j) covering level-0 [i*s, (i+1)*s) x [j*s, (j+1)*s), s = scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Box:
    """Half-open rectangle [y0, y1) x [x0, x1)."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def intersect(self, other: Box) -> Box:
        return Box(max(self.y0, other.y0), max(self.x0, other.x0),
                   min(self.y1, other.y1), min(self.x1, other.x1))

    def is_empty(self) -> bool:
        return self.y1 <= self.y0 or self.x1 <= self.x0

    def grow(self, margin: int) -> Box:
        return Box(self.y0 - margin, self.x0 - margin, self.y1 + margin, self.x1 + margin)

    def shift(self, dy: int, dx: int) -> Box:
        return Box(self.y0 + dy, self.x0 + dx, self.y1 + dy, self.x1 + dx)

    def contains(self, y: int, x: int) -> bool:
        return self.y0 <= y < self.y1 and self.x0 <= x < self.x1

    def slices(self, origin: tuple[int, int] = (0, 0)) -> tuple[slice, slice]:
        """Slices of this box inside an array whose [0, 0] is at ``origin``."""
        return (slice(self.y0 - origin[0], self.y1 - origin[0]),
                slice(self.x0 - origin[1], self.x1 - origin[1]))


@dataclass(frozen=True)
class Level:
    """One pyramid level: size in its own pixels and downsample relative to level 0."""

    width: int
    height: int
    downsample: float


@dataclass(frozen=True)
class SlideInfo:
    """What the pipeline needs to know about a slide, without holding it open."""

    path: str
    slide_id: str  # pipeline.discovery.slide_id: file name without its slide suffix
    width: int  # level 0
    height: int
    mpp: float | None  # level-0 micrometres per pixel (None: unknown)
    levels: tuple[Level, ...]
    backend: str  # "openslide", "tifffile" or "memory"
    vendor: str = ""
    # OpenSlide bounds offset (e.g. MIRAX): QuPath's OpenSlide reader puts its origin here
    bounds_xy: tuple[int, int] = (0, 0)
    properties: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class ReadPlan:
    """How model pixels are obtained from the slide.

    ``scale`` = model mpp / slide level-0 mpp (level-0 pixels per model pixel); the
    pipeline reads pyramid ``level`` (downsample ``level_downsample`` <= scale) and
    resamples by ``scale / level_downsample``. ``shape`` is the model-pixel image size.
    """

    level: int
    level_downsample: float
    scale: float
    mpp: float  # model mpp actually used
    shape: tuple[int, int]  # (height, width) in model pixels

    @property
    def image(self) -> Box:
        """The model-pixel image as a box (windows and grown clusters are clipped to it)."""
        return Box(0, 0, *self.shape)


@dataclass(frozen=True)
class Tile:
    """One unit of work. ``core`` boxes partition the model-pixel image; ``window`` is the
    core grown by the halo (aligned to the network's pooling grid, may reach outside the
    image, where pixels are mirrored)."""

    index: int
    row: int
    col: int
    core: Box
    window: Box
