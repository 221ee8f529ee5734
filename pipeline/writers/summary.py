"""Per-slide ``summary.json``: the completion marker and the run's numbers.

Why: the orchestrator decides whether a slide is finished by reading this file, and it is
written *last*, after the labels, table, GeoJSON and preview. It is written atomically, so
a present, parseable summary with ``status == "done"`` means every other output is
complete. JSON has no NaN/Infinity (strict parsers reject them), so non-finite numbers
become ``null``; numpy scalars/arrays and paths are converted to plain JSON types.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from pipeline.atomic import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["is_done", "read_summary", "to_json_safe", "write_summary"]


def to_json_safe(value: Any) -> Any:
    """Plain JSON types, with non-finite floats replaced by ``None``."""
    if isinstance(value, Mapping):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [to_json_safe(v) for v in items]
    if isinstance(value, np.ndarray):
        return to_json_safe(value.tolist())
    if isinstance(value, np.generic):
        return to_json_safe(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, PurePath):
        return str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def write_summary(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write ``data`` as sorted, indented JSON atomically."""
    text = json.dumps(to_json_safe(data), sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False)
    atomic_write_text(path, text + "\n")
    log.debug("summary %s (status=%s)", path, data.get("status"))


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The summary as a dict, or None if it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("unreadable summary %s: %s", path, err)
        return None
    return data if isinstance(data, dict) else None


def is_done(path: str | os.PathLike[str]) -> bool:
    """True if the summary exists and says ``"status": "done"``."""
    data = read_summary(path)
    return data is not None and data.get("status") == "done"
