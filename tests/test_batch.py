"""Slides of a run overlap on a cluster: several are in flight at once, outcomes keep the
order of the slides, and a plain loop is kept for in-process runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from pipeline.commands_run import _run_slides


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt) for the test: a non-interactive
    shell starts background jobs with SIGINT ignored, and a test run launched that way
    (``nohup .ci/run &``) would never see the Ctrl-C these tests send."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


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


def test_ctrl_c_stops_running_slides_at_their_next_tile(ctrl_c_raises: None) -> None:
    """Ctrl-C while two slides run: both end at their next tile (not when finished), the
    queued one never starts, and KeyboardInterrupt reaches the caller within a tile's time.
    (It used to wait for every running slide to finish: minutes on real slides.)"""
    import os
    import signal


    started: list[str] = []
    finished: list[str] = []

    def slow(path: str, cfg: object, executor: object, progress, name: str) -> str:
        started.append(name)
        for i in range(1, 101):  # 100 tiles of 50 ms
            time.sleep(0.05)
            progress(i, 100)
        finished.append(name)
        return name

    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))  # a real Ctrl-C
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _run_slides({f"/s/{i}": f"s{i}" for i in range(3)}, None, None, 2, slow)
    assert time.monotonic() - t0 < 2.0
    assert sorted(started) == ["s0", "s1"] and finished == []


def test_an_interrupted_slide_cancels_its_queued_tiles_at_once(tmp_path) -> None:
    """The interrupt raised in a slide's progress report closes its tile generator (on a
    cluster: releases the queued tile futures) before the exception leaves the slide,
    instead of when the traceback holding it is freed; the tiles made so far stay in
    ``.work`` for the re-run and no summary claims the slide."""
    from tiny_slides import write_slides

    from pipeline.run import process_slide
    from pipeline.slide_run.config import RunConfig
    from pipeline.slide_run.executors import SerialExecutor, SlideInterrupted

    closed: dict[str, int] = {}

    class Recording(SerialExecutor):
        def map(self, fn, items):
            made = 0
            try:
                for pair in super().map(fn, items):
                    made += 1
                    yield pair
            finally:
                closed[getattr(fn, "__name__", "")] = made

    def interrupt_after_first(done: int, total: int) -> None:
        assert total > 2
        raise SlideInterrupted("a")

    slide = write_slides(tmp_path / "slides", ["a.tif"])[0]
    cfg = RunConfig(model="pruned80.pt", out=str(tmp_path / "out"), tile_size=128, device="cpu")
    with pytest.raises(SlideInterrupted) as caught:
        process_slide(slide, cfg, Recording(), interrupt_after_first)
    assert closed.get("infer_tiles") == 1  # closed while ``caught`` still holds the traceback
    assert caught.value is not None
    assert len(list((tmp_path / "out" / "a" / ".work").glob("tile-*.npz"))) == 1
    assert not (tmp_path / "out" / "a" / "summary.json").exists()


class _Held:
    """A task function held on the worker until the test releases it: a slide stays in the
    phase that runs it (in-process Dask workers share these events with the test)."""

    entered = threading.Event()
    release = threading.Event()

    def __init__(self, real) -> None:
        self.real = real

    def __call__(self, job):
        _Held.entered.set()
        _Held.release.wait(30)
        return self.real(job)


def _hold(monkeypatch, phase: str) -> None:
    import pipeline.run as run
    from pipeline.slide_run import blocks, outputs, plan
    from pipeline.slide_run.executors import NetworkTask

    if phase == "plan":
        monkeypatch.setattr(run, "PREPARE_SLIDE", NetworkTask(_Held(plan.prepare_slide)))
    elif phase == "labels":
        monkeypatch.setattr(blocks, "write_label_block", _Held(blocks.write_label_block))
    else:
        monkeypatch.setattr(outputs, "finalize_slide", _Held(outputs.finalize_slide))


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["plan", "labels", "outputs"])
def test_ctrl_c_stops_slides_in_every_phase(tmp_path, monkeypatch, phase: str, ctrl_c_raises: None) -> None:
    """Ctrl-C while two slides wait on a Dask task of their planning, label blocks or
    outputs (held here as a long task would be): both end within seconds, neither is
    recorded as failed, and KeyboardInterrupt reaches the caller. (Only the tile phase
    stopped; in the others shutdown waited for the running slides' tasks.)"""
    import os
    import signal

    from distributed import Client
    from tiny_slides import write_slides

    from pipeline.run import process_slide
    from pipeline.slide_run.config import RunConfig
    from pipeline.slide_run.executors import DaskExecutor

    _Held.entered.clear()
    _Held.release.clear()
    _hold(monkeypatch, phase)
    slides = write_slides(tmp_path / "slides", ["a.tif", "b.tif"])
    cfg = RunConfig(model="pruned80.pt", out=str(tmp_path / "out"), tile_size=128, device="cpu")
    sent: list[float] = []

    def ctrl_c() -> None:
        if _Held.entered.wait(120):
            time.sleep(0.3)  # both slides reach the held phase
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

    client = Client(processes=False, n_workers=1, threads_per_worker=4, dashboard_address=":0")
    try:
        threading.Thread(target=ctrl_c, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            _run_slides({str(s): s.stem for s in slides}, cfg, DaskExecutor(client), 2, process_slide)
        assert sent and time.monotonic() - sent[0] < 5.0
    finally:
        _Held.release.set()
        client.close()
    for slide in slides:  # interrupted, not failed: no summary claims the slide
        assert not (tmp_path / "out" / slide.stem / "summary.json").exists()
