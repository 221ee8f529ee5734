"""Where the pipeline's tasks run: a local cluster, an existing scheduler, or SLURM jobs.

This is the only module that imports ``distributed`` / ``dask_jobqueue``: the rest of the
pipeline receives a :class:`distributed.Client` (or ``None`` for the sequential path) and
calls :func:`bounded_map` and :func:`get_worker_model`, so the maths never depends on how
it is scheduled.

Sizing rule on a CPU (why :func:`plan_layout` prefers processes over threads): a tile is
read, run through the network and post-processed (watershed, polygons). Only the network
scales with torch's intra-op threads, and not linearly on small tiles; the watershed and
the polygon code are mostly single-threaded and partly hold the GIL. One worker process per
core with one task thread and one torch thread therefore keeps every core busy in every
phase, at the cost of one model copy per process (a few MB for the U-Net). Threads are
multiplied, not shared: each Dask task thread that calls torch gets its own OpenMP team, so
``workers x task threads x torch threads`` must stay <= cores or the cores thrash. Past
``MAX_LOCAL_WORKERS`` processes the per-process memory (model, tile buffers, slide handle
caches) outweighs the gain, so the remaining cores go to torch threads instead.

With GPUs the network is no longer the bottleneck, the GIL-bound CPU work is: one worker
process per GPU, pinned to it (``CUDA_VISIBLE_DEVICES``) and advertising a ``GPU=1``
resource that inference tasks request (:func:`predict_resources`), plus a pool of
single-threaded CPU worker processes, which never see a GPU, for everything else.

SLURM pitfalls handled here (see ``shared/docs/formats.md`` section 3): ``processes=1`` per
GPU job, one GPU per worker with a ``GPU`` resource, ``--lifetime`` below the walltime (plus
a stagger) so workers retire before SLURM kills them, node-local ``--local-directory``,
``interface`` for the workers without breaking the scheduler on a login node that lacks it,
the job prologue that recreates the environment on the node, and ``job_directives_skip``.
Settings left out of our cluster file come from dask-jobqueue's own configuration
(``jobqueue.slurm.*``), see :meth:`ClusterConfig.slurm_value`.

Dask reports every failed task attempt on the worker as a multi-line "Compute Failed"
block with a traceback; :class:`QuietTaskErrors` drops those (unless ``debug``), because
:func:`bounded_map` logs one line per failed item itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib
import json
import logging
import os
import re
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import dask
import torch
from dask.utils import format_bytes, parse_bytes, parse_timedelta
from distributed import Client, Nanny, Scheduler, SpecCluster, WorkerPlugin, as_completed, get_worker
from distributed.worker_memory import parse_memory_limit

from models.checkpoints import ModelBundle, load, resolve
from models.inference import pick_device, retain_freed_memory
from models.runtime import with_runtime
from pipeline.determinism import pin_cuda_numerics

log = logging.getLogger(__name__)

KINDS = ("local", "address", "slurm")
PLUGIN_NAME = "wsi-nuclei-model"
# what tasks import, imported when a worker starts (with the model) rather than inside the
# first slide's tasks: 1-2.5 s per worker, paid once at start-up either way, but no longer
# counted in (and skewing) the first slide's timings and tile phases
TASK_MODULES = ("pipeline.slide", "pipeline.stitch", "pipeline.tissue", "pipeline.label_sampling",
                "pipeline.writers.geojson", "pipeline.writers.table", "pipeline.writers.labels",
                "pipeline.writers.preview", "anndata")  # anndata: the finalising task's table
QUIET_PLUGIN_NAME = "wsi-nuclei-quiet-task-errors"
MAX_LOCAL_WORKERS = 8  # CPU layout: beyond this, spare cores go to torch threads (see above)
MAX_POOL_WORKERS = 32  # GPU layout: post-processing processes (~0.4 GB each: torch, buffers)
POOL_RESOURCE = "POOL"  # advertised by the CPU pool of a local GPU layout (post_resources)
LOCAL_GPU_THREADS = 2  # a local GPU worker: its GPU task (GPU=1: one at a time) + one other
GPU_TASK_THREADS = 4  # a SLURM GPU worker (no CPU pool beside it): overlap I/O and watershed
SLURM_SCRATCH = "${TMPDIR:-/tmp}"  # expanded by bash on the compute node, not here
LIFETIME_MARGIN_S = 600  # default lifetime = walltime - 10 min (at most 20 % of walltime)
LIFETIME_STAGGER_S = 300
ITEM_REPR_CHARS = 120  # how much of a failed item's repr the one-line failure report shows
_ADDRESS_RE = re.compile(r"^(tcp|tls|ucx|ws|wss|inproc)://\S+$|^[\w.\-]+:\d+$")
_COMPOUND_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")

T = TypeVar("T")
R = TypeVar("R")


class ClusterConfigError(ValueError):
    """A cluster configuration that cannot work; the message says which field and why."""


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """The worker processes of a cluster.

    GPU workers advertise ``GPU=1`` (inference tasks request it, :func:`predict_resources`);
    on a local cluster each is pinned to one GPU through ``CUDA_VISIBLE_DEVICES``
    (``cuda_devices``, one entry per GPU worker), on SLURM the job's allocation pins it.
    CPU workers do everything else (on a CPU layout, everything). ``device`` is what every
    worker's model plugin asks for: ``auto`` on a local GPU layout, where each worker's
    visible devices decide (its GPU, or none for the CPU pool).
    """

    gpu_workers: int
    gpu_threads: int  # Dask task threads per GPU worker
    cpu_workers: int
    cpu_threads: int  # Dask task threads per CPU worker
    torch_threads: int  # torch intra-op threads per task, every worker
    device: str
    cuda_devices: tuple[str, ...] = ()

    @property
    def gpu(self) -> bool:
        """Inference runs on GPU workers only (CPU workers must not run it)."""
        return self.gpu_workers > 0

    @property
    def n_workers(self) -> int:
        return self.gpu_workers + self.cpu_workers


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


def visible_gpus() -> tuple[str, ...]:
    """The CUDA devices of this machine as ``CUDA_VISIBLE_DEVICES`` entries for child
    processes: this process's own ``CUDA_VISIBLE_DEVICES`` entries (indices, UUIDs or MIG
    names) if it has them, else ``0..n-1``."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return tuple(visible[:n]) if len(visible) >= n else tuple(str(i) for i in range(n))


def plan_layout(n_cpus: int, n_gpus: int, device: str = "auto", *,
                visible: Sequence[str] | None = None, n_workers: int | None = None,
                threads_per_worker: int | None = None, torch_threads: int | None = None) -> Layout:
    """The local cluster for ``n_cpus`` cores and ``n_gpus`` CUDA devices.

    ``device``: ``cpu`` (or ``mps``) gives a CPU layout even on a CUDA machine; ``auto`` uses
    every GPU; ``cuda`` every GPU (an error without one); ``cuda:N`` GPU ``N`` only.
    ``visible``: the ``CUDA_VISIBLE_DEVICES`` entry of each GPU (default ``0..n_gpus-1``).

    CPU layout: one single-threaded process per core up to ``MAX_LOCAL_WORKERS``, spare
    cores as torch threads (1 core -> 1 x 1 x 1, 8 -> 8 x 1 x 1, 32 -> 8 x 1 x 4).
    GPU layout: one worker per GPU with ``LOCAL_GPU_THREADS`` task threads, and the cores
    left over as single-threaded CPU workers (at least one, at most ``MAX_POOL_WORKERS``);
    torch gets one thread everywhere (the GPU does the network).
    Explicit ``n_workers`` / ``threads_per_worker`` / ``torch_threads`` set the CPU workers
    (and the torch threads of all workers).
    """
    if not _DEVICE_RE.match(device):
        raise ClusterConfigError(f"device {device!r}: must be auto, cpu, cuda, cuda:N or mps")
    n_cpus = max(1, int(n_cpus))
    ids = tuple(visible) if visible is not None else tuple(str(i) for i in range(n_gpus))
    ids = ids[:n_gpus]
    if device.startswith("cuda"):
        if not ids:
            raise ClusterConfigError(f"device {device!r}: this machine has no CUDA device "
                                     "(use --device cpu or auto)")
        if ":" in device:
            index = int(device.split(":")[1])
            if index >= len(ids):
                raise ClusterConfigError(f"device {device!r}: this machine has {len(ids)} CUDA "
                                         f"device(s), cuda:0..cuda:{len(ids) - 1}")
            ids = (ids[index],)
    elif device != "auto":
        ids = ()
    threads = threads_per_worker or 1
    if not ids:
        workers = n_workers or max(1, min(MAX_LOCAL_WORKERS, n_cpus // threads))
        torch_t = torch_threads or max(1, n_cpus // (workers * threads))
        return Layout(0, 0, workers, threads, torch_t, device)
    gpu_threads = min(n_cpus, LOCAL_GPU_THREADS)
    spare = n_cpus - len(ids) * gpu_threads
    pool = n_workers or max(1, min(MAX_POOL_WORKERS, spare // threads))
    return Layout(len(ids), gpu_threads, pool, threads, torch_threads or 1, "auto", ids)


def post_resources(layout: Layout | None) -> dict[str, float] | None:
    """``resources=`` for the post-processing half of tile work (watershed, measurements,
    outlines, tile files) on a local GPU layout: ``{"POOL": 1}``, which only the CPU pool
    advertises, so that it runs there and not on the GPU worker that holds the network
    outputs (Dask would otherwise often keep it there, next to its data); ``None`` where
    there is no separate pool (CPU layouts, SLURM GPU jobs, an attached scheduler), and
    then a tile is one task that predicts and post-processes."""
    if layout is None or not layout.gpu or layout.cpu_workers < 1:
        return None
    return {POOL_RESOURCE: 1}


def predict_resources(layout: Layout | None) -> dict[str, float] | None:
    """``resources=`` for inference (predict) submissions: ``{"GPU": 1}`` on a GPU layout,
    so that they run on GPU workers only, one at a time per GPU; ``None`` otherwise (an
    attached scheduler's workers are unknown: asking for a resource none has would wait
    forever)."""
    return {"GPU": 1} if layout is not None and layout.gpu else None


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

# ClusterConfig field -> its dask-jobqueue key (``jobqueue.slurm.<key>``)
JOBQUEUE_KEYS = {
    "queue": "queue", "account": "account", "walltime": "walltime", "cores": "cores",
    "memory": "memory", "processes": "processes", "job_script_prologue": "job-script-prologue",
    "job_extra_directives": "job-extra-directives", "job_directives_skip": "job-directives-skip",
    "python": "python", "interface": "interface", "local_directory": "local-directory",
    "log_directory": "log-directory", "death_timeout": "death-timeout", "job_name": "name",
}
# what wsi-nuclei uses where neither our file nor dask-jobqueue's configuration has a value
SLURM_FALLBACKS: dict[str, Any] = {"cores": 1, "memory": "4GB", "processes": 1,
                                   "local_directory": SLURM_SCRATCH}
_TUPLE_FIELDS = ("job_script_prologue", "job_extra_directives", "job_directives_skip")


def jobqueue_config(key: str, default: Any = None) -> Any:
    """dask-jobqueue's setting ``jobqueue.slurm.<key>``: the user's Dask config files,
    ``DASK_JOBQUEUE__SLURM__*`` environment variables, else dask-jobqueue's defaults
    (registered when ``dask_jobqueue`` is imported)."""
    with contextlib.suppress(ImportError):
        import dask_jobqueue  # noqa: F401  (registers its defaults with dask.config)
    return dask.config.get(f"jobqueue.slurm.{key}", default=default)


@dataclass(frozen=True)
class ClusterConfig:
    """Everything needed to obtain a Dask client; validated on construction.

    ``kind``: ``local`` (worker processes on this machine, :func:`plan_layout`), ``address``
    (attach to a running scheduler: ``tcp://host:port`` or a scheduler JSON file) or
    ``slurm`` (a scheduler here, workers in SLURM jobs via dask-jobqueue).

    Local and SLURM workers share ``threads_per_worker`` / ``torch_threads``; unset, they
    follow :func:`plan_layout` (local) or one task thread using all of the job's cores in
    torch (SLURM CPU) / ``GPU_TASK_THREADS`` task threads (SLURM GPU).

    SLURM fields left ``None`` are dask-jobqueue's to decide (:meth:`slurm_value`): its
    configuration (``jobqueue.slurm.*`` in Dask config files or ``DASK_JOBQUEUE__SLURM__*``),
    and where that has nothing either, ``SLURM_FALLBACKS``. ``cores`` is the job's
    ``--cpus-per-task``; ``memory`` is per job. Fixed-size SLURM clusters (``jobs``) are run
    through ``adapt(min=max=jobs)`` so that workers retiring at ``lifetime`` are replaced;
    ``maximum_jobs`` turns on real adaptivity.
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
    # slurm: None = dask-jobqueue's configuration decides (see slurm_value)
    queue: str | None = None
    account: str | None = None
    walltime: str | None = None
    cores: int | None = None
    memory: str | None = None
    processes: int | None = None
    gpus_per_worker: int = 0
    jobs: int = 1
    minimum_jobs: int | None = None
    maximum_jobs: int | None = None
    job_script_prologue: tuple[str, ...] | None = None
    job_extra_directives: tuple[str, ...] | None = None
    job_directives_skip: tuple[str, ...] | None = None
    python: str | None = None
    interface: str | None = None  # worker network interface (e.g. ib0)
    scheduler_interface: str | None = None  # scheduler's, when the login node differs
    scheduler_host: str | None = None
    local_directory: str | None = None  # slurm default: node-local $TMPDIR (or /tmp)
    log_directory: str | None = None
    lifetime: str | None = None  # default: walltime - 10 min; "off" disables
    lifetime_stagger: str | None = None
    death_timeout: float | None = None
    job_name: str | None = None
    dashboard_address: str | None = ":8787"

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(str(v) for v in value))
        self._validate()

    # -- validation -------------------------------------------------------------------
    def _fail(self, name: str, why: str, value: Any = None) -> NoReturn:
        shown = getattr(self, name, None) if value is None else value
        raise ClusterConfigError(f"cluster config: {name}={shown!r}: {why}")

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
            self._check_bytes("memory_limit", self.memory_limit)
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

    def _check_bytes(self, name: str, value: Any) -> int:
        try:
            return parse_bytes(value)
        except (ValueError, TypeError):
            self._fail(name, "not a memory size (e.g. '4GB', '16GiB')", value)

    def _check_duration(self, name: str, value: Any) -> int:
        try:
            return parse_duration(value)
        except (ValueError, TypeError, KeyError) as exc:
            self._fail(name, f"not a duration ({exc})", value)

    def _validate_slurm(self) -> None:
        if self.walltime is not None:
            # canonical form: YAML reads 01:00:00 as the integer 3600 (base 60), SLURM would
            # read a bare 3600 as minutes
            object.__setattr__(self, "walltime",
                               format_slurm_time(self._check_duration("walltime", self.walltime)))
        cores, processes = self.slurm_value("cores"), self.slurm_value("processes")
        for name, value in (("cores", cores), ("processes", processes),
                            ("death_timeout", self.slurm_value("death_timeout") or 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
                self._fail(name, "must be a positive number", value)
        if cores % processes:
            self._fail("processes", f"must divide cores={cores} (each process gets an equal share)",
                       processes)
        if self.gpus_per_worker not in (0, 1) or isinstance(self.gpus_per_worker, bool):
            self._fail("gpus_per_worker", "must be 0 or 1: a worker process uses one GPU "
                                          "(ask for more jobs to use more GPUs)")
        if self.gpus_per_worker and processes != 1:
            self._fail("processes", "must be 1 with GPUs: one worker per job owns the job's GPU "
                                    "(several processes would all use cuda:0)", processes)
        if self.gpus_per_worker and self.device == "cpu":
            self._fail("device", "'cpu' with gpus_per_worker=1 would reserve GPUs that no task uses "
                                 "(set gpus_per_worker: 0)")
        threads = self.threads_per_worker or 1
        if threads * processes > cores:
            self._fail("threads_per_worker", f"{threads} threads x {processes} processes "
                                             f"exceed cores={cores}")
        memory = self.slurm_value("memory")
        if self._check_bytes("memory", memory) / processes < 256 * 2**20:
            self._fail("memory", "less than 256 MiB per worker process", memory)
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
        walltime = self.walltime_seconds()
        if walltime < 120:
            self._fail("walltime", "shorter than 2 minutes: workers would spend it starting",
                       self.slurm_value("walltime"))
        if self.lifetime_enabled:
            lifetime, stagger = self.lifetime_seconds()
            if lifetime <= 0 or stagger < 0:
                self._fail("lifetime", "must be positive (stagger >= 0)")
            if lifetime + stagger >= walltime:
                self._fail("lifetime", f"lifetime + lifetime_stagger ({lifetime + stagger} s) must stay "
                                       f"below the walltime ({walltime} s), or SLURM kills workers "
                                       f"mid-task (KilledWorker)")

    # -- derived values ---------------------------------------------------------------
    def slurm_value(self, name: str) -> Any:
        """A SLURM setting in effect: ours if given, else dask-jobqueue's configuration
        (``jobqueue.slurm.*``), else ``SLURM_FALLBACKS`` (what dask-jobqueue leaves unset)."""
        ours = getattr(self, name)
        if ours is not None:
            return ours
        theirs = jobqueue_config(JOBQUEUE_KEYS[name])
        if theirs is not None:
            return tuple(theirs) if isinstance(theirs, list) else theirs
        return SLURM_FALLBACKS.get(name)

    def walltime_seconds(self) -> int:
        """The worker jobs' walltime in seconds (ours, else dask-jobqueue's)."""
        value = self.slurm_value("walltime")
        if value is None:
            self._fail("walltime", "not set here nor in dask-jobqueue's configuration (pip install "
                                   "'wsi-nuclei[hpc]' for its defaults)")
        return self._check_duration("walltime", value)

    @property
    def lifetime_enabled(self) -> bool:
        """``lifetime`` unset means the walltime-derived default; "off" (or 0) disables it."""
        return self.lifetime is None or str(self.lifetime).lower() not in ("off", "none", "0", "false")

    def lifetime_seconds(self) -> tuple[int, int]:
        """``(lifetime, stagger)`` in seconds, defaults derived from the walltime."""
        lifetime, stagger = default_lifetime(self.walltime_seconds())
        if self.lifetime is not None:
            lifetime = self._check_duration("lifetime", self.lifetime)
        if self.lifetime_stagger is not None:
            stagger = self._check_duration("lifetime_stagger", self.lifetime_stagger)
        return lifetime, stagger

    @property
    def adaptive(self) -> bool:
        return self.maximum_jobs is not None

    def layout(self, cores: int | None = None, gpus: Sequence[str] | None = None) -> Layout:
        """The workers this config starts.

        ``local``: :func:`plan_layout` for this machine's ``cores`` (default
        :func:`available_cores`) and CUDA devices (default :func:`visible_gpus`).
        ``slurm``: ``processes`` per job x jobs, each job's ``cores`` split over its
        processes; GPU workers when ``gpus_per_worker`` (SLURM pins their GPU). Explicit
        fields win; an unset ``torch_threads`` takes the cores left per task thread.
        """
        if self.kind == "slurm":
            processes = self.slurm_value("processes")
            per_process = self.slurm_value("cores") // processes
            n = processes * (self.maximum_jobs if self.adaptive else self.jobs)
            if self.gpus_per_worker:
                threads = self.threads_per_worker or min(per_process, GPU_TASK_THREADS)
                return Layout(n, threads, 0, 0, self.torch_threads or 1, self.device)
            threads = self.threads_per_worker or 1
            return Layout(0, 0, n, threads, self.torch_threads or max(1, per_process // threads),
                          self.device)
        ids = tuple(gpus) if gpus is not None else visible_gpus()
        return plan_layout(cores or available_cores(), len(ids), self.device, visible=ids,
                           n_workers=self.n_workers, threads_per_worker=self.threads_per_worker,
                           torch_threads=self.torch_threads)


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
            processes = int(values.get("processes") or jobqueue_config("processes")
                            or SLURM_FALLBACKS["processes"])
            values["jobs"] = max(1, -(-int(workers) // processes))
        else:
            values["n_workers"] = int(workers)
    try:
        return ClusterConfig(**values)
    except TypeError as exc:  # e.g. a list where a number belongs
        raise ClusterConfigError(f"cluster config: {exc}") from exc


# --------------------------------------------------------------------------- logging


class TaskFailureFilter(logging.Filter):
    """Drops Dask's own reports of a failed task: the worker's multi-line "Compute Failed"
    block (key, task repr, exception, traceback; one per attempt) and the scheduler's
    "marked as failed because workers died". :func:`bounded_map` reports each failed item
    in one line instead (its traceback at DEBUG)."""

    PREFIXES = ("Compute Failed", "Task %s marked as failed")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIXES))


TASK_FAILURE_FILTER = TaskFailureFilter()
_FILTERED_LOGGERS = ("distributed.worker", "distributed.scheduler")


_quiet_users = 0  # open_client calls of this process that want the filter (they may nest)
_quiet_lock = threading.Lock()


def quiet_task_errors(enable: bool = True) -> None:
    """Install (``enable``) or release :data:`TASK_FAILURE_FILTER` on Dask's worker and
    scheduler loggers of this process; it stays while any caller still wants it."""
    global _quiet_users
    with _quiet_lock:
        _quiet_users = max(0, _quiet_users + (1 if enable else -1))
        for name in _FILTERED_LOGGERS:
            logger = logging.getLogger(name)
            (logger.addFilter if _quiet_users else logger.removeFilter)(TASK_FAILURE_FILTER)


class QuietTaskErrors(WorkerPlugin):
    """:func:`quiet_task_errors` on every worker, including those that join later."""

    name = QUIET_PLUGIN_NAME

    def setup(self, worker: Any) -> None:
        quiet_task_errors(True)

    def teardown(self, worker: Any) -> None:
        quiet_task_errors(False)


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

    Settings we do not need to know are passed only when our config gives them, so that
    dask-jobqueue reads its own configuration for the rest. The values we compute with
    (walltime, cores, processes, memory, interface, local directory, extra directives) are
    resolved by :meth:`ClusterConfig.slurm_value` and passed explicitly; dask-jobqueue's
    ``worker-extra-args`` and ``scheduler-options`` come first, ours after them.
    ``cores`` given to dask-jobqueue is the number of Dask task threads (it becomes
    ``--nthreads``); the job still asks SLURM for all its cores via ``job_cpu`` so the
    spare CPUs serve torch threads.
    """
    if config.kind != "slurm":
        raise ClusterConfigError(f"slurm_cluster_kwargs needs kind 'slurm', not {config.kind!r}")
    layout = config.layout()
    processes = config.slurm_value("processes")
    threads = layout.gpu_threads if layout.gpu else layout.cpu_threads
    worker_args = [str(a) for a in jobqueue_config("worker-extra-args", None) or ()]
    extra = list(config.slurm_value("job_extra_directives") or ())
    if config.gpus_per_worker:
        extra.insert(0, f"--gres=gpu:{config.gpus_per_worker}")
        worker_args += ["--resources", f"GPU={config.gpus_per_worker}"]
    if config.lifetime_enabled:
        lifetime, stagger = config.lifetime_seconds()
        worker_args += ["--lifetime", format_duration(lifetime),
                        "--lifetime-stagger", format_duration(stagger)]
    interface = config.slurm_value("interface")
    scheduler_options: dict[str, Any] = dict(jobqueue_config("scheduler-options", None) or {})
    scheduler_options["dashboard_address"] = config.dashboard_address
    if config.scheduler_host:
        scheduler_options["host"] = config.scheduler_host
    elif config.scheduler_interface:
        _check_local_interface(config.scheduler_interface, "scheduler_interface")
        scheduler_options["interface"] = config.scheduler_interface
    elif interface and not ({"host", "interface"} & set(scheduler_options)):
        # dask-jobqueue would bind the scheduler to the workers' interface: check it here
        _check_local_interface(interface, "interface")
        scheduler_options["interface"] = interface
    kwargs: dict[str, Any] = {
        "walltime": format_slurm_time(config.walltime_seconds()),
        "cores": threads * processes,
        "job_cpu": config.slurm_value("cores"),
        "processes": processes,
        "memory": config.slurm_value("memory"),
        "interface": interface,
        "scheduler_options": scheduler_options,
        "local_directory": config.slurm_value("local_directory"),
        "job_extra_directives": extra,
        "worker_extra_args": worker_args,
    }
    for name in ("queue", "account", "job_name", "log_directory", "python", "job_script_prologue",
                 "job_directives_skip", "death_timeout"):
        value = getattr(config, name)
        if value is not None:  # else dask-jobqueue reads jobqueue.slurm.* itself
            kwargs[name] = list(value) if isinstance(value, tuple) else value
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


def local_worker_specs(layout: Layout, memory_limit: str = "auto",
                       local_directory: str | None = None,
                       silence_logs: int | bool = logging.WARNING) -> dict[str, dict[str, Any]]:
    """``SpecCluster`` worker specs (Nanny processes) for a local ``layout``.

    Why per-worker specs and not a ``LocalCluster``: GPU workers need their own
    ``CUDA_VISIBLE_DEVICES`` and a ``GPU`` resource, CPU workers of a GPU layout none of
    either (an empty ``CUDA_VISIBLE_DEVICES``: no CUDA context, no GPU memory). The Nanny
    sets ``env`` in the worker process before anything there touches CUDA, and keeps it
    when it restarts a worker that died. ``memory_limit`` ``auto`` splits this machine's
    memory evenly over the processes.
    """
    if memory_limit == "auto":
        memory: int | str | None = parse_memory_limit("auto", 1, layout.n_workers, logger=log)
    else:
        memory = memory_limit
    common: dict[str, Any] = {"memory_limit": memory, "local_directory": local_directory,
                              "host": "127.0.0.1", "dashboard": False, "silence_logs": silence_logs}
    specs: dict[str, dict[str, Any]] = {}
    for i, device in enumerate(layout.cuda_devices):
        specs[f"gpu-{i}"] = {"cls": Nanny, "options": {
            **common, "nthreads": layout.gpu_threads, "resources": {"GPU": 1},
            "env": {"CUDA_VISIBLE_DEVICES": device}}}
    pool = ({"env": {"CUDA_VISIBLE_DEVICES": ""}, "resources": {POOL_RESOURCE: layout.cpu_threads}}
            if layout.gpu else {})
    for i in range(layout.cpu_workers):
        specs[f"cpu-{i}"] = {"cls": Nanny, "options": {**common, "nthreads": layout.cpu_threads, **pool}}
    return specs


@contextlib.contextmanager
def _local_cluster(config: ClusterConfig, debug: bool = False) -> Iterator[SpecCluster]:
    layout = config.layout()
    if layout.gpu:
        log.info("local cluster: %d GPU worker(s) (CUDA devices %s) x %d task thread(s) + %d CPU "
                 "worker(s) x %d, torch threads %d", layout.gpu_workers,
                 ",".join(layout.cuda_devices), layout.gpu_threads, layout.cpu_workers,
                 layout.cpu_threads, layout.torch_threads)
    else:
        log.info("local cluster: %d worker process(es) x %d task thread(s), torch threads %d",
                 layout.cpu_workers, layout.cpu_threads, layout.torch_threads)
    silence: int | bool = False if debug else logging.WARNING
    scheduler = {"cls": Scheduler, "options": {
        "host": "127.0.0.1", "dashboard": config.dashboard_address is not None,
        "dashboard_address": config.dashboard_address}}
    cluster = SpecCluster(workers=local_worker_specs(layout, config.memory_limit,
                                                     config.local_directory, silence),
                          scheduler=scheduler, silence_logs=silence)
    try:
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def open_client(config: ClusterConfig, *, wait_for_workers: int = 0,
                timeout: float | None = None, debug: bool = False) -> Iterator[Client]:
    """A connected :class:`Client` for ``config``; everything it started is closed on exit.

    ``local``: worker processes on this machine (:func:`local_worker_specs`; spawned, so
    nothing — CUDA, OpenSlide handles — is inherited through fork). ``address``: attach to a
    running scheduler (left running on exit). ``slurm``: a scheduler here plus worker jobs,
    sized by ``adapt`` (see :class:`ClusterConfig`); the jobs are cancelled on exit.
    ``wait_for_workers`` blocks until that many workers joined (``timeout`` seconds), which
    avoids a silent wait on a full queue. Unless ``debug``, the clusters started here do not
    print Dask's per-task failure reports (:class:`QuietTaskErrors`); an attached
    scheduler's workers keep their own logging.
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
        else:
            if not debug:  # the scheduler runs in this process
                quiet_task_errors(True)
                stack.callback(quiet_task_errors, False)
            if config.kind == "local":
                cluster = stack.enter_context(_local_cluster(config, debug))
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
                         "dashboard %s", cluster.scheduler_address, minimum, maximum,
                         config.slurm_value("cores"), format_bytes(parse_bytes(config.slurm_value("memory"))),
                         format_slurm_time(config.walltime_seconds()), client.dashboard_link)
            if not debug:
                client.register_plugin(QuietTaskErrors(), name=QUIET_PLUGIN_NAME)
        stack.callback(client.close)
        if wait_for_workers:
            client.wait_for_workers(wait_for_workers, timeout=timeout)
        yield client


# --------------------------------------------------------------------------- model plugin


class _NoInference(torch.nn.Module):
    """The network of a CPU worker in a GPU layout: its config and weights (tasks that only
    plan a slide need them), but no forward pass.

    Why: exact stitching compares the outputs of neighbouring tiles, so all tiles of a run
    must come from one device; CPU and GPU sums differ in the last bits. An inference task
    that lands here was submitted without :func:`predict_resources`.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.inner = net
        self.config = net.config

    def forward(self, *args: Any) -> NoReturn:
        raise RuntimeError("inference on a CPU worker of a GPU cluster: submit inference tasks "
                           "with resources=pipeline.cluster.predict_resources(layout) so they run "
                           "on the GPU workers (mixing devices would break exact stitching)")


class ModelPlugin(WorkerPlugin):
    """Loads the model once per worker process; tasks get it with :func:`get_worker_model`.

    Registered with ``client.register_plugin`` so workers that join later (``adapt``,
    replacement after ``--lifetime`` or a crash) load it too. The device is chosen on the
    worker (``auto``: the worker's own GPU if it has one), and ``torch_threads`` is set
    there because the Nanny starts workers with ``OMP_NUM_THREADS=1``. With
    ``cpu_inference=False`` (GPU layouts) only the workers that advertise the ``GPU``
    resource may run the network; the others (the CPU pool) keep the model for planning
    and watershed settings only (:class:`_NoInference`). The rule follows the resource,
    not the device the model landed on, because the resource is what routes inference
    tasks: a layout tested on a machine without CUDA runs its "GPU" worker on the CPU.
    """

    name = PLUGIN_NAME

    def __init__(self, model: str | os.PathLike, device: str = "auto",
                 torch_threads: int | None = None, cpu_inference: bool = True) -> None:
        self.model = str(model)
        self.device = device
        self.torch_threads = torch_threads
        self.cpu_inference = cpu_inference
        self.bundle: ModelBundle | None = None
        self.loads = 0  # how many times this process loaded the model (tests, diagnostics)

    def _load(self, may_infer: bool = True) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        bundle = load_for_inference(self.model, self.device)
        import_task_modules()
        if not self.cpu_inference and not may_infer:
            bundle = dataclasses.replace(bundle, net=_NoInference(bundle.net))
        self.bundle = bundle
        self.loads += 1

    async def setup(self, worker: Any) -> None:
        # off the event loop: a large file on a slow shared FS must not stall heartbeats
        resources = getattr(getattr(worker, "state", None), "total_resources", None) or {}
        may_infer = resources.get("GPU", 0) > 0
        await asyncio.get_running_loop().run_in_executor(None, self._load, may_infer)
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
    ``device`` overrides ``config.device``; the layout of ``config`` decides the device each
    worker asks for and whether CPU workers may run inference.
    """
    path = resolve(model).resolve()
    config = config or ClusterConfig()
    if device is not None and device != config.device:
        config = dataclasses.replace(config, device=device)
    if config.kind == "address":
        plugin = ModelPlugin(path, device=config.device, torch_threads=config.torch_threads)
    else:
        layout = config.layout()
        plugin = ModelPlugin(path, device=layout.device, torch_threads=layout.torch_threads,
                             cpu_inference=not layout.gpu)
    client.register_plugin(plugin, name=PLUGIN_NAME)
    return plugin


_local_lock = threading.Lock()


def load_for_inference(model: str | os.PathLike, device: str) -> ModelBundle:
    """The model as a worker runs it: BatchNorm folded, this process's allocator told to
    keep freed memory (~1.5x faster CPU forward passes, no page faults per call), and on
    CUDA deterministic numerics (no TF32, fixed cuDNN algorithms: :mod:`pipeline.determinism`),
    which exact stitching needs. On the CPU, the checkpoint's OpenVINO model where there is
    one (:func:`models.runtime.with_runtime`)."""
    retain_freed_memory()
    target = pick_device(device)
    pin_cuda_numerics(target)
    return with_runtime(load(model, target, fold_bn=True), target)


def import_task_modules() -> None:
    """Import what tasks import lazily (``TASK_MODULES``), once per process, when its model
    loads: before the first slide starts, in a worker and in ``--cluster none`` alike."""
    for name in TASK_MODULES:
        importlib.import_module(name)


@functools.lru_cache(maxsize=4)
def _load_in_process(path: str, device: str) -> ModelBundle:
    bundle = load_for_inference(path, device)
    import_task_modules()
    return bundle


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


def _describe(item: Any) -> str:
    """A failed item in a log line: its repr, cut to ``ITEM_REPR_CHARS``."""
    text = repr(item)
    return text if len(text) <= ITEM_REPR_CHARS else text[:ITEM_REPR_CHARS - 3] + "..."


def bounded_map(client: Client, fn: Callable[[T], Any], items: Iterable[T], max_in_flight: int,
                *, retries: int = 0, resources: Mapping[str, float] | None = None,
                then: Sequence[tuple[Callable[[Any], Any], Mapping[str, float] | None]] = (),
                **submit_kwargs: Any) -> Iterator[tuple[T, Any]]:
    """``(item, fn(item))`` in completion order, with at most ``max_in_flight`` futures alive.

    ``items`` is consumed lazily, so a generator of a million tiles never becomes a million
    futures (scheduler memory, client memory). ``resources`` restricts the tasks to workers
    that advertise them (``{"GPU": 1}``: :func:`predict_resources`). A task that raises
    (after ``retries`` re-runs) or whose workers kept dying (``KilledWorker``) yields a
    :class:`TaskFailure` for its item and the others go on; each failure is logged as one
    WARNING line, its worker traceback at DEBUG. Keys are unique (``pure=False``) unless the
    caller passes ``pure``/``key``.

    ``then``: more tasks per item, chained, each ``(function, resources)`` applied to the
    previous one's result (e.g. read on the CPU pool, predict on a GPU worker, post-process
    on the pool); the result yielded is the last one's. Intermediate results go worker to
    worker, never through this client, and are freed once the next task has run; a failed
    task fails its item with its own error. ``max_in_flight`` counts items, not tasks.
    """
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, not {max_in_flight}")
    submit_kwargs.setdefault("pure", False)
    if resources:
        submit_kwargs["resources"] = dict(resources)
    later = {k: v for k, v in submit_kwargs.items() if k not in ("resources", "key")}
    stages = [(stage, {**later, **({"resources": dict(res)} if res else {})}) for stage, res in then]
    source = iter(items)
    pending: dict[str, T] = {}
    done = as_completed()

    def submit_next() -> bool:
        try:
            item = next(source)
        except StopIteration:
            return False
        future = client.submit(fn, item, retries=retries, **submit_kwargs)
        for stage, options in stages:
            future = client.submit(stage, future, retries=retries, **options)
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
                log.warning("task %s failed: %s", _describe(item), " ".join(str(outcome).split()))
                if tb:
                    log.debug("traceback of the failed task %s (on the worker):\n%s",
                              _describe(item), tb)
            future.release()
            submit_next()  # refill before handing out the result: keep workers busy
            yield item, outcome
    finally:  # closed early: dropping the futures cancels the tasks not yet run
        pending.clear()
        done.clear()
