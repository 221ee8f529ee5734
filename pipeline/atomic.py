"""Atomic single-file writes: a temporary name in the same folder, then ``os.replace``.

Why: the pipeline resumes after crashes and pre-emptions by looking at which files exist
(tile caches, GeoJSON, Parquet, ``summary.json``). A file that exists must therefore be
complete. Writing to a temporary name *in the same directory* (so the rename never crosses
a filesystem) and renaming at the end gives exactly that on POSIX filesystems: readers
see either the old file, no file, or the whole new file. On failure the temporary file is
removed, so an interrupted write leaves nothing behind.

Temporary names start with ``.`` and keep the final file name at their end, so libraries
that choose a format from the extension (PIL, ``numpy.savez``) still see ``.png``/``.npz``.
We do not ``fsync``: the goal is consistency after a killed process, not after power loss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
import zipfile
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "save_npz_atomic", "temp_name"]


def temp_name(path: str | os.PathLike[str]) -> Path:
    """A fresh, hidden temporary path next to ``path`` that ends with ``path``'s name."""
    p = Path(path)
    return p.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{p.name}")


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit rename it onto ``path``.

    The body must create the file at the yielded path. If the body raises, the temporary
    file is deleted and ``path`` is left untouched (it keeps any previous content).
    The parent directory is created if needed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_path body did not create {tmp}")
        os.replace(tmp, final)
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (newlines are written as given)."""
    atomic_write_bytes(path, text.encode(encoding))


def save_npz_atomic(path: str | os.PathLike[str], *, level: int = 1, stored: Collection[str] = (),
                    **arrays: np.ndarray) -> None:
    """An ``.npz`` (what ``numpy.load`` reads) of ``arrays`` at ``path``, atomically.

    Deflate ``level`` 1 (0: stored, no compression): a tile's file is written 2-3x faster
    than by ``numpy.savez_compressed`` (level 6) for files about twice its size (measured
    on a 1376² tile: labels 0.028 vs 0.058 s, 283 vs 141 kB). The data go through an open
    file handle, so ``path`` is used exactly as given (no ``.npz`` appended). ``stored``:
    names of arrays written without deflate (packed already).
    """
    method = zipfile.ZIP_DEFLATED if level else zipfile.ZIP_STORED
    with atomic_path(path) as tmp, open(tmp, "wb") as fh, \
            zipfile.ZipFile(fh, "w", compression=method, compresslevel=level or None) as archive:
        for name, value in arrays.items():
            packed = name in stored  # the archive's settings apply to the members opened next
            archive.compression = zipfile.ZIP_STORED if packed else method
            archive.compresslevel = None if packed else (level or None)
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
