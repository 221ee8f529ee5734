"""What a cluster should be (:class:`ClusterConfig`), read from a cluster file and CLI flags;
the SLURM durations it validates (walltime, worker lifetime).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import dask
from dask.utils import parse_bytes, parse_timedelta

from pipeline.cluster.errors import ClusterConfigError
from pipeline.cluster.layout import (
    DEVICE_RE,
    GPU_TASK_THREADS,
    Layout,
    available_cores,
    plan_layout,
    visible_gpus,
)

KINDS = ("local", "address", "slurm")
LIFETIME_MARGIN_S = 600  # default lifetime = walltime - 10 min (at most 20 % of walltime)
LIFETIME_STAGGER_S = 300
ADDRESS_RE = re.compile(r"^(tcp|tls|ucx|ws|wss|inproc)://\S+$|^[\w.\-]+:\d+$")
_COMPOUND_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


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


SLURM_SCRATCH = "${TMPDIR:-/tmp}"  # expanded by bash on the compute node, not here
# cluster-file options and flags that name a dask-jobqueue setting -> its key (``jobqueue.slurm.<key>``);
# a cluster file may also name any other key of dask-jobqueue's configuration, as it spells it
JOBQUEUE_KEYS = {
    "queue": "queue", "account": "account", "walltime": "walltime", "cores": "cores",
    "memory": "memory", "processes": "processes", "job_script_prologue": "job-script-prologue",
    "job_extra_directives": "job-extra-directives", "job_directives_skip": "job-directives-skip",
    "python": "python", "interface": "interface",
    "log_directory": "log-directory", "death_timeout": "death-timeout", "job_name": "name",
}
# what wsi-nuclei uses where neither our file nor dask-jobqueue's configuration has a value
SLURM_FALLBACKS: dict[str, Any] = {"cores": 1, "memory": "4GB", "processes": 1,
                                   "local-directory": SLURM_SCRATCH}
_LIST_KEYS = ("job-script-prologue", "job-extra-directives", "job-directives-skip")


def jobqueue_config(key: str | None, default: Any = None) -> Any:
    """dask-jobqueue's setting ``jobqueue.slurm.<key>`` (``None``: all of them): the user's
    Dask config files, ``DASK_JOBQUEUE__SLURM__*`` environment variables, else
    dask-jobqueue's defaults (registered when ``dask_jobqueue`` is imported)."""
    with contextlib.suppress(ImportError):
        import dask_jobqueue  # noqa: F401  (registers its defaults with dask.config)
    return dask.config.get("jobqueue.slurm" + (f".{key}" if key else ""), default=default)


def jobqueue_key(option: str, *, any_key: bool = True) -> str | None:
    """The dask-jobqueue key that a cluster option names (``job_script_prologue`` ->
    ``job-script-prologue``), else None. ``any_key``: besides ``JOBQUEUE_KEYS``, every key
    of dask-jobqueue's own configuration (cluster files; not CLI arguments, whose ``name``
    is the slide's)."""
    name = str(option).replace("-", "_")
    if name in JOBQUEUE_KEYS:
        return JOBQUEUE_KEYS[name]
    key = name.replace("_", "-")
    known = {str(k).replace("_", "-") for k in jobqueue_config(None, {})} if any_key else set()
    return key if key in known else None


@dataclass(frozen=True)
class ClusterConfig:
    """Everything needed to obtain a Dask client; validated on construction.

    ``kind``: ``local`` (worker processes on this machine, :func:`plan_layout`), ``address``
    (attach to a running scheduler: ``tcp://host:port`` or a scheduler JSON file) or
    ``slurm`` (a scheduler here, workers in SLURM jobs via dask-jobqueue).

    Local and SLURM workers share ``threads_per_worker`` / ``torch_threads``; unset, they
    follow :func:`plan_layout` (local) or one task thread using all of the job's cores in
    torch (SLURM CPU) / ``GPU_TASK_THREADS`` task threads (SLURM GPU).

    SLURM: ``jobqueue`` holds the user's own dask-jobqueue settings (``jobqueue.slurm.<key>``,
    e.g. ``queue``, ``walltime``, ``cores``: the job's ``--cpus-per-task``, ``memory``: per
    job), passed through to dask-jobqueue; what it leaves out is dask-jobqueue's to decide
    (:meth:`slurm_value`): its configuration (Dask config files, ``DASK_JOBQUEUE__SLURM__*``),
    and where that has nothing either, ``SLURM_FALLBACKS``. The other SLURM fields are what
    dask-jobqueue lacks: GPUs per worker, the number of jobs, the workers' lifetime and the
    scheduler's own interface. Fixed-size SLURM clusters (``jobs``) are run
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
    # slurm: the user's dask-jobqueue settings (the rest: dask-jobqueue's configuration)
    jobqueue: Mapping[str, Any] = field(default_factory=dict, hash=False)
    gpus_per_worker: int = 0
    jobs: int = 1
    minimum_jobs: int | None = None
    maximum_jobs: int | None = None
    scheduler_interface: str | None = None  # scheduler's, when the login node lacks the workers'
    scheduler_host: str | None = None
    local_directory: str | None = None  # workers' spill files; SLURM default: jobqueue's, else node scratch
    lifetime: str | None = None  # default: walltime - 10 min; "off" disables
    lifetime_stagger: str | None = None
    # "auto": local ":8787"; SLURM dask-jobqueue's scheduler-options (its default ":8787"); None: off
    dashboard_address: str | None = "auto"

    def __post_init__(self) -> None:
        settings: dict[str, Any] = {}
        for option, value in dict(self.jobqueue).items():
            if value is None:  # not named: dask-jobqueue's configuration decides
                continue
            key = jobqueue_key(option)
            if key is None:
                self._fail("jobqueue", f"{option!r} is no dask-jobqueue setting", dict(self.jobqueue))
            if key in _LIST_KEYS:
                value = [str(v) for v in ([value] if isinstance(value, str) else value)]
            elif key == "walltime":
                # canonical form: YAML reads 01:00:00 as the integer 3600 (base 60), SLURM would
                # read a bare 3600 as minutes
                value = format_slurm_time(self._check_duration("walltime", value))
            settings[key] = value
        object.__setattr__(self, "jobqueue", settings)
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
        if not DEVICE_RE.match(self.device):
            self._fail("device", "must be auto, cpu, cuda, cuda:N or mps")
        if self.memory_limit != "auto":
            self._check_bytes("memory_limit", self.memory_limit)
        if self.kind == "address":
            if not self.scheduler:
                self._fail("scheduler", "kind 'address' needs a scheduler address (tcp://host:port) "
                                        "or a scheduler file")
            if not (ADDRESS_RE.match(self.scheduler) or Path(self.scheduler).suffix == ".json"
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
        cores, processes = self.slurm_value("cores"), self.slurm_value("processes")
        for name, value in (("cores", cores), ("processes", processes),
                            ("death_timeout", self.slurm_value("death-timeout") or 1)):
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
    def slurm_value(self, key: str) -> Any:
        """The dask-jobqueue setting ``key`` in effect: ours (``jobqueue``) if given, else
        dask-jobqueue's configuration, else ``SLURM_FALLBACKS`` (what it leaves unset)."""
        ours = self.jobqueue.get(key)
        if ours is not None:
            return ours
        theirs = jobqueue_config(key)
        return theirs if theirs is not None else SLURM_FALLBACKS.get(key)

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

def _options(data: Mapping[str, Any], source: str, *, any_key: bool) -> dict[str, Any]:
    """``ClusterConfig`` keyword arguments from options (a file's keys, CLI names): field
    names, and dask-jobqueue settings (:func:`jobqueue_key`) gathered in ``jobqueue``.
    Unknown keys are an error where they come from a file (``source``), else ignored."""
    names = {f.name for f in fields(ClusterConfig)} - {"jobqueue"}
    out: dict[str, Any] = {"jobqueue": {}}
    for key, value in data.items():
        name = _CLI_ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        jobqueue = None if name in names else jobqueue_key(name, any_key=any_key)
        if jobqueue is not None:
            out["jobqueue"][jobqueue] = value
        elif name in names:
            out[name] = value
        elif source:
            raise ClusterConfigError(f"{source}: unknown cluster option {key!r} (known: "
                                     f"{', '.join(sorted(names | set(JOBQUEUE_KEYS)))}, or any "
                                     f"dask-jobqueue setting of jobqueue.slurm)")
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
    return _options(data, str(path), any_key=True)


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
    values: dict[str, Any] = read_cluster_file(file) if file else {"jobqueue": {}}
    flags = _options(args, "", any_key=False)
    if "scheduler" in flags and "kind" not in flags:
        flags["kind"] = "address"
    values["jobqueue"].update(flags.pop("jobqueue"))
    values.update(flags)
    workers = args.get("workers")
    if workers is not None:
        if values.get("kind", "local") == "slurm":
            processes = int(values["jobqueue"].get("processes") or jobqueue_config("processes")
                            or SLURM_FALLBACKS["processes"])
            values["jobs"] = max(1, -(-int(workers) // processes))
        else:
            values["n_workers"] = int(workers)
    try:
        return ClusterConfig(**values)
    except TypeError as exc:  # e.g. a list where a number belongs
        raise ClusterConfigError(f"cluster config: {exc}") from exc

