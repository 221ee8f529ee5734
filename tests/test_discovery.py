"""pipeline.discovery: which files are slides and what their output folders are called,
and ``wsi-nuclei run`` using it (issue #14, point 5: same-named slides in two folders
shared one output folder; OME-TIFFs were named differently by the CLI and the workflows)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from tiny_slides import RUN_FLAGS, results, write_slides

from pipeline import discovery
from pipeline.cli import main
from pipeline.discovery import (
    find_slides,
    output_names,
    owner_conflict,
    read_slide_list,
    slide_id,
    slides_to_run,
)
from pipeline.slide.open import open_slide
from pipeline.slide_run.config import RunConfig, slide_dir


def _sha8(path: Path) -> str:
    """The documented disambiguation: first 8 hex digits of the SHA-1 of the resolved path."""
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]


def _touch(root: Path, *names: str) -> list[Path]:
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        paths.append(path)
    return paths


# ------------------------------------------------------------------------- slide id


@pytest.mark.parametrize("name, expected", [
    ("x.ome.tif", "x"), ("x.OME.TIFF", "x"), ("x.ome.tiff", "x"), ("x.svs", "x"), ("x.SVS", "x"),
    ("a.b.ndpi", "a.b"), ("dir/x.mrxs", "x"), ("x.qptiff", "x"), ("x.tif", "x"),
    ("scan.jpg", "scan"), ("memory://blob", "blob"), (".svs", ".svs"), ("...svs", "...svs"),
])
def test_slide_id(name: str, expected: str) -> None:
    assert slide_id(name) == expected


def test_readers_and_run_use_the_slide_id(tmp_path: Path) -> None:
    """SlideInfo.slide_id (GeoJSON ids) and the default output folder follow the one rule."""
    path, = write_slides(tmp_path, ["scan.ome.tif"])
    with open_slide(path) as reader:
        assert reader.info.slide_id == slide_id(path) == "scan"
    cfg = RunConfig(out=str(tmp_path / "out"))
    assert slide_dir(cfg, path) == tmp_path / "out" / "scan"
    assert slide_dir(cfg, path, "scan-1") == tmp_path / "out" / "scan-1"
    for bad in ("", ".", "..", "a/b", "a\tb"):
        with pytest.raises(ValueError, match="cannot name an output folder"):
            slide_dir(cfg, path, bad)


# ------------------------------------------------------------------------- discovery


def test_find_slides_recursive(tmp_path: Path) -> None:
    root = tmp_path / "in"
    top, ome, deep, upper, dcm, mrxs, qptiff = _touch(root, "b.svs", "a.ome.tif", "sub/deeper/c.svs",
                                                      "sub/D.NDPI", "sub/e.dcm", "f.mrxs", "g.qptiff")
    _touch(root, "notes.txt", "e.png", "._b.svs", ".hidden/h.svs", "x.zarr/0/z.tif",
           "results/slide/preview.svs")
    (root / "loop").symlink_to(root)  # a link cycle ends
    (root / "linked.svs").symlink_to(top)  # the same file twice: listed once
    (tmp_path / "elsewhere").mkdir()
    alias = tmp_path / "elsewhere" / "named-by-link.svs"
    alias.symlink_to(deep)  # a link keeps its own name (its target's name may differ)

    found = find_slides([root, top, root / "sub"], exclude=[root / "results"])
    assert found == sorted([top, ome, deep, upper, dcm, mrxs, qptiff], key=str)
    assert all(p.is_absolute() for p in found)
    assert find_slides([alias]) == [alias]
    assert find_slides([root], suffixes="svs", exclude=[root / "results"]) == [top, deep]
    # relative inputs become absolute paths with the names given
    cwd = os.getcwd()
    try:
        os.chdir(root)
        assert find_slides(["sub/deeper"]) == [deep]
    finally:
        os.chdir(cwd)


def test_find_slides_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope: no such file or folder"):
        find_slides([tmp_path / "nope"])
    _touch(tmp_path, "empty/notes.txt", "empty/.x.svs", "full/a.svs")
    with pytest.raises(FileNotFoundError, match="empty: no slides"):
        find_slides([tmp_path / "full", tmp_path / "empty"])
    with pytest.raises(ValueError, match="no slide suffixes"):
        find_slides([tmp_path / "full"], suffixes=" , ")


# ------------------------------------------------------------------------- names


def test_output_names(tmp_path: Path) -> None:
    a, b, ome, upper, lower, solo = _touch(tmp_path, "a/slide.tif", "b/slide.tif", "c/slide.ome.tif",
                                           "c/Case.svs", "d/case.ndpi", "d/solo.svs")
    names = output_names([a, b, solo])
    assert names == {a: f"slide-{_sha8(a)}", b: f"slide-{_sha8(b)}", solo: "solo"}
    assert output_names([b, solo, a]) == names  # independent of the order of the inputs
    assert output_names([a, solo]) == {a: "slide", solo: "solo"}  # unique: the plain id
    # x.ome.tif has the id of x.tif; ids differing in case only would collide on macOS
    assert output_names([a, ome])[ome] == f"slide-{_sha8(ome)}"
    assert output_names([upper, lower]) == {upper: f"Case-{_sha8(upper)}", lower: f"case-{_sha8(lower)}"}
    again = tmp_path / "a" / ".." / "a" / "slide.tif"  # one file, one name
    assert output_names([a, again, b]) == {a: f"slide-{_sha8(a)}", again: f"slide-{_sha8(a)}",
                                           b: f"slide-{_sha8(b)}"}
    # a slide literally named like a disambiguated one is refused, not merged
    clash, = _touch(tmp_path, f"e/slide-{_sha8(a)}.svs")
    with pytest.raises(ValueError, match="would write to the output folder"):
        output_names([a, b, clash])
    tabbed, = _touch(tmp_path, "f/tab\there.svs")  # would break NAME<TAB>PATH slide lists
    with pytest.raises(ValueError, match="cannot name an output folder"):
        output_names([tabbed])


def test_slides_to_run(tmp_path: Path) -> None:
    a, b = _touch(tmp_path, "in/a/slide.tif", "in/b/slide.tif")
    _touch(tmp_path, "in/out/slide/old.svs")  # inside the run's own output folder: not a slide
    assert slides_to_run([tmp_path / "in"], tmp_path / "in" / "out") == output_names([a, b])
    assert slides_to_run([a], tmp_path / "out", "given") == {a: "given"}
    with pytest.raises(ValueError, match="one slide"):
        slides_to_run([tmp_path / "in"], tmp_path / "in" / "out", "given")
    with pytest.raises(ValueError, match="cannot name"):
        slides_to_run([a], tmp_path / "out", "../up")


def test_owner_conflict(tmp_path: Path) -> None:
    a, b = _touch(tmp_path, "a/slide.tif", "b/slide.tif")
    summary = tmp_path / "out" / "slide" / "summary.json"
    assert owner_conflict(summary, a) is None  # no folder yet
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"status": "done", "slide": str(a)}))
    assert owner_conflict(summary, a) is None
    assert owner_conflict(summary, tmp_path / "a" / ".." / "a" / "slide.tif") is None
    message = owner_conflict(summary, b)
    assert message and str(a) in message and "another slide" in message
    # summaries of older versions may hold the path as typed: only names can be compared
    summary.write_text(json.dumps({"status": "done", "slide": "a/slide.tif"}))
    assert owner_conflict(summary, b) is None
    summary.write_text(json.dumps({"status": "done", "slide": "a/other.tif"}))
    assert owner_conflict(summary, b)


# ------------------------------------------------------------------------- shell entry point


def test_list_and_line_entry_points(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, ome = _touch(tmp_path, "in/a/slide.tif", "in/b/slide.tif", "in/x.ome.tif")
    assert discovery.main(["list", str(tmp_path / "in")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"slide-{_sha8(a)}\t{a}", f"slide-{_sha8(b)}\t{b}", f"x\t{ome}"]
    assert discovery.main(["list", "--suffixes", "svs", str(tmp_path / "in")]) == 2
    assert "no slides (.svs)" in capsys.readouterr().err

    # a list of bare paths is named among its own paths; given names are kept; order kept
    listing = tmp_path / "slides.txt"
    listing.write_text(f"{ome}\n{b}\n{a}\n")
    assert read_slide_list(listing) == [("x", str(ome)), (f"slide-{_sha8(b)}", str(b)),
                                        (f"slide-{_sha8(a)}", str(a))]
    listing.write_text(f"first\t{a}\n{b}\n\n")
    assert read_slide_list(listing) == [("first", str(a)), (f"slide-{_sha8(b)}", str(b)), ("", "")]
    assert discovery.main(["line", str(listing), "2"]) == 0
    assert capsys.readouterr().out == f"slide-{_sha8(b)}\t{b}\n"
    for number in ("3", "4"):  # blank or past the end
        assert discovery.main(["line", str(listing), number]) == 2
        assert f"line {number} is empty or missing" in capsys.readouterr().err
    listing.write_text(f"same\t{a}\nsame\t{b}\n")
    assert discovery.main(["line", str(listing), "1"]) == 2
    assert "share the output name 'same'" in capsys.readouterr().err


# ------------------------------------------------------------------------- wsi-nuclei run


def _main(args: list[str]) -> int:
    """``wsi-nuclei`` in this process, leaving the environment as it was."""
    saved = os.environ.copy()
    try:
        return main(["--quiet", *args])
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.slow
def test_run_same_named_slides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two ``slide.tif`` in two folders: two folders, each slide done with its own count,
    and a folder of another slide is never taken as done nor overwritten."""
    a, b = write_slides(tmp_path, ["a/slide.tif", "b/slide.tif"])
    alone = {}
    for path in (a, b):  # each slide on its own: its true count
        out = tmp_path / f"alone-{path.parent.name}"
        assert _main(["run", str(path), "--out", str(out), "--cluster", "none", *RUN_FLAGS]) == 0
        (slide, status, alone[path]), = results(out).values()
        assert (slide, status) == (str(path), "done")
    assert alone[a] != alone[b] and min(alone.values()) > 0  # the seeds differ: counts tell them apart

    out = tmp_path / "out"
    run = ["run", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--cluster", "none",
           *RUN_FLAGS]
    assert _main(run) == 0
    expected = {f"slide-{_sha8(p)}": (str(p), "done", alone[p]) for p in (a, b)}
    assert results(out) == expected
    capsys.readouterr()
    assert _main(run) == 0  # re-run: each skipped with its own count
    table = capsys.readouterr().out
    for path, name in ((a, f"slide-{_sha8(a)}"), (b, f"slide-{_sha8(b)}")):
        row = next(line for line in table.splitlines() if f"-> {name}/" in line)
        assert row.split()[3] == str(alone[path]) and "skipped: already done" in row
    assert results(out) == expected

    # b alone into a folder where "slide/" holds a's results: refused, a's results intact
    solo = tmp_path / "alone-a"
    before = (solo / "slide" / "summary.json").read_text()
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert _main(["run", str(b), "--out", str(solo), "--cluster", "none", *RUN_FLAGS, *extra]) == 1
        assert "holds the results of another slide" in capsys.readouterr().out
        assert (solo / "slide" / "summary.json").read_text() == before
        assert (solo / "slide" / "nuclei.parquet").is_file()
    # --name puts it elsewhere
    assert _main(["run", str(b), "--out", str(solo), "--name", "b-slide", "--cluster", "none",
                  *RUN_FLAGS]) == 0
    assert results(solo)["b-slide"] == (str(b), "done", alone[b])


def test_run_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _touch(tmp_path, "a/x.svs", "a/y.svs", "empty/readme.txt")
    for args, message in ((["run", str(tmp_path / "empty")], "no slides"),
                          (["run", str(tmp_path / "nope")], "no such file or folder"),
                          (["run", str(tmp_path / "a"), "--name", "n"], "one slide")):
        assert _main([*args, "--out", str(tmp_path / "out"), "--cluster", "none"]) == 2
        assert message in capsys.readouterr().err
