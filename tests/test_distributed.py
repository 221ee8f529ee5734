"""Issue 6 acceptance: every way of running ``wsi-nuclei run`` gives the serial result.

The real model (dense.pt) segments two small synthetic pyramidal TIFFs (384 x 448 px at
0.25 µm/px, 2 x 2 tiles of 224 px) and each run is compared with one clean serial run
(``--cluster none``) of the same slides: every array of the label store, the Parquet table,
the GeoJSON features, the preview and the summary's counts must be identical.

* a LocalCluster of 2 workers;
* a LocalCluster whose worker is SIGKILLed while it runs a phase-1 task (the task is
  rescheduled; the scheduler's ``remove-worker`` event names it);
* an orchestrator SIGKILLed after slide 1 is done and slide 2 has tiles cached, then re-run:
  slide 1 skipped untouched, slide 2 resumed from exactly the cached tiles;
* real SLURM (``slurm``): Dask workers as SLURM jobs (``--cluster slurm``) and the sbatch
  array (``workflows/slurm/array.sbatch``) running the real ``wsi-nuclei``;
* a corrupt slide fails alone (exit 1, error in its summary, nothing that looks finished).

Functions run on Dask workers (``_executing``) are pickled by reference: spawned workers
inherit ``sys.path`` and import this module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import zarr
from PIL import Image
from slurm_fixtures import Slurm, slurm_fixture  # noqa: F401  (the "slurm" fixture)

from pipeline.cli import main
from pipeline.cluster.client import open_client
from pipeline.cluster.config import ClusterConfig
from pipeline.pyramid_tiff import write_pyramidal_tiff
from pipeline.synthetic import synthetic_he
from pipeline.writers.summary import is_done, read_summary

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "workflows" / "slurm"
UNREADABLE = Path("/work/shared/data/slides/openslide-fixtures/unreadable.svs")

MODEL = "dense.pt"
SHAPE = (384, 448)  # 2 x 2 tiles of TILE (the last row and column are partial)
TILE = 224
SEEDS = {"slide1": 3, "slide2": 4}
N_TILES = 4
RUN_TIMEOUT_S = 600  # the machine is shared with a training job: be patient
# summary fields that must not depend on how (or in how many attempts) a slide was run
SAME_IN_SUMMARY = ("status", "nuclei", "dimensions", "slide", "slide_mpp", "model_mpp", "level_read",
                   "scale", "tissue_area_um2", "tiles_total", "tiles_processed",
                   "tiles_skipped_no_tissue", "clusters_recomputed", "giant_clusters",
                   "label_blocks", "model_sha256", "origin_shift_xy")


# ------------------------------------------------------------------------- slides, runs


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("slides")
    paths = []
    for name, seed in SEEDS.items():
        rgb, _ = synthetic_he(*SHAPE, seed=seed, mpp=0.25)
        paths.append(write_pyramidal_tiff(folder / f"{name}.tif", rgb, mpp=0.25, compression="zlib"))
    return paths


def _args(slides: Sequence[Path], out: Path, *extra: str) -> list[str]:
    return ["--quiet", "run", *map(str, slides), "--model", MODEL, "--out", str(out),
            "--tile-size", str(TILE), "--device", "cpu", *extra]


def _cli_command(slides: Sequence[Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *_args(slides, out, *extra)]


def _main(args: list[str]) -> int:
    """``wsi-nuclei`` in this process, without leaving its environment settings (it quiets
    ``distributed`` through ``DASK_LOGGING__DISTRIBUTED``) to the tests that follow."""
    saved = os.environ.copy()
    try:
        return main(args)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _popen(command: list[str], folder: Path, env: dict[str, str] | None = None
           ) -> tuple[subprocess.Popen, Path]:
    """Start ``command`` with its output in a file (a pipe nobody reads could fill and
    block it); returns the process and the file."""
    log = folder / f"run-{time.monotonic_ns()}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=folder,
                                env=env)
    return proc, log


def _local_config(folder: Path) -> Path:
    """A LocalCluster with one torch thread per worker whatever the machine (see
    ``reference``) that does not fight other test sessions for the dashboard port."""
    path = folder / "local.json"
    path.write_text(json.dumps({"cluster": {"kind": "local", "torch_threads": 1, "dashboard_address": ":0"}}))
    return path


@pytest.fixture(scope="module")
def reference(slides: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One clean serial run: what every other way of running must reproduce.

    Torch runs on one thread here (conftest) as in every worker below (one core per worker):
    the labels do not depend on the thread count, but float sums do in the last bits
    (``mean_probability`` moves by ~3e-9 between 1 and 2 threads), and this comparison is
    exact."""
    assert torch.get_num_threads() == 1
    out = tmp_path_factory.mktemp("reference")
    assert _main(_args(slides, out, "--cluster", "none")) == 0
    for slide in slides:
        summary = _summary(out, slide.stem)
        # the comparisons mean something only if there is something to compare
        assert summary["tiles_processed"] == N_TILES and summary["nuclei"] >= 30, summary
    return out


def _summary(out: Path, name: str) -> dict[str, Any]:
    data = read_summary(out / name / "summary.json")
    assert data is not None, f"no readable {out / name / 'summary.json'}"
    return data


# ------------------------------------------------------------------------- comparison


def _zarr_arrays(path: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}

    def walk(group: zarr.Group) -> None:
        for _, member in group.members():
            if isinstance(member, zarr.Group):
                walk(member)
            else:
                arrays[member.path] = np.asarray(member[...])  # 0-d strings come back as str

    walk(zarr.open_group(str(path), mode="r"))
    return arrays


def _features(folder: Path) -> list[dict[str, Any]]:
    collection = json.loads((folder / "nuclei.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    return collection["features"]


def assert_same_outputs(out: Path, ref: Path, names: Sequence[str]) -> None:
    """``out`` holds exactly the outputs of ``ref`` for these slides."""
    for name in names:
        a, b = out / name, ref / name
        summary, expected = _summary(out, name), _summary(ref, name)
        assert summary["status"] == "done", summary.get("error")
        assert {k: summary.get(k) for k in SAME_IN_SUMMARY} == {k: expected.get(k) for k in SAME_IN_SUMMARY}
        arrays, expected_arrays = _zarr_arrays(a / "nuclei.zarr"), _zarr_arrays(b / "nuclei.zarr")
        assert sorted(arrays) == sorted(expected_arrays)
        assert "labels/nuclei/s0" in arrays
        for key, value in expected_arrays.items():
            assert arrays[key].dtype == value.dtype and arrays[key].shape == value.shape, key
            differ = int((arrays[key] != value).sum())
            assert differ == 0, f"{name}: {key} differs in {differ} element(s)"
        pd.testing.assert_frame_equal(pd.read_parquet(a / "nuclei.parquet"),
                                      pd.read_parquet(b / "nuclei.parquet"))
        features, expected_features = _features(a), _features(b)
        assert len(features) == len(expected_features) == summary["nuclei"]
        assert features == expected_features, f"{name}: GeoJSON features differ"
        assert (np.asarray(Image.open(a / "preview.png")) == np.asarray(Image.open(b / "preview.png"))).all()
        assert not (a / ".work").exists(), f"{name}: .work left behind by a finished slide"


@pytest.mark.slow
def test_comparison_notices_small_differences(reference: Path, tmp_path: Path) -> None:
    """The check used by every test below fails on one changed pixel, value or feature."""
    copy = tmp_path / "copy"
    shutil.copytree(reference / "slide1", copy / "slide1")
    assert_same_outputs(copy, reference, ["slide1"])

    labels = zarr.open_group(str(copy / "slide1" / "nuclei.zarr"), mode="r+")["labels/nuclei/s0"]
    ys, xs = np.nonzero(labels[...])
    labels[int(ys[0]), int(xs[0])] = 0
    with pytest.raises(AssertionError, match="labels/nuclei/s0 differs in 1 element"):
        assert_same_outputs(copy, reference, ["slide1"])

    shutil.rmtree(copy)
    shutil.copytree(reference / "slide1", copy / "slide1")
    table = pd.read_parquet(copy / "slide1" / "nuclei.parquet")
    table.loc[3, "area_px"] += 1
    table.to_parquet(copy / "slide1" / "nuclei.parquet")
    with pytest.raises(AssertionError):
        assert_same_outputs(copy, reference, ["slide1"])

    shutil.rmtree(copy)
    shutil.copytree(reference / "slide1", copy / "slide1")
    geojson = copy / "slide1" / "nuclei.geojson"
    collection = json.loads(geojson.read_text())
    collection["features"][5]["geometry"]["coordinates"][0][1][0] += 1.0
    geojson.write_text(json.dumps(collection))
    with pytest.raises(AssertionError, match="GeoJSON features differ"):
        assert_same_outputs(copy, reference, ["slide1"])


# ------------------------------------------------------------------------- 1. LocalCluster


@pytest.mark.slow
def test_local_cluster_equals_serial(slides: list[Path], reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = _main(_args(slides, out, "--cluster", "local", "--workers", "2",
                      "--cluster-config", str(_local_config(tmp_path))))
    assert code == 0
    assert_same_outputs(out, reference, [s.stem for s in slides])


@pytest.mark.slow
def test_gpu_layout_predicts_on_gpu_workers_and_post_processes_on_the_pool(
        slides: list[Path], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local GPU layout on this CPU machine: torch reports one CUDA device in this process,
    so the cluster gets a worker pinned to it (``GPU=1``; in its own process it finds no
    CUDA and runs the network on the CPU, which is all the routing needs) and a CPU pool
    (``POOL``) whose network refuses to run. Every tile's network work must run on the GPU
    worker, every tile's reading, watershed and writing on the pool, and the outputs must
    be the serial run's."""
    import argparse

    from dask.utils import key_split
    from distributed import get_task_stream

    from pipeline.commands_run import executor_for
    from pipeline.run import process_slide
    from pipeline.slide_run.config import RunConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")  # the GPU worker's 2 threads + a 1-process pool
    args = argparse.Namespace(cluster="local", scheduler=None, workers=None, debug=False,
                              cluster_config=str(_local_config(tmp_path)))
    out = tmp_path / "out"
    cfg = RunConfig(model=MODEL, out=str(out), tile_size=TILE)
    with executor_for(args, MODEL, "auto") as executor:
        assert executor.post_resources == {"POOL": 1}
        names = {addr: w["name"] for addr, w in executor.client.scheduler_info()["workers"].items()}
        assert sorted(names.values()) == ["cpu-0", "gpu-0"]
        with get_task_stream(executor.client) as stream:
            outcomes = [process_slide(slide, cfg, executor) for slide in slides]
    assert [o.status for o in outcomes] == ["done", "done"], [o.error for o in outcomes]
    placed: dict[str, set[str]] = {}
    for record in stream.data:
        placed.setdefault(key_split(record["key"]), set()).add(names.get(record["worker"], "?"))
    assert placed["predict_tiles"] == {"gpu-0"}, placed
    assert placed["read_tiles"] == placed["segment_tiles"] == {"cpu-0"}, placed
    assert "infer_tiles" not in placed
    assert_same_outputs(out, reference, [s.stem for s in slides])
    assert sum(_summary(out, s.stem)["clusters_recomputed"] for s in slides) > 0


# ------------------------------------------------------------------------- 2. killed worker


def _executing(dask_worker: Any) -> tuple[int, list[str]]:
    """(pid, keys of the tasks running now) of a worker; runs on the worker's event loop."""
    return os.getpid(), [str(ts.key) for ts in dask_worker.state.executing]


@pytest.mark.slow
def test_worker_killed_mid_run_gives_the_same_outputs(slides: list[Path], reference: Path,
                                                      tmp_path: Path) -> None:
    """SIGKILL a worker process while it runs ``infer_tiles``: the Nanny restarts it, the
    scheduler reschedules its tasks, and the outputs are those of a clean run.

    The run is ``wsi-nuclei run --scheduler ADDRESS`` (in a thread) attached to a
    LocalCluster that this test owns, so the test can watch the workers and kill one."""
    out = tmp_path / "out"
    config = ClusterConfig(kind="local", n_workers=2, threads_per_worker=1, torch_threads=1,
                           dashboard_address=":0", device="cpu")
    with open_client(config, wait_for_workers=2, timeout=180) as client:
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["code"] = _main(_args(slides, out, "--scheduler", client.scheduler.address))
            except BaseException as exc:  # reported by the main thread
                result["error"] = exc

        runner = threading.Thread(target=run, name="wsi-nuclei-run", daemon=True)
        runner.start()
        work = out / "slide1" / ".work"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        victim: tuple[str, int, list[str]] | None = None
        while victim is None:
            assert runner.is_alive(), f"the run ended before a worker could be killed: {result}"
            assert time.monotonic() < deadline, "no phase-1 task seen running"
            if any(work.glob("tile-*.npz")):  # mid-run: some tiles are already done
                for address, (pid, keys) in client.run(_executing).items():
                    tiles = [k for k in keys if k.startswith("infer_tiles")]
                    if tiles:
                        os.kill(pid, signal.SIGKILL)
                        victim = (address, pid, tiles)
                        break
            time.sleep(0.05)
        runner.join(timeout=RUN_TIMEOUT_S)
        assert not runner.is_alive(), "the run did not finish after the worker was killed"
        assert result.get("code") == 0, result

        address, pid, keys = victim
        removed = [msg for _, msg in client.get_events("all")
                   if isinstance(msg, dict) and msg.get("action") == "remove-worker"
                   and msg.get("worker") == address]
        assert len(removed) == 1, removed
        rescheduled = sorted(str(k) for k in removed[0]["processing-tasks"]
                             if str(k).startswith("infer_tiles"))
        # the tasks the worker held when it died were retried elsewhere (the task seen
        # executing may have finished between the look and the kill: tiles take well under a
        # second with the INT8 runtime, so which one was running is not asserted)
        assert rescheduled, (keys, removed[0])
        print(f"killed worker pid {pid} running {keys}; {len(rescheduled)} phase-1 task(s) rescheduled")
        client.wait_for_workers(2, timeout=180)  # the Nanny replaced it
        assert pid not in client.run(os.getpid).values()
    assert_same_outputs(out, reference, [s.stem for s in slides])


# ------------------------------------------------------------------------- 3. interrupted run


def _wait_then_kill(proc: subprocess.Popen, out: Path, log: Path) -> list[psutil.Process]:
    """SIGKILL ``proc`` once slide1 is done and slide2 has a tile cached; returns the
    processes it had started (Dask workers), taken just before the kill."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    work = out / "slide2" / ".work"
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be interrupted:\n"
                                 f"{log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, "slide2 never got a cached tile"
        if is_done(out / "slide1" / "summary.json") and any(work.glob("tile-*.npz")):
            break
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return children


@pytest.mark.slow
def test_interrupted_run_resumes(slides: list[Path], reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # one slide after another: the kill must find slide1 done and slide2 under way
    command = _cli_command(slides, out, "--cluster", "local", "--workers", "2", "--slides-at-once", "1",
                           "--cluster-config", str(_local_config(tmp_path)))
    proc, log = _popen(command, tmp_path)
    try:
        children = _wait_then_kill(proc, out, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the workers of a killed orchestrator exit by themselves (they watch their parent)
    _, alive = psutil.wait_procs(children, timeout=60)
    for leftover in alive:
        leftover.kill()
    assert not alive, f"processes outlived the killed run: {alive}"

    first = out / "slide1" / "summary.json"
    stat, text = first.stat(), first.read_text()
    cached = sorted(p.name for p in (out / "slide2" / ".work").glob("tile-*.npz"))
    assert 1 <= len(cached) <= N_TILES
    assert not is_done(out / "slide2" / "summary.json")

    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "slide1.tif" in again.stdout and "done (skipped: already done)" in again.stdout
    assert first.stat().st_mtime_ns == stat.st_mtime_ns and first.read_text() == text  # untouched
    resumed = _summary(out, "slide2")
    assert resumed["tiles_from_cache"] == len(cached), (resumed, cached)
    assert_same_outputs(out, reference, [s.stem for s in slides])


# ------------------------------------------------------------------------- 5. corrupt slide


def test_corrupt_slide_fails_alone(tmp_path: Path) -> None:
    if not UNREADABLE.is_file():
        pytest.skip(f"{UNREADABLE} not found (OpenSlide test fixtures of ../shared/data)")
    folder = tmp_path / "slides"
    folder.mkdir()
    bad = folder / "a-unreadable.svs"  # sorts first: the failure must not stop the run
    shutil.copyfile(UNREADABLE, bad)
    rgb, _ = synthetic_he(256, 256, seed=5, mpp=0.25)
    good = write_pyramidal_tiff(folder / "b-good.tif", rgb, mpp=0.25, compression="zlib")
    out = tmp_path / "out"
    args = ["--quiet", "run", str(folder), "--model", MODEL, "--out", str(out), "--tile-size", "256",
            "--cluster", "none"]
    assert _main(args) == 1

    done = _summary(out, good.stem)
    assert done["status"] == "done" and done["nuclei"] > 0
    assert (out / good.stem / "nuclei.parquet").is_file() and not (out / good.stem / ".work").exists()
    failed = _summary(out, "a-unreadable")
    assert failed["status"] == "failed" and failed["slide"] == str(bad)
    assert str(bad) in failed["error"], failed["error"]
    assert not is_done(out / "a-unreadable" / "summary.json")
    leftovers = sorted(p.relative_to(out) for p in (out / "a-unreadable").rglob("*")
                       if p.name != "summary.json" and not p.is_dir())
    assert leftovers == [], f"a failed slide left files that look like results: {leftovers}"
    assert not list((out / "a-unreadable").glob("nuclei.*"))

    # a re-run skips the finished slide and tries the failed one again
    mtime = (out / good.stem / "summary.json").stat().st_mtime_ns
    assert _main(args) == 1
    assert (out / good.stem / "summary.json").stat().st_mtime_ns == mtime
    assert _summary(out, "a-unreadable")["status"] == "failed"


# ------------------------------------------------------------------------- 4. real SLURM


def _prologue() -> list[str]:
    """Lines that give a SLURM job this interpreter's environment."""
    activate = Path(sys.prefix) / "bin" / "activate"
    if activate.is_file():
        return [f"source {activate}"]
    return [f"export PATH={Path(sys.executable).parent}:$PATH"]


def _cancel_named(slurm: Slurm, name: str) -> None:
    leftovers = [slurm.track(job) for job in slurm.jobs_named(name)]
    if leftovers:
        subprocess.run(["scancel", *leftovers], check=False)


@pytest.fixture
def job_name(slurm: Slurm) -> Iterator[str]:
    """A unique SLURM job name; whatever still runs under it is cancelled afterwards."""
    name = f"wsi-nuclei-dist-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    yield name
    _cancel_named(slurm, name)


@pytest.mark.slurm
@pytest.mark.slow
def test_dask_on_slurm_equals_serial(slurm: Slurm, job_name: str, slides: list[Path], reference: Path,
                                     tmp_path: Path) -> None:
    """``--cluster slurm``: the scheduler runs here, the tiles in SLURM worker jobs."""
    started = tmp_path / "jobs-started.txt"
    config = {"cluster": {
        "kind": "slurm", "queue": slurm.partition, "cores": 1, "memory": "3GB", "walltime": "00:15:00",
        "jobs": 2, "job_name": job_name, "interface": "lo", "dashboard_address": ":0", "device": "cpu",
        "log_directory": str(tmp_path / "dask-logs"),
        "job_script_prologue": [*_prologue(), f'echo "$SLURM_JOB_ID" >> {started}'],
    }}
    config_file = tmp_path / "cluster.json"
    config_file.write_text(json.dumps(config))
    out = tmp_path / "out"
    command = _cli_command(slides, out, "--cluster", "slurm", "--cluster-config", str(config_file))
    # the CLI quiets distributed (workers inherit it); its start-up lines are the evidence here
    proc, log = _popen(command, tmp_path, env={**os.environ, "DASK_LOGGING__DISTRIBUTED": "info"})
    seen: set[str] = set()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"--cluster slurm did not finish in {RUN_TIMEOUT_S} s"
            seen.update(slurm.track(job) for job in slurm.jobs_named(job_name))
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-5000:]
    assert seen, "no SLURM job of the Dask cluster was seen in squeue"
    ran = set(started.read_text().split()) if started.exists() else set()
    assert ran and ran <= seen, (ran, seen)  # the worker jobs really started (prologue ran)
    logs = "".join(p.read_text() for p in (tmp_path / "dask-logs").glob("*.err"))
    assert "Registered to:" in logs, logs[-3000:]  # ... and their Dask workers joined
    for job in seen:  # leaving the run cancels the worker jobs
        slurm.wait_gone(job, timeout=120)
    assert_same_outputs(out, reference, [s.stem for s in slides])


@pytest.mark.slurm
@pytest.mark.slow
def test_array_job_runs_the_real_pipeline(slurm: Slurm, job_name: str, slides: list[Path],
                                          reference: Path, tmp_path: Path) -> None:
    """``submit-array.sh`` + ``array.sbatch``: one task per slide, real ``wsi-nuclei run``."""
    listing = tmp_path / "slides.txt"
    listing.write_text("".join(f"{s}\n" for s in slides))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "WSI_NUCLEI_CMD"}  # the real command
    env.update({"MAX_PARALLEL": "2", "WSI_NUCLEI_PROLOGUE": "; ".join(_prologue()),
                "WSI_NUCLEI_ARGS": f"--tile-size {TILE} --device cpu "
                                   f"--cluster-config {_local_config(tmp_path)}"})
    submit = [str(SLURM_DIR / "submit-array.sh"), str(listing), str(out), MODEL, "-p", slurm.partition,
              "--cpus-per-task=1", "--mem=3G", "--time=00:15:00", f"--job-name={job_name}"]
    proc = subprocess.run(submit, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = slurm.track(proc.stdout.strip())
    try:
        slurm.wait_gone(job, timeout=RUN_TIMEOUT_S)
    finally:
        if slurm.queued(job):
            subprocess.run(["scancel", job], check=False)
    for task, slide in enumerate(slides, start=1):
        log = (out / "logs" / f"{job_name}_{job}_{task}.log").read_text()
        assert f"task {task}/2" in log and str(slide) in log, log[-3000:]
        assert _summary(out, slide.stem)["status"] == "done", log[-3000:]
    assert_same_outputs(out, reference, [s.stem for s in slides])
