"""The nuclei GeoJSON file: a FeatureCollection streamed to disk and written atomically.

Why streamed: a slide has millions of nuclei; the features arrive one tile at a time as
text made on the workers (``features.feature_texts``), so nothing accumulates in memory.
Why atomic: a present ``nuclei.geojson`` is always complete (a reader never sees half a
file); an interrupted run leaves no file and no temporary.
"""

from __future__ import annotations

import gzip as gzip_module
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pipeline.atomic import temp_name

log = logging.getLogger(__name__)

__all__ = ["GeoJSONWriter"]


class GeoJSONWriter:
    """Stream a FeatureCollection to ``path`` (``.geojson``/``.json``, gzip if ``.gz``).

    Features are written one by one (``write``) or as pre-serialised text (``write_texts``;
    nothing accumulates in memory) to a hidden temporary file in the same folder, renamed
    onto ``path`` when the ``with`` block ends normally and deleted if it raises.
    ``gzip=None`` follows the suffix; an explicit value must agree with it. Gzip output has
    no timestamp, so equal inputs give equal bytes.
    """

    def __init__(self, path: str | os.PathLike[str], gzip: bool | None = None) -> None:
        self.path = Path(path)
        name = self.path.name.lower()
        is_gz = name.endswith(".gz")
        if not name.removesuffix(".gz").endswith((".geojson", ".json")):
            raise ValueError(f"{self.path}: expected a .geojson, .json, .geojson.gz or .json.gz name")
        if gzip is not None and gzip != is_gz:
            raise ValueError(f"{self.path}: gzip={gzip} does not match the file suffix")
        self.gzip = is_gz
        self.count = 0
        self._tmp: Path | None = None
        self._raw: IO[bytes] | None = None
        self._text: io.TextIOWrapper | None = None

    def __enter__(self) -> GeoJSONWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_name(self.path)
        self._raw = open(self._tmp, "wb")
        stream: IO[bytes] = self._raw
        if self.gzip:
            stream = gzip_module.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=6)
        self._text = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
        self._text.write('{"type": "FeatureCollection", "features": [')
        return self

    def write(self, feature: Mapping[str, Any]) -> None:
        """Append one feature (must be JSON-serialisable without NaN)."""
        self.write_texts([json.dumps(feature, allow_nan=False, separators=(",", ":"), ensure_ascii=False)])

    def write_texts(self, texts: Sequence[str]) -> None:
        """Append features given as JSON text, one complete feature object per string
        (e.g. from ``feature_texts``; not parsed again: the caller vouches for them)."""
        if self._text is None:
            raise RuntimeError("GeoJSONWriter.write outside its 'with' block")
        if not len(texts):
            return
        self._text.write(("\n" if self.count == 0 else ",\n") + ",\n".join(texts))
        self.count += len(texts)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._text is None or self._raw is None or self._tmp is None:
            raise RuntimeError("GeoJSONWriter exited without being entered")
        complete = False
        try:
            if exc_type is None:
                self._text.write("\n]}\n")
            self._text.close()  # flushes; writes the gzip trailer (the raw file stays open)
            complete = exc_type is None
        finally:
            self._raw.close()
            self._text = None
            if complete:
                os.replace(self._tmp, self.path)
                log.info("wrote %d features to %s", self.count, self.path)
            else:
                self._tmp.unlink(missing_ok=True)
                log.warning("GeoJSON %s not written (interrupted)", self.path)
