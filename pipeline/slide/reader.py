"""The interface every slide reader implements, and reading around damaged stored tiles.

Readers are picklable: the state is the path (or the array / callable) and the handle is
reopened lazily in the receiving process, because Dask workers are spawned and OpenSlide /
tifffile handles must never be shared across processes.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from pipeline.errors import SlideReadError
from pipeline.types import Box, SlideInfo

log = logging.getLogger(__name__)

DAMAGED_FILL = 255  # white, like glass: the network finds no nuclei in it
DEFAULT_STORED_TILE = (256, 256)  # damage unit when a format does not tell its tile size


class SlideReader(ABC):
    """One slide: ``info`` plus RGB reads of any pyramid level.

    ``read_level`` validates the box so that every backend fails the same way; backends
    implement ``_read`` for a box that is known to lie inside the level.
    """

    info: SlideInfo
    # Reads (or stored tiles, when reading around damage) that succeeded, and how many
    # times a damaged stored tile was filled: callers compare counts before and after
    # their reads. Class-level zeros; ``+=`` makes them per reader.
    reads_ok: int = 0
    damage_fills: int = 0

    def read_level(self, level: int, box: Box) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``box`` in pixels of ``level`` (must lie inside it).

        A read that fails is retried tile by tile on the file's own tile grid; tiles that
        still cannot be read (a damaged JPEG tile) are painted ``DAMAGED_FILL`` and recorded
        in ``damaged``. Because damage is per stored tile, every read that covers a damaged
        tile sees the same fill, so overlapping windows still see identical pixels (exact
        stitching) and only the nuclei on or next to the damage are lost.
        """
        if not 0 <= level < len(self.info.levels):
            raise ValueError(f"level {level} out of range (slide has {len(self.info.levels)})")
        lv = self.info.levels[level]
        if box.is_empty() or box.y0 < 0 or box.x0 < 0 or box.y1 > lv.height or box.x1 > lv.width:
            raise ValueError(f"{box} is empty or not inside level {level} "
                             f"({lv.height} x {lv.width})")
        try:
            out = self._read(level, box)
            self.reads_ok += 1
        except SlideReadError:
            out = self._read_around_damage(level, box)
        if out.shape != (box.height, box.width, 3) or out.dtype != np.uint8:
            raise SlideReadError(f"{self.info.path}: reader returned {out.shape} {out.dtype} "
                                 f"for {box} at level {level}")
        return out

    @abstractmethod
    def _read(self, level: int, box: Box) -> np.ndarray:
        """RGB uint8 of a box inside the level."""

    def tile_shape(self, level: int) -> tuple[int, int]:
        """The (height, width) of the tiles the level is stored in (``DEFAULT_STORED_TILE``
        when the format does not say): the unit in which a file is damaged."""
        return DEFAULT_STORED_TILE

    @property
    def damaged(self) -> dict[tuple[int, Box], str]:
        """``(level, box in level pixels) -> error`` of each stored tile that could not be
        read by this reader (filled with ``DAMAGED_FILL``)."""
        return self.__dict__.setdefault("_damaged", {})


    def _read_around_damage(self, level: int, box: Box) -> np.ndarray:
        self.close()  # e.g. OpenSlide refuses every read after an error: a fresh handle
        out = np.empty((box.height, box.width, 3), np.uint8)
        th, tw = self.tile_shape(level)
        for y in range(box.y0 // th * th, box.y1, th):
            for x in range(box.x0 // tw * tw, box.x1, tw):
                part = Box(max(y, box.y0), max(x, box.x0), min(y + th, box.y1), min(x + tw, box.x1))
                dst = out[part.slices((box.y0, box.x0))]
                cell = Box(y, x, y + th, x + tw)
                if (level, cell) in self.damaged:
                    dst[...] = DAMAGED_FILL
                    self.damage_fills += 1
                    continue
                try:
                    dst[...] = self._read(level, part)
                    self.reads_ok += 1
                except SlideReadError as exc:
                    self.damaged[(level, cell)] = one_line(exc)
                    log.warning("%s: level %d, stored tile at y %d, x %d cannot be read (%s); "
                                "painted as glass", self.info.path, level, y, x, one_line(exc))
                    dst[...] = DAMAGED_FILL
                    self.damage_fills += 1
                    self.close()  # e.g. OpenSlide refuses every read after an error
        return out

    def close(self) -> None:  # noqa: B027 - readers without handles need nothing
        """Release file handles (reads after ``close`` reopen lazily)."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.path!r})"



def one_line(exc: BaseException) -> str:
    """An exception as one short line (error messages must fit one CLI line)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class FileSlideReader(SlideReader):
    """A reader of a slide file whose handles open lazily: it pickles as its path and
    ``info``, and the unpickled copy (a worker's) reopens the file at its first read."""

    path: str

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "info": self.info}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.info = state["info"]
        self._lock = threading.Lock()
        self._forget()

    @abstractmethod
    def _forget(self) -> None:
        """No handle open: the file opens again at the next read."""
