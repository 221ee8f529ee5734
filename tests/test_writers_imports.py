"""The writer modules import each other without cycles (function-level imports included):
a cycle hides which module owns a name, and breaks as soon as one import moves to the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pipeline.writers

WRITERS = Path(pipeline.writers.__file__).parent


def _imports(path: Path) -> set[str]:
    """The ``pipeline.writers`` modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline.writers."):
            found.add(node.module.rsplit(".", 1)[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("pipeline.writers.")}
    return found


def test_writer_imports_have_no_cycle() -> None:
    graph = {p.stem: _imports(p) for p in WRITERS.glob("*.py") if p.stem != "__init__"}
    assert {"outlines", "features", "geojson", "labels", "preview", "table"} <= set(graph)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert cycles == [], f"import cycle through {cycles}"
