"""pipeline.cluster: sizing, config validation, SLURM job scripts (no SLURM needed), the
model-once-per-worker plugin, bounded submission with per-item errors, and recovery from a
worker that dies mid-task. One small LocalCluster (2 processes x 1 thread) is shared."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dask
import numpy as np
import pytest
import torch
from distributed import get_worker

from models.checkpoints import save
from models.config import NetConfig, TargetConfig, WatershedParams
from models.network import NucleusNet
from pipeline.cluster import plugin as cluster_plugin
from pipeline.cluster.client import open_client
from pipeline.cluster.config import ClusterConfig, cluster_config_from, default_lifetime, parse_duration
from pipeline.cluster.errors import ClusterConfigError, JobSubmitError
from pipeline.cluster.layout import (
    LOCAL_GPU_THREADS,
    available_cores,
    plan_layout,
    post_resources,
    predict_resources,
)
from pipeline.cluster.local import local_worker_specs
from pipeline.cluster.plugin import (
    PLUGIN_NAME,
    ModelPlugin,
    get_worker_model,
    load_for_inference,
    register_model,
)
from pipeline.cluster.slurm import slurm_cluster, slurm_cluster_kwargs, slurm_job_script, submit_jobs
from pipeline.cluster.submit import TaskFailure, bounded_map

# The task functions below are pickled by reference: spawned LocalCluster workers inherit
# this process's sys.path, so they import this module.


# ------------------------------------------------------------------------- sizing


@pytest.mark.parametrize("cores, expected", [(1, (1, 1, 1)), (2, (2, 1, 1)), (8, (8, 1, 1)),
                                             (32, (8, 1, 4))])
def test_plan_layout_cpu(cores: int, expected: tuple[int, int, int]) -> None:
    layout = plan_layout(cores, 0)
    assert (layout.cpu_workers, layout.cpu_threads, layout.torch_threads) == expected
    assert layout.n_workers * layout.cpu_threads * layout.torch_threads <= cores
    assert not layout.gpu and layout.cuda_devices == () and predict_resources(layout) is None


@pytest.mark.parametrize("n_gpus", [0, 1, 4])
def test_plan_layout_one_worker_per_gpu_plus_a_cpu_pool(n_gpus: int) -> None:
    layout = plan_layout(32, n_gpus, "auto")
    assert layout.gpu_workers == n_gpus
    assert layout.cuda_devices == tuple(str(i) for i in range(n_gpus))  # each pinned to its own
    if n_gpus:
        assert layout.device == "auto"  # each worker's CUDA_VISIBLE_DEVICES decides
        assert layout.gpu_threads == LOCAL_GPU_THREADS and layout.torch_threads == 1
        # the cores the GPU workers leave are single-threaded post-processing processes
        assert layout.cpu_workers == 32 - n_gpus * LOCAL_GPU_THREADS and layout.cpu_threads == 1
        assert predict_resources(layout) == {"GPU": 1}
    else:
        assert (layout.cpu_workers, layout.torch_threads) == (8, 4)
        assert predict_resources(layout) is None


def test_plan_layout_respects_device_cpu_and_pins_cuda_n() -> None:
    cpu = plan_layout(8, 4, "cpu")
    assert not cpu.gpu and cpu.device == "cpu" and cpu.cpu_workers == 8
    one = plan_layout(8, 4, "cuda:2", visible=("3", "5", "GPU-abc", "7"))
    assert one.cuda_devices == ("GPU-abc",) and one.cpu_workers == 8 - LOCAL_GPU_THREADS
    assert plan_layout(2, 1, "cuda").cpu_workers == 1  # never without a CPU worker
    assert plan_layout(16, 2, "auto", n_workers=3).cpu_workers == 3
    with pytest.raises(ClusterConfigError, match="no CUDA device"):
        plan_layout(8, 0, "cuda")
    with pytest.raises(ClusterConfigError, match="cuda:0..cuda:1"):
        plan_layout(8, 2, "cuda:2")


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Make torch report ``n`` CUDA devices (no CUDA needed)."""

    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")
    return fake


@pytest.mark.parametrize("n_gpus", [0, 1, 4])
def test_config_layout_follows_the_machine_and_device_flag(fake_gpus, monkeypatch: pytest.MonkeyPatch,
                                                           n_gpus: int) -> None:
    fake_gpus(n_gpus)
    auto = cluster_config_from({"cluster": "local"}).layout()
    assert auto.gpu_workers == n_gpus and auto.n_workers == (n_gpus + 16 - 2 * n_gpus if n_gpus else 8)
    # --device cpu: a CPU layout even on a CUDA machine
    cpu = cluster_config_from({"cluster": "local", "device": "cpu"}).layout()
    assert (cpu.gpu_workers, cpu.cpu_workers, cpu.device) == (0, 8, "cpu")
    if n_gpus:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7"[: 2 * n_gpus - 1])
        assert ClusterConfig(device="cuda").layout().cuda_devices == ("4", "5", "6", "7")[:n_gpus]


def test_local_worker_specs_pin_gpus_and_hide_them_from_the_pool() -> None:
    specs = local_worker_specs(plan_layout(8, 2, "auto", visible=("2", "3")), memory_limit="1GiB")
    assert sorted(specs) == ["cpu-0", "cpu-1", "cpu-2", "cpu-3", "gpu-0", "gpu-1"]
    for i, device in enumerate(("2", "3")):
        options = specs[f"gpu-{i}"]["options"]
        assert options["env"] == {"CUDA_VISIBLE_DEVICES": device} and options["resources"] == {"GPU": 1}
        assert options["nthreads"] == LOCAL_GPU_THREADS
    pool = specs["cpu-0"]["options"]
    # the pool advertises POOL (post-processing tasks ask for it), never GPU
    assert pool["env"] == {"CUDA_VISIBLE_DEVICES": ""} and pool["resources"] == {"POOL": 1}
    assert pool["nthreads"] == 1
    cpu_only = local_worker_specs(plan_layout(2, 0))
    assert sorted(cpu_only) == ["cpu-0", "cpu-1"] and "env" not in cpu_only["cpu-0"]["options"]
    assert "resources" not in cpu_only["cpu-0"]["options"]


def test_post_processing_goes_to_the_pool_only_where_there_is_one() -> None:
    assert post_resources(plan_layout(8, 2, "auto")) == {"POOL": 1}
    assert post_resources(plan_layout(8, 0)) is None  # CPU layout: one task per batch
    assert post_resources(plan_layout(8, 2, "cpu")) is None
    assert post_resources(None) is None  # attached scheduler: workers unknown


def test_available_cores_follows_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert available_cores() == 3
    layout = ClusterConfig(device="cpu").layout()
    assert (layout.cpu_workers, layout.cpu_threads, layout.torch_threads) == (3, 1, 1)


def test_layout_explicit_workers_share_cores() -> None:
    layout = ClusterConfig(n_workers=2, device="cpu").layout(cores=8)
    assert (layout.cpu_workers, layout.cpu_threads, layout.torch_threads) == (2, 1, 4)
    slurm = ClusterConfig(kind="slurm", jobqueue={"cores": 8, "memory": "8GB"}).layout()
    # one task thread, torch gets the job's cores
    assert (slurm.gpu_workers, slurm.cpu_workers, slurm.cpu_threads, slurm.torch_threads) == (0, 1, 1, 8)
    gpu = ClusterConfig(kind="slurm", jobqueue={"cores": 8, "memory": "8GB"}, gpus_per_worker=1,
                        jobs=3).layout()
    assert (gpu.gpu_workers, gpu.gpu_threads, gpu.cpu_workers, gpu.torch_threads) == (3, 4, 0, 1)
    assert predict_resources(gpu) == {"GPU": 1}


class _Recorder:
    """Stands in for a Client: keeps the plugin register_model would send to the workers."""

    def register_plugin(self, plugin, name: str) -> None:
        self.plugin, self.name = plugin, name


def test_register_model_follows_the_layout(fake_gpus, tiny_model: Path) -> None:
    fake_gpus(2)
    client = _Recorder()
    plugin = register_model(client, tiny_model, ClusterConfig())
    assert client.name == PLUGIN_NAME
    assert (plugin.device, plugin.cpu_inference, plugin.torch_threads) == ("auto", False, 1)
    plugin = register_model(client, tiny_model, ClusterConfig(), device="cpu")
    assert (plugin.device, plugin.cpu_inference, plugin.torch_threads) == ("cpu", True, 2)


# ------------------------------------------------------------------------- durations


@pytest.mark.parametrize("text, seconds", [("00:10:00", 600), ("10:00", 600), ("1-00", 86400),
                                           ("2-03:04:05", 183845), ("3h50m", 13800), ("230m", 13800),
                                           ("13800s", 13800), (3600, 3600), ("1.5h", 5400)])
def test_parse_duration(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_refuses_bare_number_string() -> None:
    with pytest.raises(ValueError, match="ambiguous"):
        parse_duration("60")


def test_default_lifetime_below_walltime() -> None:
    assert default_lifetime(4 * 3600) == (13800, 300)  # 3h50m +- 5m
    for walltime in (120, 600, 1800, 86400):
        lifetime, stagger = default_lifetime(walltime)
        assert 0 < lifetime and lifetime + stagger < walltime


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="cloud"), "kind"),
    (dict(n_workers=0), "n_workers"),
    (dict(device="tpu"), "device"),
    (dict(kind="address"), "scheduler"),
    (dict(kind="address", scheduler="not an address"), "scheduler"),
    (dict(kind="local", scheduler="tcp://h:8786"), "only meaningful"),
    (dict(kind="slurm", jobqueue={"memory": "lots"}), "memory"),
    (dict(kind="slurm", jobqueue={"memory": "100MB"}), "256 MiB"),
    (dict(kind="slurm", jobqueue={"walltime": "soon"}), "walltime"),
    (dict(kind="slurm", jobqueue={"walltime": "00:01:00"}), "2 minutes"),
    (dict(kind="slurm", jobqueue={"walltime": "01:00:00"}, lifetime="58m", lifetime_stagger="5m"),
     "below the walltime"),
    (dict(kind="slurm", jobqueue={"cores": 4, "processes": 3}), "divide"),
    (dict(kind="slurm", jobqueue={"cores": 2, "processes": 2}, gpus_per_worker=1), "GPU"),
    (dict(kind="slurm", jobqueue={"cores": 4}, gpus_per_worker=2), "must be 0 or 1"),
    (dict(kind="slurm", gpus_per_worker=1, device="cpu"), "no task uses"),
    (dict(kind="slurm", jobqueue={"cores": 2}, threads_per_worker=4), "exceed"),
    (dict(kind="slurm", minimum_jobs=1), "maximum_jobs"),
    (dict(kind="slurm", minimum_jobs=3, maximum_jobs=2), "minimum_jobs"),
    (dict(kind="slurm", scheduler_interface="lo", scheduler_host="x"), "not both"),
    (dict(kind="slurm", jobqueue={"queu": "debug"}), "no dask-jobqueue setting"),
])
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ClusterConfigError, match=match):
        ClusterConfig(**kwargs)


def test_config_from_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("cluster:\n  kind: slurm\n  queue: gpu\n  walltime: 04:00:00\n  cores: 8\n"
                    "  memory: 64GB\n  gpus-per-worker: 1\n  job_script_prologue:\n"
                    "    - module load cuda\n")
    cfg = cluster_config_from({"model": "dense", "out": "x", "workers": 3, "device": None}, path)
    # YAML reads 04:00:00 as the integer 14400: it must come back as a SLURM time
    assert cfg.jobqueue["walltime"] == "04:00:00"
    assert cfg.kind == "slurm" and cfg.jobs == 3 and cfg.gpus_per_worker == 1
    assert cfg.jobqueue["job-script-prologue"] == ["module load cuda"]
    # CLI flags override the file
    local = cluster_config_from({"cluster": "local", "workers": 2, "cluster_config": str(path)})
    assert local.kind == "local" and local.n_workers == 2
    # --scheduler alone means "attach"
    attach = cluster_config_from({"scheduler": "tcp://10.0.0.1:8786"})
    assert attach.kind == "address"
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"kind": "slurm", "walltime": "00:30:00", "cores": 2, "memory": "2GB"}))
    assert cluster_config_from(file=json_path).jobqueue["cores"] == 2


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: slurm\nqueu: debug\n")
    with pytest.raises(ClusterConfigError, match="unknown cluster option 'queu'"):
        cluster_config_from(file=bad)
    with pytest.raises(ClusterConfigError, match="cannot|No such"):
        cluster_config_from(file=tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [slurm\n")
    with pytest.raises(ClusterConfigError, match="not valid YAML"):
        cluster_config_from(file=broken)


# ------------------------------------------------------------------------- SLURM job scripts


def _job_script(jobqueue: dict | None = None, **kwargs) -> str:
    base = {"queue": "gpu", "account": "myproj", "walltime": "04:00:00", "cores": 8, "memory": "64GB",
            "interface": "lo"}
    return slurm_job_script(ClusterConfig(kind="slurm", jobqueue={**base, **(jobqueue or {})},
                                          dashboard_address=":0", **kwargs))


def test_job_script_directives_and_worker_command() -> None:
    script = _job_script({"log_directory": None, "python": "/opt/venv/bin/python", "job_name": "wsi-nuclei",
                          "job_script_prologue": ("module load cuda", "source /opt/venv/bin/activate")},
                         gpus_per_worker=1)
    lines = script.splitlines()
    for directive in ("#SBATCH -p gpu", "#SBATCH -A myproj", "#SBATCH -t 04:00:00", "#SBATCH -n 1",
                      "#SBATCH --cpus-per-task=8", "#SBATCH --gres=gpu:1", "#SBATCH -J wsi-nuclei"):
        assert directive in lines, (directive, script)
    assert any(line.startswith("#SBATCH --mem=") for line in lines)
    # the prologue comes before the worker command, in order
    worker = next(i for i, line in enumerate(lines) if "distributed.cli.dask_worker" in line)
    assert lines.index("module load cuda") < lines.index("source /opt/venv/bin/activate") < worker
    command = lines[worker]
    assert command.startswith("/opt/venv/bin/python -m distributed.cli.dask_worker")
    # processes=1: one worker process (no --nworkers), 4 task threads on a GPU worker
    assert "--nworkers" not in command and "--nthreads 4" in command
    assert "--resources GPU=1" in command
    assert "--lifetime 230m --lifetime-stagger 5m" in command
    assert "--local-directory ${TMPDIR:-/tmp}" in command and "--interface lo" in command


def test_job_script_cpu_defaults_and_skip() -> None:
    script = _job_script({"queue": None, "account": None, "job_directives_skip": ("--mem",)},
                         local_directory="/scratch/$USER", lifetime="off")
    assert "#SBATCH -p" not in script and "#SBATCH -A" not in script
    assert "#SBATCH --mem" not in script and "--gres" not in script and "GPU=" not in script
    assert "--lifetime" not in script
    assert "--nthreads 1 " in script  # one task thread; torch uses the job's 8 cores
    assert "--local-directory /scratch/$USER" in script


def test_missing_interface_on_submit_host_is_explained() -> None:
    cfg = ClusterConfig(kind="slurm", jobqueue={"interface": "ib-does-not-exist"}, dashboard_address=":0")
    with pytest.raises(ClusterConfigError, match="scheduler_interface"):
        slurm_cluster_kwargs(cfg)
    ok = slurm_cluster_kwargs(ClusterConfig(kind="slurm", jobqueue={"interface": "ib-does-not-exist"},
                                            scheduler_interface="lo"))
    assert ok["scheduler_options"]["interface"] == "lo" and ok["interface"] == "ib-does-not-exist"


THEIRS = {  # what an HPC user writes in ~/.config/dask/jobqueue.yaml (or DASK_JOBQUEUE__SLURM__*)
    "jobqueue.slurm.queue": "their-q", "jobqueue.slurm.account": "their-acct",
    "jobqueue.slurm.walltime": "02:00:00", "jobqueue.slurm.cores": 4, "jobqueue.slurm.memory": "6GB",
    "jobqueue.slurm.job-extra-directives": ["--constraint=avx2"], "jobqueue.slurm.name": "their-name",
    "jobqueue.slurm.job-script-prologue": ["module load their-python"],
    "jobqueue.slurm.worker-extra-args": ["--no-dashboard"],
}


def test_jobqueue_config_fills_what_our_file_leaves_out() -> None:
    with dask.config.set(THEIRS):
        config = ClusterConfig(kind="slurm", jobqueue={"interface": "lo"}, dashboard_address=":0")
        script = slurm_job_script(config)
    lines = script.splitlines()
    for directive in ("#SBATCH -p their-q", "#SBATCH -A their-acct", "#SBATCH -t 02:00:00",
                      "#SBATCH --constraint=avx2", "#SBATCH -J their-name", "#SBATCH --cpus-per-task=4",
                      "#SBATCH --mem=6G"):
        assert directive in lines, (directive, script)
    assert "module load their-python" in lines
    command = next(line for line in lines if "distributed.cli.dask_worker" in line)
    # their worker arguments, then ours; the lifetime follows their walltime (2 h - 10 min)
    assert "--no-dashboard" in command and "--lifetime 110m --lifetime-stagger 5m" in command
    assert "--local-directory ${TMPDIR:-/tmp}" in command  # theirs is unset: node scratch


def test_our_cluster_file_overrides_jobqueue_config(tmp_path: Path) -> None:
    ours = tmp_path / "cluster.yaml"
    ours.write_text("cluster:\n  kind: slurm\n  queue: our-q\n  account: our-acct\n  walltime: 01:00:00\n"
                    "  cores: 2\n  job_extra_directives: ['--constraint=gpu']\n  job_script_prologue: []\n"
                    "  interface: lo\n  dashboard_address: ':0'\n")
    with dask.config.set(THEIRS):
        script = slurm_job_script(cluster_config_from(file=ours))
    lines = script.splitlines()
    for directive in ("#SBATCH -p our-q", "#SBATCH -A our-acct", "#SBATCH -t 01:00:00",
                      "#SBATCH --constraint=gpu", "#SBATCH --cpus-per-task=2",
                      "#SBATCH -J their-name", "#SBATCH --mem=6G"):  # the last two: not in our file
        assert directive in lines, (directive, script)
    assert "--constraint=avx2" not in script and "their-python" not in script
    assert "--lifetime 50m" in script  # from our walltime


SHIPPED_CLUSTER_FILE = Path(__file__).resolve().parents[1] / "workflows" / "slurm" / "cluster.yaml"
SITE_ENV = {  # a site's dask-jobqueue configuration, as environment variables
    "DASK_JOBQUEUE__SLURM__QUEUE": "site-cpu", "DASK_JOBQUEUE__SLURM__CORES": "16",
    "DASK_JOBQUEUE__SLURM__MEMORY": "64GB", "DASK_JOBQUEUE__SLURM__WALLTIME": "08:00:00",
    "DASK_JOBQUEUE__SLURM__SCHEDULER_OPTIONS__DASHBOARD_ADDRESS": ":0",
}


@pytest.fixture
def site_jobqueue_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``SITE_ENV`` in the environment and in dask's configuration, both restored after."""
    for name, value in SITE_ENV.items():
        monkeypatch.setenv(name, value)
    dask.config.refresh()
    yield
    for name in SITE_ENV:
        monkeypatch.delenv(name)
    dask.config.refresh()


def test_site_jobqueue_config_wins_over_the_shipped_cluster_file(site_jobqueue_env) -> None:
    """The shipped cluster file (what run-dask-slurm.sh passes) names no dask-jobqueue key:
    the site's queue, walltime, cores, memory and dashboard apply; a value the user names
    in their own file or on the command line still wins."""
    config = cluster_config_from({"cluster": "slurm"}, SHIPPED_CLUSTER_FILE)
    lines = slurm_job_script(config).splitlines()
    for directive in ("#SBATCH -p site-cpu", "#SBATCH -t 08:00:00", "#SBATCH --cpus-per-task=16",
                      "#SBATCH --mem=60G"):  # 64 GB = 59.6 GiB
        assert directive in lines, (directive, lines)
    assert slurm_cluster_kwargs(config)["scheduler_options"]["dashboard_address"] == ":0"
    named = cluster_config_from({"cluster": "slurm", "queue": "mine", "workers": 3}, SHIPPED_CLUSTER_FILE)
    assert (named.slurm_value("queue"), named.slurm_value("cores"), named.jobs) == ("mine", 16, 3)
    assert "#SBATCH -p mine" in slurm_job_script(named).splitlines()
    assert slurm_cluster_kwargs(ClusterConfig(kind="slurm"))["scheduler_options"]["dashboard_address"] == ":0"
    ours = slurm_cluster_kwargs(ClusterConfig(kind="slurm", dashboard_address=":8788"))
    assert ours["scheduler_options"]["dashboard_address"] == ":8788"


# ------------------------------------------------------------------------- failures in one line

CLI_TIMEOUT_S = 90  # each run below must end by itself well within this


def _cli_run(tmp_path: Path, flags: list[str],
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``wsi-nuclei --quiet run`` on a tiny slide in a fresh process (its own Dask config)."""
    from tiny_slides import MODEL, write_slides

    [slide] = write_slides(tmp_path / "slides", ["a.tif"])
    argv = [sys.executable, "-m", "pipeline.cli", "--quiet", "run", str(slide),
            "--out", str(tmp_path / "out"), "--model", MODEL, *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
                          env={**os.environ, **(env or {})})


def test_a_scheduler_address_where_nothing_listens_is_one_line_exit_2(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free port: nothing listens there once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    started = time.monotonic()
    proc = _cli_run(tmp_path, ["--scheduler", address],
                    env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "error" in line]
    assert address in line and "scheduler" in line, line
    assert time.monotonic() - started < 30  # the connect timeout of dask's configuration


def test_a_failing_sbatch_ends_the_run_with_its_error(tmp_path: Path) -> None:
    """sbatch refuses the job (here a fake one on PATH): the run ends within a bounded time
    with sbatch's message in one line, instead of waiting forever for workers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nowhere' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    config = tmp_path / "cluster.yaml"
    config.write_text("cluster:\n  kind: slurm\n  queue: nowhere\n  walltime: '00:10:00'\n  cores: 1\n"
                      "  memory: 1GB\n  jobs: 1\n  interface: lo\n  dashboard_address: ':0'\n")
    started = time.monotonic()
    proc = _cli_run(tmp_path, ["--cluster", "slurm", "--cluster-config", str(config)],
                    env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "invalid partition" in line]
    assert "nowhere" in line and "sbatch" in line, line
    assert time.monotonic() - started < 60


def test_a_job_resubmitted_later_that_sbatch_refuses_ends_the_run(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """sbatch accepts the first job, then refuses the one ``adapt`` submits later (a worker
    retired at its lifetime, or the load grew): the tasks waiting for a worker end within a
    bounded time with sbatch's message in one line, and so does the run, instead of
    waiting forever for a worker that will never come."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    count = tmp_path / "sbatch-calls"
    (bin_dir / "sbatch").write_text(
        f"#!/bin/sh\necho x >> {count}\n"
        f"if [ $(wc -l < {count}) -le 1 ]; then echo 'Submitted batch job 4242'; exit 0; fi\n"
        "echo 'sbatch: error: QOSMaxSubmitJobPerUserLimit' >&2\nexit 1\n")
    (bin_dir / "scancel").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "scancel"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = ClusterConfig(kind="slurm", jobqueue={"interface": "lo", "walltime": "00:10:00"},
                           dashboard_address=":0")
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            with open_client(config) as client:
                client.cluster.scale(2)  # what adapt does when it resubmits (the same path)
                list(bounded_map(client, abs, [-1], 1))  # waits for a worker: none comes
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    started = time.monotonic()
    waiting = threading.Thread(target=run, daemon=True)
    waiting.start()
    waiting.join(timeout=60)
    assert outcome, "still waiting for workers 60 s after sbatch refused the job"
    [error] = outcome
    assert isinstance(error, JobSubmitError), repr(error)
    assert str(error) == ("SLURM worker job refused: sbatch exited 1: "
                          "sbatch: error: QOSMaxSubmitJobPerUserLimit")
    assert time.monotonic() - started < 60


def test_an_sbatch_that_does_not_answer_ends_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stuck sbatch (slurmctld down): the submission gives up after its timeout, and the
    cluster still closes at once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nsleep 20\necho 'Submitted batch job 1'\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = ClusterConfig(kind="slurm", jobqueue={"interface": "lo", "walltime": "00:10:00"},
                           dashboard_address=":0")
    started = time.monotonic()
    with pytest.raises(JobSubmitError, match="did not answer within 2 s"):
        with slurm_cluster(config) as cluster:
            submit_jobs(cluster, 1, timeout=2)
    assert time.monotonic() - started < 15


# ------------------------------------------------------------------------- LocalCluster


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    net = NucleusNet(NetConfig(arch="dual", widths=(4, 8), batchnorm=True))
    return save(path, net, mpp=0.5, watershed=WatershedParams(), targets=TargetConfig())


@pytest.fixture(scope="module")
def client() -> Iterator:
    config = ClusterConfig(kind="local", n_workers=2, threads_per_worker=1, torch_threads=1,
                           memory_limit="1.5GiB", dashboard_address=":0", device="cpu")
    with open_client(config, wait_for_workers=2, timeout=120) as c:
        yield c


def _use_model(i: int) -> tuple[int, int, int, int, tuple[int, ...]]:
    import numpy as np

    from models.inference import predict_batch

    bundle = get_worker_model()
    time.sleep(0.3)  # long enough that both workers get tasks
    plugin = get_worker().plugins[PLUGIN_NAME]
    prob, _ = predict_batch(bundle.net, np.zeros((1, 16, 16, 3), np.uint8))
    return os.getpid(), id(bundle), plugin.loads, torch.get_num_threads(), prob.shape


def test_model_loaded_once_per_worker(client, tiny_model: Path) -> None:
    client.wait_for_workers(2, timeout=120)
    plugin = register_model(client, tiny_model, ClusterConfig(n_workers=2, torch_threads=2, device="cpu"))
    assert plugin.bundle is None  # the client side never loads it
    results = client.gather(client.map(_use_model, range(8), pure=False))
    instances = {(pid, ident) for pid, ident, *_ in results}
    assert len(instances) == 2, results  # 8 tasks, 2 workers, 2 models
    assert {loads for _, _, loads, _, _ in results} == {1}
    assert {threads for *_, threads, _ in results} == {2}  # set by the plugin (Nanny sets 1)
    assert {shape for *_, shape in results} == {(1, 16, 16)}


def test_get_worker_model_without_dask(tiny_model: Path) -> None:
    a = get_worker_model(tiny_model, device="cpu")
    b = get_worker_model(str(tiny_model), device="cpu")
    assert a is b and a.mpp == 0.5
    with pytest.raises(RuntimeError, match="model path"):
        get_worker_model()


def test_model_plugin_setup_without_cluster(tiny_model: Path) -> None:
    class FakeWorker:
        name = "fake"

    plugin = ModelPlugin(tiny_model, device="cpu")
    asyncio.run(plugin.setup(FakeWorker()))
    assert plugin.loads == 1 and plugin.bundle is not None and plugin.bundle.config.widths == (4, 8)
    plugin.teardown(FakeWorker())
    assert plugin.bundle is None


def _slow_square(x: int) -> int:
    time.sleep(0.15)
    if x == 5:
        raise ValueError("bad item 5")
    return x * x


class _SpyClient:
    """Wraps a Client and records, at every submit, how many futures are still unfinished."""

    def __init__(self, client) -> None:
        self.client = client
        self.futures: list = []
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def submit(self, *args, **kwargs):
        with self.lock:
            future = self.client.submit(*args, **kwargs)
            self.futures.append(future)
            alive = sum(not f.done() for f in self.futures)
            self.max_in_flight = max(self.max_in_flight, alive)
            return future


def test_bounded_map_backpressure_and_errors(client) -> None:
    spy = _SpyClient(client)
    consumed = []

    def items():  # lazy: bounded_map must not read ahead more than it submits
        for i in range(12):
            consumed.append(i)
            yield i

    results = {}
    for item, outcome in bounded_map(spy, _slow_square, items(), max_in_flight=3):
        results[item] = outcome
        assert len(consumed) <= len(results) + 3
    assert spy.max_in_flight == 3  # bounded, and the bound was actually used
    assert set(results) == set(range(12))
    failure = results.pop(5)
    assert isinstance(failure, TaskFailure) and isinstance(failure.exception, ValueError)
    assert "bad item 5" in str(failure) and "_slow_square" in failure.traceback
    assert results == {i: i * i for i in range(12) if i != 5}


def _flaky(args: tuple[str, int]) -> int:
    marker, x = args
    if not os.path.exists(marker):
        Path(marker).write_text("failed once")
        raise OSError("transient read error")
    return x + 1


def _negate(x: int) -> int:
    return -x


def test_bounded_map_chains_tasks_per_item(client) -> None:
    """``then``: each item runs through every stage, in order; a failing first stage fails
    the item with its own error, and the other items go on."""
    results = dict(bounded_map(client, _slow_square, range(7), max_in_flight=3,
                               then=[(_negate, None), (str, None)]))
    assert sorted(results) == list(range(7))
    assert {k: v for k, v in results.items() if k != 5} == {k: str(-k * k) for k in range(7) if k != 5}
    assert isinstance(results[5], TaskFailure) and "bad item 5" in str(results[5])


def test_bounded_map_retries(client, tmp_path: Path) -> None:
    marker = str(tmp_path / "flaky")
    [(item, outcome)] = list(bounded_map(client, _flaky, [(marker, 41)], max_in_flight=1, retries=1))
    assert outcome == 42
    [(item, outcome)] = list(bounded_map(client, _flaky, [(str(tmp_path / "f2"), 1)], max_in_flight=1))
    assert isinstance(outcome, TaskFailure) and isinstance(outcome.exception, OSError)


def _die_once(args: tuple[str, int]) -> int:
    marker, x = args
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)  # the worker process dies mid-task
    return x * 10


def test_worker_killed_mid_task_is_recovered(client, tmp_path: Path) -> None:
    marker = str(tmp_path / "died")
    items = [(marker, 4), (str(tmp_path / "never"), 0)]
    Path(items[1][0]).write_text("no death for this one")
    results = dict(bounded_map(client, _die_once, items, max_in_flight=2))
    assert results[items[0]] == 40 and results[items[1]] == 0
    died_pid = int(Path(marker).read_text())
    assert died_pid not in client.run(os.getpid).values()  # that process really is gone
    client.wait_for_workers(2, timeout=120)  # the Nanny restarted it


def test_attach_by_address_and_scheduler_file(client, tmp_path: Path) -> None:
    with open_client(ClusterConfig(kind="address", scheduler=client.scheduler.address)) as attached:
        assert attached.submit(sum, [1, 2], pure=False).result() == 3
    scheduler_file = tmp_path / "scheduler.json"
    client.write_scheduler_file(str(scheduler_file))
    config = cluster_config_from({"scheduler": str(scheduler_file), "workers": 5})
    assert config.kind == "address"
    with open_client(config, wait_for_workers=1, timeout=60) as attached:
        assert attached.submit(sum, [3, 4], pure=False).result() == 7
    # leaving an attached client does not shut the scheduler down
    assert client.submit(sum, [5, 6], pure=False).result() == 11


# ------------------------------------------------------------------------- GPU layouts on a CPU


def _where(_: int) -> tuple[str, str | None]:
    time.sleep(0.05)
    return str(get_worker().name), os.environ.get("CUDA_VISIBLE_DEVICES")


def _name_and_gpus(dask_worker: Any) -> tuple[str, str | None]:
    return str(dask_worker.name), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_predict_tasks_run_only_on_gpu_workers(fake_gpus) -> None:
    """One fake GPU: a worker pinned to it with GPU=1, and a CPU worker that sees none;
    tasks submitted with ``predict_resources`` all run on the GPU worker."""
    fake_gpus(1)
    config = ClusterConfig(kind="local", n_workers=1, memory_limit="1GiB", dashboard_address=":0")
    layout = config.layout()
    assert (layout.gpu_workers, layout.cpu_workers) == (1, 1)
    with open_client(config, wait_for_workers=2, timeout=120) as client:
        info = client.scheduler_info()["workers"].values()
        assert {w["name"]: w["resources"] for w in info} == {"gpu-0": {"GPU": 1}, "cpu-0": {"POOL": 1}}
        env = client.run(_name_and_gpus)
        assert sorted(env.values()) == [("cpu-0", ""), ("gpu-0", "0")]  # the pool never sees a GPU
        placed = dict(bounded_map(client, _where, range(8), max_in_flight=8,
                                  resources=predict_resources(layout)))
        assert set(placed.values()) == {("gpu-0", "0")}, placed
        anywhere = dict(bounded_map(client, _where, range(8), max_in_flight=8))
        assert len(anywhere) == 8


def test_cpu_worker_of_a_gpu_layout_refuses_inference(tiny_model: Path) -> None:
    from models.inference import predict_batch

    class FakeWorker:
        name = "cpu-0"

    plugin = ModelPlugin(tiny_model, device="cpu", cpu_inference=False)
    asyncio.run(plugin.setup(FakeWorker()))
    assert plugin.bundle is not None and plugin.bundle.config.widths == (4, 8)  # planning works
    with pytest.raises(RuntimeError, match="predict_resources"):
        predict_batch(plugin.bundle.net, np.zeros((1, 16, 16, 3), np.uint8))

    class FakeGpuWorker:  # advertises GPU: runs the network wherever its model landed
        name = "gpu-0"
        state = SimpleNamespace(total_resources={"GPU": 1})

    plugin = ModelPlugin(tiny_model, device="cpu", cpu_inference=False)
    asyncio.run(plugin.setup(FakeGpuWorker()))
    prob, _ = predict_batch(plugin.bundle.net, np.zeros((1, 16, 16, 3), np.uint8))
    assert prob.shape == (1, 16, 16)


# ------------------------------------------------------------------------- CUDA numerics


@pytest.fixture
def loose_cuda_flags() -> Iterator[None]:
    """PyTorch's fast, non-deterministic settings; the previous ones restored after the test
    (by hand: monkeypatch cannot read these module properties back)."""
    flags = ((torch.backends.cuda.matmul, "allow_tf32", True), (torch.backends.cudnn, "allow_tf32", True),
             (torch.backends.cudnn, "benchmark", True), (torch.backends.cudnn, "deterministic", False))
    saved = [(module, name, getattr(module, name)) for module, name, _ in flags]
    for module, name, value in flags:
        setattr(module, name, value)
    yield
    for module, name, value in saved:
        setattr(module, name, value)


LOOSE = {"cuda.matmul.allow_tf32": True, "cudnn.allow_tf32": True, "cudnn.benchmark": True,
         "cudnn.deterministic": False}


def test_load_for_inference_pins_cuda_numerics(loose_cuda_flags, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.determinism import ENV_VAR, cuda_flags

    loaded: list[str] = []
    def fake_load(model: str, device: torch.device, fold_bn: bool) -> SimpleNamespace:
        loaded.append(str(device))
        return SimpleNamespace(net=torch.nn.Identity(), path=None, sha256="")

    monkeypatch.setattr(cluster_plugin, "load", fake_load)
    monkeypatch.delenv(ENV_VAR, raising=False)
    load_for_inference("m.pt", "cpu")
    assert cuda_flags() == LOOSE  # not touched off CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    load_for_inference("m.pt", "cuda")
    assert cuda_flags() == {"cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": False,
                            "cudnn.benchmark": False, "cudnn.deterministic": True}
    assert loaded == ["cpu", "cuda"]


def test_cuda_numerics_can_be_relaxed(loose_cuda_flags, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.determinism import ENV_VAR, cuda_flags, pin_cuda_numerics

    monkeypatch.setenv(ENV_VAR, "0")
    assert not pin_cuda_numerics("cuda") and cuda_flags() == LOOSE
    monkeypatch.setenv(ENV_VAR, "1")
    assert pin_cuda_numerics("cuda:1") and not cuda_flags()["cudnn.allow_tf32"]


# ------------------------------------------------------------------------- Dask's logs


def test_task_failure_is_one_line_unless_debug(capfd: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Dask's worker prints a "Compute Failed" block with a traceback for every failed
    attempt; we print one line per failed item, and Dask's blocks only with --debug."""
    config = ClusterConfig(kind="local", n_workers=1, threads_per_worker=1, torch_threads=1,
                           memory_limit="1GiB", dashboard_address=":0", device="cpu")
    ours = bounded_map.__module__  # the logger of the one-line reports
    for debug in (False, True):
        caplog.clear()
        with open_client(config, wait_for_workers=1, timeout=120, debug=debug) as client:
            capfd.readouterr()
            with caplog.at_level(logging.DEBUG, logger=ours):
                [(_, outcome)] = list(bounded_map(client, _slow_square, [5], max_in_flight=1, retries=1))
            assert isinstance(outcome, TaskFailure)
            client.run(lambda: None)  # the worker has flushed what it logged for the task
            err = capfd.readouterr().err
        warnings = [r.getMessage() for r in caplog.records if r.name == ours and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "bad item 5" in warnings[0] and "\n" not in warnings[0], warnings
        tracebacks = [r.getMessage() for r in caplog.records if r.name == ours and r.levelno == logging.DEBUG]
        assert any("_slow_square" in t for t in tracebacks)  # shown with --debug (DEBUG level)
        if debug:
            assert err.count("Compute Failed") == 2 and "bad item 5" in err, err  # 2 attempts
        else:
            assert "Compute Failed" not in err and "Traceback" not in err and "bad item 5" not in err, err


def test_tile_task_modules_import_without_anndata() -> None:
    """The modules of tile tasks do not pull in anndata (~1.5 s): only the finalising task
    writes the AnnData table (a worker imports it once, when it starts: ``TASK_MODULES``)."""
    import subprocess
    import sys

    code = ("import importlib, sys; from pipeline.cluster.plugin import TASK_MODULES; "
            "[importlib.import_module(m) for m in TASK_MODULES if m.startswith('pipeline.')]; "
            "print('anndata' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
