"""docs/design.md's module map against the code: every import between the project's parts
(module-level and inside functions) must be one the map allows."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline.cluster", "pipeline.slide_run", "pipeline.writers", "pipeline.measure",
            "pipeline.slide", "pipeline.stitch")


def part_of(module: str) -> str:
    """The map's part of a module: ``models``, a subpackage of ``pipeline``, or the module."""
    if module == "models" or module.startswith("models."):
        return "models"
    for package in PACKAGES:
        if module == package or module.startswith(package + "."):
            return package
    return module


def declared() -> dict[str, set[str]]:
    text = (REPO / "docs" / "design.md").read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    rules: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        rules[cells[0].strip("`")] = set(re.findall(r"`([\w.]+)`", cells[2]))
    return rules


def imports() -> dict[str, set[str]]:
    """Part -> the other parts its modules import."""
    found: dict[str, set[str]] = {}
    for path in sorted([*REPO.glob("pipeline/**/*.py"), *REPO.glob("models/**/*.py")]):
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] if node.module != "pipeline" else ["pipeline"]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] in ("pipeline", "models") and part_of(name) != part_of(module):
                    found.setdefault(part_of(module), set()).add(part_of(name))
    return found


def test_every_part_is_on_the_map() -> None:
    rules = declared()
    parts = {part_of(".".join(p.relative_to(REPO).with_suffix("").parts))
             for p in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("models/**/*.py")]
             if p.name != "__init__.py" or f"pipeline.{p.parent.name}" in PACKAGES}
    parts.discard("pipeline.__init__")
    assert sorted(parts - set(rules)) == [], "parts missing from docs/design.md's module map"


def test_imports_follow_the_map() -> None:
    rules = declared()
    assert len(rules) > 20  # the table was found
    wrong = sorted(f"{part} imports {other}" for part, others in imports().items()
                   for other in others - rules.get(part, set()))
    assert wrong == [], "imports the module map does not allow (docs/design.md)"
