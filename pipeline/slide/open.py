"""``open_slide``: the reader for a path (OpenSlide first, then tifffile), a reader, or a
registered in-memory slide."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path

from pipeline.errors import ConfigError, SlideReadError
from pipeline.slide.memory import MEMORY_SCHEME, MemorySlide
from pipeline.slide.openslide_reader import OpenSlideReader
from pipeline.slide.reader import SlideReader, one_line
from pipeline.slide.tiff_reader import TiffFileReader
from pipeline.types import SlideInfo

log = logging.getLogger(__name__)

_MEMORY_SLIDES: dict[str, MemorySlide] = {}


def register_memory_slide(slide: MemorySlide) -> str:
    """Make ``slide.info.path`` (``memory://<name>``) openable by ``open_slide`` in this
    process, so the path-based orchestrator can run it with the serial executor."""
    _MEMORY_SLIDES[slide.info.path] = slide
    return slide.info.path


def unregister_memory_slide(path: str) -> None:
    """Forget a registered memory slide (frees its pixels)."""
    _MEMORY_SLIDES.pop(path, None)


def open_slide(path: str | Path | SlideReader, mpp_override: float | None = None) -> SlideReader:
    """OpenSlide first, tifffile when OpenSlide does not recognise the format; a
    ``SlideReader`` or a registered ``memory://`` path is used as is.

    ``mpp_override`` replaces the slide's level-0 mpp (slides without one, or wrong ones).
    Raises ``SlideReadError`` (one line naming the file) when the slide cannot be opened.
    """
    reader = _open(path)
    if mpp_override is not None:
        if not (mpp_override > 0 and math.isfinite(mpp_override)):
            raise ConfigError(f"{reader.info.path}: invalid mpp override {mpp_override}")
        if isinstance(path, SlideReader) or str(path).startswith(MEMORY_SCHEME):
            reader = copy.copy(reader)  # never change the caller's object
        reader.info = dataclasses.replace(reader.info, mpp=float(mpp_override))
    return reader


def _open(path: str | Path | SlideReader) -> SlideReader:
    if isinstance(path, SlideReader):
        return path
    text = str(path)
    if text.startswith(MEMORY_SCHEME):
        try:
            return _MEMORY_SLIDES[text]
        except KeyError:
            raise SlideReadError(f"{text}: memory slide not registered in this process "
                                 "(memory slides work with the serial executor only; "
                                 "pickle the MemorySlide itself for other processes)") from None
    p = Path(text)
    if not p.exists():
        raise SlideReadError(f"{text}: file not found")
    if p.is_dir() and p.suffix.lower() != ".mrxs":
        raise SlideReadError(f"{text}: is a folder, not a slide file")
    first: Exception | None = None
    try:
        reader = OpenSlideReader(text)
        if not _is_ome_generic_tiff(reader.info):
            return reader
        # OpenSlide reads a tiled OME-TIFF as generic-tiff, ignoring its SubIFD pyramid
        # and its OME pixel size: tifffile understands both
        reader.close()
    except SlideReadError as exc:
        # unsupported format, or a TIFF OpenSlide recognises but cannot decode (e.g.
        # JPEG-XL tiles): tifffile may still read it
        first = exc.__cause__ or exc
    try:
        reader = TiffFileReader(text)
    except SlideReadError as exc:
        if first is None:
            raise
        raise SlideReadError(f"{text}: not a readable slide (OpenSlide: {one_line(first)}; "
                             f"tifffile: {one_line(exc.__cause__ or exc)})") from first
    if first is not None:
        import openslide

        # a format OpenSlide does not know is routine; one it knows but fails on is not
        level = (logging.INFO if isinstance(first, openslide.OpenSlideUnsupportedFormatError)
                 else logging.WARNING)
        log.log(level, "%s: reading with tifffile (OpenSlide: %s)", text, one_line(first))
    else:
        log.info("%s: reading with tifffile (OME-TIFF)", text)
    return reader


def _is_ome_generic_tiff(info: SlideInfo) -> bool:
    return info.vendor == "generic-tiff" and "<OME" in info.properties.get(
        "tiff.ImageDescription", "")
