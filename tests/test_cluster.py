"""pipeline.cluster: sizing, config validation, SLURM job scripts (no SLURM needed), the
model-once-per-worker plugin, bounded submission with per-item errors, and recovery from a
worker that dies mid-task. One small LocalCluster (2 processes x 1 thread) is shared."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models.checkpoints import save
from models.config import NetConfig, TargetConfig, WatershedParams
from models.network import NucleusNet
from pipeline import cluster as cl
from pipeline.cluster import (
    ClusterConfig,
    ClusterConfigError,
    ModelPlugin,
    TaskFailure,
    bounded_map,
    cluster_config_from,
    get_worker_model,
    local_cluster_size,
    open_client,
    register_model,
)

# The task functions below are pickled by reference: spawned LocalCluster workers inherit
# this process's sys.path, so they import this module.


# ------------------------------------------------------------------------- sizing


@pytest.mark.parametrize("cores, expected", [(1, (1, 1, 1)), (2, (2, 1, 1)), (8, (8, 1, 1)),
                                             (32, (8, 1, 4))])
def test_local_cluster_size_cpu(cores: int, expected: tuple[int, int, int]) -> None:
    n, threads, torch_threads = local_cluster_size(cores)
    assert (n, threads, torch_threads) == expected
    assert n * threads * torch_threads <= cores


@pytest.mark.parametrize("cores", [1, 2, 8, 64])
def test_local_cluster_size_gpu_one_worker(cores: int) -> None:
    n, threads, torch_threads = local_cluster_size(cores, gpu=True)
    assert n == 1 and torch_threads == 1 and 1 <= threads <= min(cores, cl.GPU_TASK_THREADS)


def test_available_cores_follows_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert cl.available_cores() == 3
    assert ClusterConfig(device="cpu").layout() == (3, 1, 1)


def test_layout_explicit_workers_share_cores() -> None:
    cfg = ClusterConfig(n_workers=2, device="cpu")
    assert cfg.layout(cores=8) == (2, 1, 4)
    slurm = ClusterConfig(kind="slurm", cores=8, memory="8GB")
    assert slurm.layout() == (1, 1, 8)  # one task thread, torch gets the job's cores
    gpu = ClusterConfig(kind="slurm", cores=8, memory="8GB", gpus_per_worker=1, jobs=3)
    assert gpu.layout() == (3, 4, 1)
    assert gpu.task_resources() == {"GPU": 1}


# ------------------------------------------------------------------------- durations


@pytest.mark.parametrize("text, seconds", [("00:10:00", 600), ("10:00", 600), ("1-00", 86400),
                                           ("2-03:04:05", 183845), ("3h50m", 13800), ("230m", 13800),
                                           ("13800s", 13800), (3600, 3600), ("1.5h", 5400)])
def test_parse_duration(text: str | int, seconds: int) -> None:
    assert cl.parse_duration(text) == seconds


def test_parse_duration_refuses_bare_number_string() -> None:
    with pytest.raises(ValueError, match="ambiguous"):
        cl.parse_duration("60")


def test_default_lifetime_below_walltime() -> None:
    assert cl.default_lifetime(4 * 3600) == (13800, 300)  # 3h50m +- 5m
    for walltime in (120, 600, 1800, 86400):
        lifetime, stagger = cl.default_lifetime(walltime)
        assert 0 < lifetime and lifetime + stagger < walltime


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="cloud"), "kind"),
    (dict(n_workers=0), "n_workers"),
    (dict(device="tpu"), "device"),
    (dict(kind="address"), "scheduler"),
    (dict(kind="address", scheduler="not an address"), "scheduler"),
    (dict(kind="local", scheduler="tcp://h:8786"), "only meaningful"),
    (dict(kind="slurm", memory="lots"), "memory"),
    (dict(kind="slurm", memory="100MB"), "256 MiB"),
    (dict(kind="slurm", walltime="soon"), "walltime"),
    (dict(kind="slurm", walltime="00:01:00"), "2 minutes"),
    (dict(kind="slurm", walltime="01:00:00", lifetime="58m", lifetime_stagger="5m"), "below the walltime"),
    (dict(kind="slurm", cores=4, processes=3), "divide"),
    (dict(kind="slurm", cores=2, processes=2, gpus_per_worker=1), "GPU"),
    (dict(kind="slurm", cores=2, threads_per_worker=4), "exceed"),
    (dict(kind="slurm", minimum_jobs=1), "maximum_jobs"),
    (dict(kind="slurm", minimum_jobs=3, maximum_jobs=2), "minimum_jobs"),
    (dict(kind="slurm", scheduler_interface="lo", scheduler_host="x"), "not both"),
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
    assert cfg.walltime == "04:00:00"
    assert cfg.kind == "slurm" and cfg.jobs == 3 and cfg.gpus_per_worker == 1
    assert cfg.job_script_prologue == ("module load cuda",)
    # CLI flags override the file
    local = cluster_config_from({"cluster": "local", "workers": 2, "cluster_config": str(path)})
    assert local.kind == "local" and local.n_workers == 2
    # --scheduler alone means "attach"
    attach = cluster_config_from({"scheduler": "tcp://10.0.0.1:8786"})
    assert attach.kind == "address"
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"kind": "slurm", "walltime": "00:30:00", "cores": 2, "memory": "2GB"}))
    assert cluster_config_from(file=json_path).cores == 2


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


def _job_script(**kwargs) -> str:
    base = dict(kind="slurm", queue="gpu", account="myproj", walltime="04:00:00", cores=8,
                memory="64GB", interface="lo", dashboard_address=":0")
    return cl.slurm_job_script(ClusterConfig(**{**base, **kwargs}))


def test_job_script_directives_and_worker_command() -> None:
    script = _job_script(gpus_per_worker=1, log_directory=None, python="/opt/venv/bin/python",
                         job_script_prologue=("module load cuda", "source /opt/venv/bin/activate"))
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
    script = _job_script(queue=None, account=None, job_directives_skip=("--mem",),
                         local_directory="/scratch/$USER", lifetime="off")
    assert "#SBATCH -p" not in script and "#SBATCH -A" not in script
    assert "#SBATCH --mem" not in script and "--gres" not in script and "GPU=" not in script
    assert "--lifetime" not in script
    assert "--nthreads 1 " in script  # one task thread; torch uses the job's 8 cores
    assert "--local-directory /scratch/$USER" in script


def test_missing_interface_on_submit_host_is_explained() -> None:
    cfg = ClusterConfig(kind="slurm", interface="ib-does-not-exist", dashboard_address=":0")
    with pytest.raises(ClusterConfigError, match="scheduler_interface"):
        cl.slurm_cluster_kwargs(cfg)
    ok = cl.slurm_cluster_kwargs(cl.ClusterConfig(kind="slurm", interface="ib-does-not-exist",
                                                  scheduler_interface="lo"))
    assert ok["scheduler_options"]["interface"] == "lo" and ok["interface"] == "ib-does-not-exist"


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
    plugin = cl.get_worker().plugins[cl.PLUGIN_NAME]
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
    import asyncio

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
