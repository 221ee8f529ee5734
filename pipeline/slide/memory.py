"""Slides held in memory (a numpy array) or generated on demand (a pixel callable): tests,
benchmarks."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.errors import SlideReadError
from pipeline.slide.reader import SlideReader
from pipeline.types import Box, Level, SlideInfo

MEMORY_SCHEME = "memory://"
# pyramids of in-memory slides stop once the level fits in this many pixels
MEMORY_COARSEST = 1024

PixelFn = Callable[[int, Box], np.ndarray]


def box_downsample2(rgb: np.ndarray) -> np.ndarray:
    """2x box average (odd edges replicate), rounded: the next level of a memory pyramid."""
    h, w = rgb.shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    if h % 2 or w % 2:
        rgb = np.pad(rgb, pad, mode="edge")
    s = rgb.reshape(rgb.shape[0] // 2, 2, rgb.shape[1] // 2, 2, 3).astype(np.uint16).sum(axis=(1, 3))
    return ((s + 2) // 4).astype(np.uint8)


def _memory_levels(height: int, width: int) -> tuple[Level, ...]:
    """Downsamples 1, 2, 4, ... (sizes ceil-divided) until the level fits MEMORY_COARSEST."""
    levels = [Level(width, height, 1.0)]
    while max(levels[-1].width, levels[-1].height) > MEMORY_COARSEST:
        last = levels[-1]
        levels.append(Level(-(-last.width // 2), -(-last.height // 2), last.downsample * 2))
    return tuple(levels)


class MemorySlide(SlideReader):
    """A slide held in memory (``rgb`` array) or generated on demand (``procedural``).

    ``info.path`` is ``memory://<name>``; ``register_memory_slide`` makes that path
    resolvable by ``open_slide`` in this process (serial executor). In other processes the
    path means nothing: pass the pickled slide itself instead.
    """

    backend = "memory"

    def __init__(self, rgb: np.ndarray, mpp: float | None, name: str | None = None):
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"MemorySlide needs RGB uint8 (h, w, 3), got {rgb.shape} {rgb.dtype}")
        self._fn: PixelFn | None = None
        self._pyramid: list[np.ndarray] = [rgb]
        self._setup(rgb.shape[0], rgb.shape[1], mpp, name, "array")

    @classmethod
    def procedural(cls, height: int, width: int, mpp: float | None, fn: PixelFn,
                   name: str | None = None) -> MemorySlide:
        """A slide whose pixels ``fn(level, box) -> RGB uint8`` are made on demand, so that
        benchmarks can fake gigapixel slides (levels: downsample 1, 2, 4, ... ~1k px)."""
        self = cls.__new__(cls)
        self._fn = fn
        self._pyramid = []
        self._setup(height, width, mpp, name, getattr(fn, "__name__", "procedural"))
        return self

    def _setup(self, height: int, width: int, mpp: float | None, name: str | None,
               kind: str) -> None:
        name = name or f"{kind}-{height}x{width}-{uuid.uuid4().hex[:8]}"
        self.info = SlideInfo(path=MEMORY_SCHEME + name, slide_id=name, width=int(width),
                              height=int(height), mpp=mpp, levels=_memory_levels(height, width),
                              backend=self.backend, vendor="memory",
                              properties={"memory.kind": kind})
        self._lock = threading.Lock()

    def _level_array(self, level: int) -> np.ndarray:
        with self._lock:
            while len(self._pyramid) <= level:
                self._pyramid.append(box_downsample2(self._pyramid[-1]))
            return self._pyramid[level]

    def _read(self, level: int, box: Box) -> np.ndarray:
        if self._fn is not None:
            out = np.asarray(self._fn(level, box))
            if out.shape != (box.height, box.width, 3):
                raise SlideReadError(f"{self.info.path}: pixel function returned {out.shape} "
                                     f"for {box}")
            return out.astype(np.uint8, copy=False)
        return self._level_array(level)[box.slices()].copy()

    def __getstate__(self) -> dict[str, Any]:
        # derived levels are rebuilt on demand: pickles carry level 0 (or the callable) only
        return {"info": self.info, "fn": self._fn,
                "rgb": self._pyramid[0] if self._fn is None else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.info = state["info"]
        self._fn = state["fn"]
        self._pyramid = [] if state["rgb"] is None else [state["rgb"]]
        self._lock = threading.Lock()
