"""Which files are slides, and what each slide's output folder is called.

Why one module: ``wsi-nuclei run``, the Snakefile and the SLURM array scripts must agree on
a slide's output folder, or a workflow waits for a folder the CLI never writes (OME-TIFFs
did exactly that), and two slides that share a file name must never share a folder. The
shell scripts reach these rules through ``python -m pipeline.discovery`` (below), and the
module imports only the standard library, so that needs no activated environment.

The rules (README "Outputs", workflows/README.md):

* **slide id**: the file name without its slide suffix (``x.ome.tif`` -> ``x``,
  ``x.svs`` -> ``x``; a name without a known suffix loses its last suffix);
* **output folder**: ``OUT/<slide id>`` when no other slide of the same run has that id
  (ids are compared case-insensitively, for case-insensitive file systems); slides that
  share an id get ``<slide id>-<first 8 hex digits of the SHA-1 of the resolved path>``.
  The names depend only on the set of slides, so a re-run of the same inputs finds its
  folders again;
* **discovery**: files are taken as given; folders are searched recursively (symbolic links
  followed, each folder once) for files with a slide suffix, skipping hidden files and
  folders, ``*.zarr`` folders and the run's own output folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePath

# one entry per format; ``.ome.tif(f)`` are listed so that the slide id drops ``.ome`` too
SLIDE_SUFFIXES: tuple[str, ...] = (".svs", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".ndpi", ".vms",
                                   ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm", ".qptiff")
HASH_DIGITS = 8  # hex digits of the path digest that tell same-named slides apart
URL_MARK = "://"  # in-memory test slides (``memory://name``) are names, not files


def normalise_suffixes(suffixes: str | Iterable[str]) -> tuple[str, ...]:
    """``"svs .NDPI"`` or ``["svs", ".NDPI"]`` -> ``(".svs", ".ndpi")``: the forms users type
    (``SLIDE_EXTENSIONS``, Snakemake's ``extensions``), as matched."""
    items = suffixes.replace(",", " ").split() if isinstance(suffixes, str) else suffixes
    out = tuple("." + s.strip().lower().lstrip(".") for s in items if s.strip().strip("."))
    if not out:
        raise ValueError("no slide suffixes given")
    return out


def is_slide_name(name: str, suffixes: Sequence[str] = SLIDE_SUFFIXES) -> bool:
    """Whether a file found in a folder is a slide (hidden files, e.g. macOS ``._x.svs``, are not)."""
    return not name.startswith(".") and name.lower().endswith(tuple(suffixes))


def slide_id(path: str | os.PathLike[str]) -> str:
    """The file name without its slide suffix (the longest that matches): ``x.ome.tif`` -> ``x``."""
    name = PurePath(str(path)).name
    lower = name.lower()
    matches = [s for s in SLIDE_SUFFIXES if lower.endswith(s) and len(name) > len(s)]
    stem = name[: -len(max(matches, key=len))] if matches else PurePath(name).stem
    return stem if stem not in ("", ".", "..") else name


def find_slides(inputs: Iterable[str | os.PathLike[str]], *, exclude: Iterable[str | os.PathLike[str]] = (),
                suffixes: str | Iterable[str] = SLIDE_SUFFIXES) -> list[Path]:
    """The slides of ``inputs`` (files as given, folders searched recursively), as absolute
    paths that keep the names given (a symbolic link is not replaced by its target, whose
    name may differ), sorted and deduplicated by resolved path.

    ``exclude``: folders never entered (the run's output folder). ``FileNotFoundError``
    names an input that does not exist or a folder that holds no slide.
    """
    wanted = normalise_suffixes(suffixes)
    skip = {Path(e).expanduser().resolve() for e in exclude}
    found: dict[Path, Path] = {}
    for item in inputs:
        root = Path(os.path.abspath(Path(item).expanduser()))
        if not root.exists():
            raise FileNotFoundError(f"{item}: no such file or folder")
        files = list(_walk(root, wanted, skip)) if root.is_dir() else [root]
        if not files:
            raise FileNotFoundError(f"{item}: no slides ({' '.join(wanted)}) in this folder or below")
        for path in files:
            found.setdefault(path.resolve(), path)
    return sorted(found.values(), key=str)


def _walk(root: Path, suffixes: tuple[str, ...], skip: set[Path]) -> Iterator[Path]:
    """Slide files under ``root``; each real folder is visited once (link cycles end)."""
    seen: set[Path] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = Path(folder).resolve()
        if real in seen or real in skip:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.lower().endswith(".zarr"))
        for name in sorted(files):  # sorted: which of two links to one file is kept is fixed
            if is_slide_name(name, suffixes) and (Path(folder) / name).is_file():
                yield Path(folder) / name


def _identity(path: str | os.PathLike[str]) -> str:
    """What makes two paths the same slide: the resolved path (an in-memory name as is)."""
    text = os.fspath(path)
    return text if URL_MARK in text else str(Path(text).resolve())


def output_names(paths: Iterable[str | os.PathLike[str]]) -> dict[str | os.PathLike[str], str]:
    """Output folder name of each slide (keyed by the paths as given): the slide id, or
    ``<id>-<sha1 of the resolved path>`` for ids shared by several slides (module doc).
    Two spellings of one path (``a/../a/x.svs``) get the same name."""
    given = list(paths)
    identity = {p: _identity(p) for p in given}
    holders: dict[str, set[str]] = {}
    for p in given:
        holders.setdefault(slide_id(p).casefold(), set()).add(identity[p])
    names: dict[str | os.PathLike[str], str] = {}
    owner: dict[str, str] = {}
    for p in given:
        sid = slide_id(p)
        digest = hashlib.sha1(identity[p].encode("utf-8", "surrogateescape")).hexdigest()
        names[p] = check_name(sid if len(holders[sid.casefold()]) == 1 else f"{sid}-{digest[:HASH_DIGITS]}")
        first = owner.setdefault(names[p].casefold(), identity[p])
        if first != identity[p]:  # e.g. "a-1234abcd.svs" next to two slides named "a"
            raise ValueError(f"two slides would write to the output folder {names[p]!r}: {first} and "
                             f"{identity[p]}; rename one of them")
    return names


def slides_to_run(inputs: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str],
                  name: str | None = None) -> dict[Path, str]:
    """The slides of ``wsi-nuclei run INPUTS --out OUT [--name NAME]`` with their output
    folder names. ``name`` (one slide only) is how a workflow that found the slide among
    others passes the name it gave it."""
    slides = find_slides(inputs, exclude=[out])
    if name is None:
        return {Path(p): n for p, n in output_names(slides).items()}
    if len(slides) != 1:
        raise ValueError(f"--name names the output folder of one slide, but {len(slides)} slides were given")
    return {slides[0]: check_name(name)}


def check_name(name: str) -> str:
    """``name`` if it can be an output folder name (one path component, no tab or newline:
    slide lists are ``name<TAB>path`` lines), else ``ValueError``."""
    bad = set(name) & {"/", "\\", "\t", "\n", "\r", "\0"}
    if name in ("", ".", "..") or bad:
        raise ValueError(f"{name!r} cannot name an output folder (one folder name, no "
                         f"{' '.join(sorted(map(repr, bad))) or 'empty or dot name'})")
    return name


def owner_conflict(summary_path: str | os.PathLike[str], slide: str | os.PathLike[str]) -> str | None:
    """Why a slide must not use the output folder of ``summary_path``: it holds another
    slide's summary (a run with other inputs, or ``--name``), which would make this slide
    "already done" with the other's results, or be deleted by ``--overwrite``. None if the
    folder is free or this slide's. Summaries of older versions may hold a relative path;
    then only the file names are compared."""
    from pipeline.writers.summary import read_summary  # numpy: not needed by the shell entry point

    data = read_summary(summary_path) or {}
    recorded = data.get("slide")
    if not isinstance(recorded, str) or not recorded:
        return None
    if URL_MARK in recorded or os.path.isabs(recorded):
        same = _identity(recorded) == _identity(slide)
    else:
        same = PurePath(recorded).name == PurePath(os.fspath(slide)).name
    if same:
        return None
    return (f"{Path(summary_path).parent} holds the results of another slide ({recorded}); "
            "choose another --out or --name, or remove that folder")


# --------------------------------------------------------------------------- shell entry point


def read_slide_list(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(name, path)`` for each line of a slide list in file order. A line is
    ``name<TAB>path`` (``list`` below writes these) or a bare path, named among all the
    list's paths as ``wsi-nuclei run`` would name them. Blank lines keep their place (line
    i is array task i) as ``("", "")``."""
    rows: list[tuple[str | None, str]] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        name, tab, rest = line.partition("\t")
        rows.append((check_name(name), rest) if tab else (None, line.strip()))
    named = output_names(p for _, p in rows if p)
    out = [(name if name is not None else named[p], p) if p else ("", "") for name, p in rows]
    owner: dict[str, str] = {}
    for name, p in out:
        if p and owner.setdefault(name.casefold(), _identity(p)) != _identity(p):
            raise ValueError(f"{path}: two slides share the output name {name!r}")
    return out


def _format(name: str, path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if set(text) & {"\t", "\n", "\r"}:
        raise ValueError(f"{text!r}: a path with a tab or newline cannot go in a slide list")
    return f"{name}\t{text}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.discovery list|line ...`` for the shell scripts of workflows/."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.discovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="name<TAB>absolute path of every slide, sorted by path")
    p_list.add_argument("paths", nargs="+", help="slide files and/or folders")
    p_list.add_argument("--suffixes", default=None,
                        help=f"space-separated slide suffixes (default: {' '.join(SLIDE_SUFFIXES)})")
    p_list.add_argument("--exclude", action="append", default=[], help="folder not to search (repeatable)")
    p_line = sub.add_parser("line", help="name<TAB>path of line N (1-based) of a slide list")
    p_line.add_argument("list", help="slide list: name<TAB>path or path lines")
    p_line.add_argument("number", type=int)
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            slides = find_slides(args.paths, exclude=args.exclude, suffixes=args.suffixes or SLIDE_SUFFIXES)
            lines = [_format(name, path) for path, name in output_names(slides).items()]
        else:
            rows = read_slide_list(args.list)
            if not 1 <= args.number <= len(rows) or not rows[args.number - 1][1]:
                raise ValueError(f"{args.list}: line {args.number} is empty or missing")
            lines = [_format(*rows[args.number - 1])]
    except (OSError, ValueError) as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
