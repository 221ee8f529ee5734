"""Where the pipeline's tasks run: a LocalCluster, an existing scheduler, or SLURM jobs.

This is the only module that imports ``distributed`` / ``dask_jobqueue``: the rest of the
pipeline receives a :class:`distributed.Client` (or ``None`` for the sequential path) and
calls :func:`bounded_map` and :func:`get_worker_model`, so the maths never depends on how
it is scheduled.

Sizing rule (why :func:`local_cluster_size` prefers processes over threads on a CPU):
a tile is read, run through the network and post-processed (watershed, polygons). Only the
network scales with torch's intra-op threads, and not linearly on small tiles; the watershed
and the polygon code are mostly single-threaded and partly hold the GIL. One worker process
per core with one task thread and one torch thread therefore keeps every core busy in every
phase, at the cost of one model copy per process (a few MB for the U-Net). Threads are
multiplied, not shared: each Dask task thread that calls torch gets its own OpenMP team, so
``workers x task threads x torch threads`` must stay <= cores or the cores thrash. Past
``MAX_LOCAL_WORKERS`` processes the per-process memory (model, tile buffers, slide handle
caches) outweighs the gain, so the remaining cores go to torch threads instead.

SLURM pitfalls handled here (see ``shared/docs/formats.md`` section 3): ``processes=1`` per
job, one GPU per worker with a ``GPU`` resource, ``--lifetime`` below the walltime (plus a
stagger) so workers retire before SLURM kills them, node-local ``--local-directory``,
``interface`` for the workers without breaking the scheduler on a login node that lacks it,
the job prologue that recreates the environment on the node, and ``job_directives_skip``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TypeVar

import dask
import torch
from dask.utils import format_bytes, parse_bytes, parse_timedelta
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker

from models.checkpoints import ModelBundle, load, resolve
from models.inference import pick_device, retain_freed_memory

log = logging.getLogger(__name__)

KINDS = ("local", "address", "slurm")
PLUGIN_NAME = "wsi-nuclei-model"
MAX_LOCAL_WORKERS = 8  # beyond this, spare cores go to torch threads (see module docstring)
GPU_TASK_THREADS = 4  # concurrent tasks on a GPU worker: overlap I/O + watershed with the net
SLURM_SCRATCH = "${TMPDIR:-/tmp}"  # expanded by bash on the compute node, not here
LIFETIME_MARGIN_S = 600  # default lifetime = walltime - 10 min (at most 20 % of walltime)
LIFETIME_STAGGER_S = 300
_ADDRESS_RE = re.compile(r"^(tcp|tls|ucx|ws|wss|inproc)://\S+$|^[\w.\-]+:\d+$")
_COMPOUND_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")

T = TypeVar("T")
R = TypeVar("R")


class ClusterConfigError(ValueError):
    """A cluster configuration that cannot work; the message says which field and why."""


# --------------------------------------------------------------------------- sizing


class WorkerLayout(NamedTuple):
    """How many worker processes, Dask task threads per worker and torch threads per task."""

    n_workers: int
    threads_per_worker: int
    torch_threads: int


def available_cores() -> int:
    """CPUs this process may use: SLURM's allocation, else the affinity mask, else the count.

    ``os.cpu_count()`` reports the whole node, which oversubscribes inside a SLURM job or a
    container that pins the process to fewer cores.
    """
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def local_cluster_size(cores: int | None = None, gpu: bool = False) -> tuple[int, int, int]:
    """``(n_workers, threads_per_worker, torch_threads)`` that never oversubscribe ``cores``.

    CPU: one process per core, one task thread, one torch thread (up to
    ``MAX_LOCAL_WORKERS`` processes; further cores become torch threads). 1 core -> (1, 1, 1),
    2 -> (2, 1, 1), 8 -> (8, 1, 1), 32 -> (8, 1, 4).
    GPU: one worker (one model on the device) with up to ``GPU_TASK_THREADS`` task threads so
    reading and post-processing overlap inference; torch's CPU threads stay at 1 because the
    heavy maths is on the device.
    """
    cores = max(1, int(cores) if cores is not None else available_cores())
    if gpu:
        return 1, min(cores, GPU_TASK_THREADS), 1
    n_workers = min(cores, MAX_LOCAL_WORKERS)
    return n_workers, 1, max(1, cores // n_workers)


def _cuda_wanted(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


# --------------------------------------------------------------------------- durations


def parse_duration(value: str | int | float) -> int:
    """Seconds from a SLURM time (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) or a
    Dask duration (``230m``, ``13800s``, ``4h``); a bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip()
    slurm = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if slurm and (":" in text or "-" in text):
        days, a, b, c = slurm.groups()
        parts = [int(p) for p in (a, b, c) if p is not None]
        if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
            parts += [0] * (3 - len(parts))
            h, m, s = parts
        elif len(parts) == 3:
            h, m, s = parts
        else:  # MM:SS
            h, (m, s) = 0, parts
        return int(days or 0) * 86400 + h * 3600 + m * 60 + s
    if text.isdigit():  # SLURM reads a bare number as minutes; Dask as seconds: refuse
        raise ValueError(f"ambiguous duration {text!r}: write '{text}m', '{text}s' or HH:MM:SS")
    compound = _COMPOUND_RE.fullmatch(text)
    if compound and any(compound.groups()):  # 3h50m, 1d12h (dask alone cannot parse these)
        d, h, m, s = (int(g or 0) for g in compound.groups())
        return d * 86400 + h * 3600 + m * 60 + s
    seconds = parse_timedelta(text)
    if seconds is None:
        raise ValueError(f"not a duration: {value!r}")
    return int(seconds)


def format_slurm_time(seconds: int) -> str:
    """``HH:MM:SS`` (``D-HH:MM:SS`` past a day), the form ``#SBATCH -t`` reads unambiguously."""
    days, rest = divmod(int(seconds), 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


def format_duration(seconds: int) -> str:
    """A duration that ``dask worker --lifetime`` parses (it has no compound '3h50m')."""
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def default_lifetime(walltime_s: int) -> tuple[int, int]:
    """``(lifetime, stagger)`` in seconds: retire ``min(10 min, 20 %)`` before the walltime,
    staggered by half that margin (at most 5 min) so workers do not all leave at once and
    the latest one still leaves before SLURM kills the job (4 h -> 3h50m +- 5m)."""
    margin = min(LIFETIME_MARGIN_S, walltime_s // 5)
    stagger = min(LIFETIME_STAGGER_S, margin // 2)
    return walltime_s - margin, stagger


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ClusterConfig:
    """Everything needed to obtain a Dask client; validated on construction.

    ``kind``: ``local`` (a LocalCluster of worker processes on this machine), ``address``
    (attach to a running scheduler: ``tcp://host:port`` or a scheduler JSON file) or
    ``slurm`` (a scheduler here, workers in SLURM jobs via dask-jobqueue).

    Local and SLURM workers share ``threads_per_worker`` / ``torch_threads``; unset, they
    follow :func:`local_cluster_size` (local) or one task thread using all of the job's
    cores in torch (SLURM CPU) / ``GPU_TASK_THREADS`` task threads (SLURM GPU).
    SLURM ``cores`` is the job's ``--cpus-per-task``; ``memory`` is per job.
    Fixed-size SLURM clusters (``jobs``) are run through ``adapt(min=max=jobs)`` so that
    workers retiring at ``lifetime`` are replaced; ``maximum_jobs`` turns on real adaptivity.
    """

    kind: str = "local"
    # local (and per-worker sizing shared with slurm)
    n_workers: int | None = None
    threads_per_worker: int | None = None
    torch_threads: int | None = None
    memory_limit: str = "auto"  # per local worker, Dask syntax
    device: str = "auto"
    # address
    scheduler: str | None = None  # tcp://host:port or a scheduler file
    # slurm
    queue: str | None = None
    account: str | None = None
    walltime: str = "01:00:00"
    cores: int = 1
    memory: str = "4GB"
    processes: int = 1
    gpus_per_worker: int = 0
    jobs: int = 1
    minimum_jobs: int | None = None
    maximum_jobs: int | None = None
    job_script_prologue: tuple[str, ...] = ()
    job_extra_directives: tuple[str, ...] = ()
    job_directives_skip: tuple[str, ...] = ()
    python: str = field(default_factory=lambda: sys.executable)
    interface: str | None = None  # worker network interface (e.g. ib0)
    scheduler_interface: str | None = None  # scheduler's, when the login node differs
    scheduler_host: str | None = None
    local_directory: str | None = None  # slurm default: node-local $TMPDIR (or /tmp)
    log_directory: str | None = None
    lifetime: str | None = None  # default: walltime - 10 min; "off" disables
    lifetime_stagger: str | None = None
    death_timeout: float = 60.0
    job_name: str = "wsi-nuclei"
    dashboard_address: str | None = ":8787"

    def __post_init__(self) -> None:
        for name in ("job_script_prologue", "job_extra_directives", "job_directives_skip"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(str(v) for v in value))
        self._validate()

    # -- validation -------------------------------------------------------------------
    def _fail(self, name: str, why: str) -> NoReturn:
        raise ClusterConfigError(f"cluster config: {name}={getattr(self, name)!r}: {why}")

    def _validate(self) -> None:
        if self.kind not in KINDS:
            self._fail("kind", f"must be one of {', '.join(KINDS)}")
        for name in ("n_workers", "threads_per_worker", "torch_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                self._fail(name, "must be a positive integer")
        if not _DEVICE_RE.match(self.device):
            self._fail("device", "must be auto, cpu, cuda, cuda:N or mps")
        if self.memory_limit != "auto":
            self._check_bytes("memory_limit")
        if self.kind == "address":
            if not self.scheduler:
                self._fail("scheduler", "kind 'address' needs a scheduler address (tcp://host:port) "
                                        "or a scheduler file")
            if not (_ADDRESS_RE.match(self.scheduler) or Path(self.scheduler).suffix == ".json"
                    or Path(self.scheduler).is_file()):
                self._fail("scheduler", "neither an address like tcp://host:8786 nor a scheduler "
                                        "file (.json)")
        elif self.scheduler:
            self._fail("scheduler", f"only meaningful with kind 'address' (kind is {self.kind!r})")
        if self.kind == "slurm":
            self._validate_slurm()

    def _check_bytes(self, name: str) -> int:
        try:
            return parse_bytes(getattr(self, name))
        except (ValueError, TypeError):
            self._fail(name, "not a memory size (e.g. '4GB', '16GiB')")

    def _check_duration(self, name: str) -> int:
        try:
            return parse_duration(getattr(self, name))
        except (ValueError, TypeError, KeyError) as exc:
            self._fail(name, f"not a duration ({exc})")

    def _validate_slurm(self) -> None:
        for name in ("cores", "processes", "death_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
                self._fail(name, "must be a positive number")
        if self.cores % self.processes:
            self._fail("processes", f"must divide cores={self.cores} (each process gets an equal share)")
        if not isinstance(self.gpus_per_worker, int) or self.gpus_per_worker < 0:
            self._fail("gpus_per_worker", "must be an integer >= 0")
        if self.gpus_per_worker and self.processes != 1:
            self._fail("processes", "must be 1 with GPUs: one worker per job owns the job's GPUs "
                                    "(several processes would all use cuda:0)")
        threads = self.threads_per_worker or 1
        if threads * self.processes > self.cores:
            self._fail("threads_per_worker", f"{threads} threads x {self.processes} processes "
                                             f"exceed cores={self.cores}")
        mem = self._check_bytes("memory")
        if mem / self.processes < 256 * 2**20:
            self._fail("memory", "less than 256 MiB per worker process")
        if self.jobs < 0:
            self._fail("jobs", "must be >= 0")
        if self.minimum_jobs is not None and self.minimum_jobs < 0:
            self._fail("minimum_jobs", "must be >= 0")
        if self.maximum_jobs is not None:
            if self.maximum_jobs < 1:
                self._fail("maximum_jobs", "must be >= 1")
            if self.maximum_jobs < (self.minimum_jobs or 0):
                self._fail("maximum_jobs", f"below minimum_jobs={self.minimum_jobs}")
        elif self.minimum_jobs is not None:
            self._fail("minimum_jobs", "set maximum_jobs too to adapt (or use jobs=N for a fixed size)")
        if self.scheduler_interface and self.scheduler_host:
            self._fail("scheduler_host", "give scheduler_interface or scheduler_host, not both")
        walltime = self._check_duration("walltime")
        # canonical form: YAML reads 01:00:00 as the integer 3600 (base 60), SLURM would read
        # a bare 3600 as minutes
        object.__setattr__(self, "walltime", format_slurm_time(walltime))
        if walltime < 120:
            self._fail("walltime", "shorter than 2 minutes: workers would spend it starting")
        if self.lifetime_enabled:
            lifetime, stagger = self.lifetime_seconds()
            if lifetime <= 0 or stagger < 0:
                self._fail("lifetime", "must be positive (stagger >= 0)")
            if lifetime + stagger >= walltime:
                self._fail("lifetime", f"lifetime + lifetime_stagger ({lifetime + stagger} s) must stay "
                                       f"below the walltime ({walltime} s), or SLURM kills workers "
                                       f"mid-task (KilledWorker)")

    # -- derived values ---------------------------------------------------------------
    @property
    def lifetime_enabled(self) -> bool:
        """``lifetime`` unset means the walltime-derived default; "off" (or 0) disables it."""
        return self.lifetime is None or str(self.lifetime).lower() not in ("off", "none", "0", "false")

    def lifetime_seconds(self) -> tuple[int, int]:
        """``(lifetime, stagger)`` in seconds, defaults derived from the walltime."""
        walltime = parse_duration(self.walltime)
        lifetime, stagger = default_lifetime(walltime)
        if self.lifetime is not None:
            lifetime = self._check_duration("lifetime")
        if self.lifetime_stagger is not None:
            stagger = self._check_duration("lifetime_stagger")
        return lifetime, stagger

    @property
    def adaptive(self) -> bool:
        return self.maximum_jobs is not None

    @property
    def gpu(self) -> bool:
        if self.kind == "slurm":
            return self.gpus_per_worker > 0
        return _cuda_wanted(self.device)

    def layout(self, cores: int | None = None) -> WorkerLayout:
        """Worker processes, task threads per worker and torch threads per task.

        For ``local`` the machine's ``cores`` (default :func:`available_cores`); for
        ``slurm`` the job's ``cores`` split over ``processes``. Explicit fields win; an
        unset ``torch_threads`` takes the cores left per task thread.
        """
        if self.kind == "slurm":
            per_process = self.cores // self.processes
            threads = self.threads_per_worker or (min(per_process, GPU_TASK_THREADS) if self.gpu else 1)
            torch_threads = self.torch_threads or (1 if self.gpu else max(1, per_process // threads))
            n_workers = self.processes * (self.maximum_jobs if self.adaptive else self.jobs)
            return WorkerLayout(n_workers, threads, torch_threads)
        cores = max(1, cores or available_cores())
        n_workers, threads, torch_threads = local_cluster_size(cores, self.gpu)
        if self.n_workers or self.threads_per_worker:
            n_workers = self.n_workers or n_workers
            threads = self.threads_per_worker or 1
            torch_threads = 1 if self.gpu else max(1, cores // (n_workers * threads))
        return WorkerLayout(n_workers, threads, self.torch_threads or torch_threads)

    def task_resources(self) -> dict[str, float] | None:
        """``resources=`` for inference tasks: one GPU each on GPU workers, else none."""
        return {"GPU": 1} if self.gpu else None


# CLI flags of ``wsi-nuclei run`` that are not ClusterConfig field names
_CLI_ALIASES = {"cluster": "kind", "address": "scheduler"}


def _normalise_keys(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    names = {f.name for f in fields(ClusterConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _CLI_ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name not in names:
            raise ClusterConfigError(f"{source}: unknown cluster option {key!r} "
                                     f"(known: {', '.join(sorted(names))})")
        if isinstance(value, list):
            value = tuple(value)
        out[name] = value
    return out


def read_cluster_file(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a YAML or JSON file: top-level keys, or under a ``cluster:`` key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ClusterConfigError(f"cluster config file {path}: {exc.strerror}") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml  # dask depends on PyYAML, so it is always there

            data = yaml.safe_load(text)
    except Exception as exc:  # json/yaml raise several types
        raise ClusterConfigError(f"cluster config file {path}: not valid YAML/JSON ({exc})") from exc
    data = data or {}
    if isinstance(data, dict) and isinstance(data.get("cluster"), dict):
        data = data["cluster"]
    if not isinstance(data, dict):
        raise ClusterConfigError(f"cluster config file {path}: expected a mapping of options")
    return _normalise_keys(data, str(path))


def cluster_config_from(args: Mapping[str, Any] | None = None,
                        file: str | os.PathLike | None = None) -> ClusterConfig:
    """A :class:`ClusterConfig` from a config file overridden by CLI flags.

    ``args`` is ``vars(argparse_namespace)`` or any mapping; keys that are not cluster
    options (``model``, ``out`` ...) and ``None`` values are ignored. Understood CLI names:
    ``cluster`` (kind), ``cluster_config`` (the file, when ``file`` is not given),
    ``scheduler`` or ``address`` (implies kind ``address`` unless ``cluster`` says otherwise), ``workers``
    (local: worker processes; slurm: worker processes in total, i.e. jobs x processes),
    ``device``, plus any :class:`ClusterConfig` field name.
    """
    args = {str(k).replace("-", "_"): v for k, v in (args or {}).items() if v is not None}
    file = file or args.pop("cluster_config", None)
    values: dict[str, Any] = read_cluster_file(file) if file else {}
    names = {f.name for f in fields(ClusterConfig)}
    flags = {(_CLI_ALIASES.get(k, k)): v for k, v in args.items()
             if k in names or k in _CLI_ALIASES}
    flags = {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()}
    if "scheduler" in flags and "kind" not in flags:
        flags["kind"] = "address"
    values.update(flags)
    workers = args.get("workers")
    if workers is not None:
        if values.get("kind", "local") == "slurm":
            processes = int(values.get("processes", 1))
            values["jobs"] = max(1, -(-int(workers) // processes))
        else:
            values["n_workers"] = int(workers)
    try:
        return ClusterConfig(**values)
    except TypeError as exc:  # e.g. a list where a number belongs
        raise ClusterConfigError(f"cluster config: {exc}") from exc


# --------------------------------------------------------------------------- clusters


def _check_local_interface(name: str, what: str) -> None:
    import psutil  # a dependency of distributed

    known = sorted(psutil.net_if_addrs())
    if name not in known:
        raise ClusterConfigError(
            f"{what} {name!r} does not exist on this host ({', '.join(known)}). The scheduler runs "
            f"here, not on the compute nodes: keep interface={name!r} for the workers and set "
            f"scheduler_interface (e.g. one of the above) or scheduler_host.")


def slurm_cluster_kwargs(config: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster`` with the pitfalls handled.

    ``cores`` given to dask-jobqueue is the number of Dask task threads (it becomes
    ``--nthreads``); the job still asks SLURM for all ``config.cores`` via ``job_cpu`` so
    the spare CPUs serve torch threads.
    """
    if config.kind != "slurm":
        raise ClusterConfigError(f"slurm_cluster_kwargs needs kind 'slurm', not {config.kind!r}")
    layout = config.layout()
    worker_args: list[str] = []
    extra = list(config.job_extra_directives)
    if config.gpus_per_worker:
        extra.insert(0, f"--gres=gpu:{config.gpus_per_worker}")
        worker_args += ["--resources", f"GPU={config.gpus_per_worker}"]
    if config.lifetime_enabled:
        lifetime, stagger = config.lifetime_seconds()
        worker_args += ["--lifetime", format_duration(lifetime),
                        "--lifetime-stagger", format_duration(stagger)]
    scheduler_options: dict[str, Any] = {"dashboard_address": config.dashboard_address}
    if config.scheduler_host:
        scheduler_options["host"] = config.scheduler_host
    elif config.scheduler_interface:
        _check_local_interface(config.scheduler_interface, "scheduler_interface")
        scheduler_options["interface"] = config.scheduler_interface
    elif config.interface:
        # dask-jobqueue would bind the scheduler to the workers' interface: check it here
        _check_local_interface(config.interface, "interface")
        scheduler_options["interface"] = config.interface
    kwargs: dict[str, Any] = {
        "queue": config.queue,
        "account": config.account,
        "walltime": config.walltime,
        "cores": layout.threads_per_worker * config.processes,
        "job_cpu": config.cores,
        "processes": config.processes,
        "memory": config.memory,
        "job_name": config.job_name,
        "interface": config.interface,
        "scheduler_options": scheduler_options,
        "local_directory": config.local_directory or SLURM_SCRATCH,
        "log_directory": config.log_directory,
        "python": config.python,
        "job_script_prologue": list(config.job_script_prologue),
        "job_extra_directives": extra,
        "job_directives_skip": list(config.job_directives_skip),
        "worker_extra_args": worker_args,
        "death_timeout": config.death_timeout,
    }
    return kwargs


def _import_jobqueue() -> Any:
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ClusterConfigError("kind 'slurm' needs dask-jobqueue: pip install 'wsi-nuclei[hpc]'") from exc
    return dask_jobqueue


@contextlib.contextmanager
def slurm_cluster(config: ClusterConfig) -> Iterator[Any]:
    """A started ``SLURMCluster`` (scheduler here, no jobs yet), closed on exit."""
    dask_jobqueue = _import_jobqueue()
    cluster = dask_jobqueue.SLURMCluster(**slurm_cluster_kwargs(config))
    try:
        yield cluster
    finally:
        cluster.close()


def slurm_job_script(config: ClusterConfig) -> str:
    """The batch script each worker job would run (starts and stops a scheduler to get it)."""
    with slurm_cluster(config) as cluster:
        return cluster.job_script()


@contextlib.contextmanager
def _local_cluster(config: ClusterConfig) -> Iterator[LocalCluster]:
    layout = config.layout()
    resources = {"GPU": 1} if config.gpu else None
    log.info("LocalCluster: %d worker process(es) x %d task thread(s), torch threads %d",
             *layout)
    cluster = LocalCluster(
        n_workers=layout.n_workers,
        threads_per_worker=layout.threads_per_worker,
        processes=True,
        memory_limit=config.memory_limit,
        local_directory=config.local_directory,
        dashboard_address=config.dashboard_address,
        resources=resources,
    )
    try:
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def open_client(config: ClusterConfig, *, wait_for_workers: int = 0,
                timeout: float | None = None) -> Iterator[Client]:
    """A connected :class:`Client` for ``config``; everything it started is closed on exit.

    ``local``: a LocalCluster of spawned worker processes (nothing — CUDA, OpenSlide
    handles — is inherited through fork). ``address``: attach to a running scheduler (left
    running on exit). ``slurm``: a scheduler here plus worker jobs, sized by ``adapt`` (see
    :class:`ClusterConfig`); the jobs are cancelled on exit. ``wait_for_workers`` blocks
    until that many workers joined (``timeout`` seconds), which avoids a silent wait on a
    full queue.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}))
        if config.kind == "address":
            assert config.scheduler is not None  # validated
            connect_timeout = timeout if timeout is not None else 30
            if _ADDRESS_RE.match(config.scheduler):
                client = Client(config.scheduler, timeout=connect_timeout)
            else:
                client = Client(scheduler_file=config.scheduler, timeout=connect_timeout)
            log.info("attached to scheduler %s", client.scheduler.address)
        elif config.kind == "local":
            cluster = stack.enter_context(_local_cluster(config))
            client = Client(cluster)
        else:
            cluster = stack.enter_context(slurm_cluster(config))
            if config.adaptive:
                minimum, maximum = config.minimum_jobs or 0, config.maximum_jobs
            else:
                minimum = maximum = config.jobs
            # adapt also for a fixed size: it resubmits jobs whose workers retired at --lifetime
            cluster.adapt(minimum_jobs=minimum, maximum_jobs=maximum)
            client = Client(cluster)
            log.info("SLURM cluster: scheduler %s, %d..%d job(s) of %d core(s), %s, walltime %s; "
                     "dashboard %s", cluster.scheduler_address, minimum, maximum, config.cores,
                     format_bytes(parse_bytes(config.memory)), config.walltime, client.dashboard_link)
        stack.callback(client.close)
        if wait_for_workers:
            client.wait_for_workers(wait_for_workers, timeout=timeout)
        yield client


# --------------------------------------------------------------------------- model plugin


class ModelPlugin(WorkerPlugin):
    """Loads the model once per worker process; tasks get it with :func:`get_worker_model`.

    Registered with ``client.register_plugin`` so workers that join later (``adapt``,
    replacement after ``--lifetime`` or a crash) load it too. The device is chosen on the
    worker (``auto``: the worker's own GPU if it has one), and ``torch_threads`` is set
    there because the Nanny starts workers with ``OMP_NUM_THREADS=1``.
    """

    name = PLUGIN_NAME

    def __init__(self, model: str | os.PathLike, device: str = "auto",
                 torch_threads: int | None = None) -> None:
        self.model = str(model)
        self.device = device
        self.torch_threads = torch_threads
        self.bundle: ModelBundle | None = None
        self.loads = 0  # how many times this process loaded the model (tests, diagnostics)

    def _load(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        self.bundle = load_for_inference(self.model, self.device)
        self.loads += 1

    async def setup(self, worker: Any) -> None:
        # off the event loop: a large file on a slow shared FS must not stall heartbeats
        await asyncio.get_running_loop().run_in_executor(None, self._load)
        log.info("worker %s: model %s on %s (torch threads %d)", worker.name, self.model,
                 next(self.bundle.net.parameters()).device if self.bundle else "?",
                 torch.get_num_threads())

    def teardown(self, worker: Any) -> None:
        self.bundle = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def register_model(client: Client, model: str | os.PathLike, config: ClusterConfig | None = None,
                   *, device: str | None = None) -> ModelPlugin:
    """Install :class:`ModelPlugin` on all current and future workers of ``client``.

    The path is resolved here (shipped names too) and made absolute, since workers may
    start in another directory; a missing or damaged model fails here, not on every worker.
    """
    path = resolve(model).resolve()
    config = config or ClusterConfig()
    torch_threads = config.layout().torch_threads if config.kind != "address" else config.torch_threads
    plugin = ModelPlugin(path, device=device or config.device, torch_threads=torch_threads)
    client.register_plugin(plugin, name=PLUGIN_NAME)
    return plugin


_local_lock = threading.Lock()


def load_for_inference(model: str | os.PathLike, device: str) -> ModelBundle:
    """The model as a worker runs it: BatchNorm folded, and this process's allocator told
    to keep freed memory (~1.5x faster CPU forward passes, no page faults per call)."""
    retain_freed_memory()
    return load(model, pick_device(device), fold_bn=True)


@functools.lru_cache(maxsize=4)
def _load_in_process(path: str, device: str) -> ModelBundle:
    return load_for_inference(path, device)


def get_worker_model(model: str | os.PathLike | None = None, device: str = "auto") -> ModelBundle:
    """The model for the current task.

    On a Dask worker with :class:`ModelPlugin`: the worker's single instance. Elsewhere
    (sequential path without Dask, or a worker without the plugin) ``model`` is loaded once
    per process and cached.
    """
    try:
        worker = get_worker()
    except ValueError:
        worker = None
    if worker is not None:
        plugin = worker.plugins.get(PLUGIN_NAME)
        if plugin is not None and plugin.bundle is not None:
            return plugin.bundle
        if model is None:
            raise RuntimeError(f"worker {worker.name}: no model loaded (register_model(client, ...) "
                               f"first, or pass the model path)")
    if model is None:
        raise RuntimeError("not on a Dask worker: get_worker_model needs the model path")
    with _local_lock:
        return _load_in_process(str(resolve(model).resolve()), device)


# --------------------------------------------------------------------------- bounded map


@dataclass(frozen=True)
class TaskFailure:
    """The outcome of an item whose task failed (after its retries): yielded, not raised."""

    item: Any
    exception: BaseException
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.exception.__class__.__name__}: {self.exception}"


def bounded_map(client: Client, fn: Callable[[T], R], items: Iterable[T], max_in_flight: int,
                *, retries: int = 0, **submit_kwargs: Any) -> Iterator[tuple[T, R | TaskFailure]]:
    """``(item, fn(item))`` in completion order, with at most ``max_in_flight`` futures alive.

    ``items`` is consumed lazily, so a generator of a million tiles never becomes a million
    futures (scheduler memory, client memory). A task that raises (after ``retries``
    re-runs) or whose workers kept dying (``KilledWorker``) yields a :class:`TaskFailure`
    for its item and the others go on. Keys are unique (``pure=False``) unless the caller
    passes ``pure``/``key``.
    """
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, not {max_in_flight}")
    submit_kwargs.setdefault("pure", False)
    source = iter(items)
    pending: dict[str, T] = {}
    done = as_completed()

    def submit_next() -> bool:
        try:
            item = next(source)
        except StopIteration:
            return False
        future = client.submit(fn, item, retries=retries, **submit_kwargs)
        pending[future.key] = item
        done.add(future)
        return True

    for _ in range(max_in_flight):
        if not submit_next():
            break
    try:
        while pending:
            future = next(done)
            item = pending.pop(future.key)
            outcome: Any
            if future.status == "finished":
                outcome = future.result()
            else:
                try:
                    exc = future.exception()
                    tb = "".join(traceback.format_tb(future.traceback()))
                except Exception as lost:  # cancelled: the scheduler forgot the task
                    exc, tb = lost, ""
                outcome = TaskFailure(item, exc, tb)
                log.warning("task for %r failed: %s", item, outcome)
            future.release()
            submit_next()  # refill before handing out the result: keep workers busy
            yield item, outcome
    finally:  # closed early: dropping the futures cancels the tasks not yet run
        pending.clear()
        done.clear()
