"""Slides of a run overlap on a cluster: several are in flight at once, outcomes keep the
order of the slides, and a plain loop is kept for in-process runs."""

from __future__ import annotations

import threading
import time

from pipeline.commands_run import _run_slides


def _recording_process(active: list[int], peak: list[int], lock: threading.Lock):
    def process(path: str, cfg: object, executor: object, progress, name: str) -> str:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        progress(1, 2)
        time.sleep(0.2 if path.endswith("0") else 0.05)  # the first slide is the slowest
        progress(2, 2)
        with lock:
            active[0] -= 1
        return f"{name}:done"

    return process


def test_slides_overlap_and_keep_their_order() -> None:
    active, peak, lock = [0], [0], threading.Lock()
    slides = {f"/s/{i}": f"slide{i}" for i in range(5)}
    out = _run_slides(slides, None, None, 3, _recording_process(active, peak, lock))
    assert out == [f"slide{i}:done" for i in range(5)]
    assert peak[0] == 3


def test_one_at_a_time_without_a_cluster() -> None:
    active, peak, lock = [0], [0], threading.Lock()
    slides = {f"/s/{i}": f"slide{i}" for i in range(3)}
    out = _run_slides(slides, None, None, 1, _recording_process(active, peak, lock))
    assert out == [f"slide{i}:done" for i in range(3)] and peak[0] == 1


def _many_tiles(path: str, cfg: object, executor: object, progress, name: str) -> str:
    for i in range(1, 201):
        progress(i, 200)
    return name


def test_progress_is_quiet_with_quiet_and_sparse_in_a_log_file(capsys, caplog) -> None:
    """A bar per slide on a terminal; into a file (a SLURM log, pytest's capture) at most one
    line per LOG_PROGRESS_S, not one per tile; nothing at all with --quiet (WARNING)."""
    import logging

    with caplog.at_level(logging.INFO):
        assert _run_slides({"/s/a": "a"}, None, None, 1, _many_tiles) == ["a"]
    shown = capsys.readouterr().err
    assert "a: " in shown and shown.count("\r") <= 3, repr(shown)
    with caplog.at_level(logging.WARNING):
        _run_slides({"/s/a": "a"}, None, None, 1, _many_tiles)
    assert capsys.readouterr().err == ""
