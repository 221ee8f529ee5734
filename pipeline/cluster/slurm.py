"""Worker jobs on SLURM through dask-jobqueue.

SLURM pitfalls handled here (see ``shared/docs/formats.md`` section 3): ``processes=1`` per
GPU job, one GPU per worker with a ``GPU`` resource, ``--lifetime`` below the walltime (plus
a stagger) so workers retire before SLURM kills them, node-local ``--local-directory``,
``interface`` for the workers without breaking the scheduler on a login node that lacks it,
the job prologue that recreates the environment on the node, and ``job_directives_skip``.
The user's dask-jobqueue settings pass through to dask-jobqueue as its own configuration
(``jobqueue.slurm.*``, laid over the site's); see :meth:`ClusterConfig.slurm_value`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import dask
from distributed.core import Status

from pipeline.cluster.config import ClusterConfig, format_duration, format_slurm_time
from pipeline.cluster.errors import ClusterConfigError, JobSubmitError
from pipeline.cluster.submit import no_more_workers

log = logging.getLogger(__name__)

SUBMIT_TIMEOUT_S = 120  # sbatch answers in seconds; a stuck slurmctld must not hang the run
CLOSE_TIMEOUT_S = 30  # closing after an error: a stuck sbatch must not hang the exit either


def _check_local_interface(name: str, what: str) -> None:
    import psutil  # a dependency of distributed

    known = sorted(psutil.net_if_addrs())
    if name not in known:
        raise ClusterConfigError(
            f"{what} {name!r} does not exist on this host ({', '.join(known)}). The scheduler runs "
            f"here, not on the compute nodes: keep interface={name!r} for the workers and set "
            f"scheduler_interface (e.g. one of the above) or scheduler_host.")


def slurm_cluster_kwargs(config: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster``: only the values we compute with.

    The rest of the user's settings reach dask-jobqueue as its own configuration
    (:func:`slurm_cluster`). The values we compute with (walltime, cores, processes, memory,
    interface, local directory, extra directives) are resolved by
    :meth:`ClusterConfig.slurm_value` and passed explicitly; dask-jobqueue's
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
    worker_args = [str(a) for a in config.slurm_value("worker-extra-args") or ()]
    extra = list(config.slurm_value("job-extra-directives") or ())
    if config.gpus_per_worker:
        extra.insert(0, f"--gres=gpu:{config.gpus_per_worker}")
        worker_args += ["--resources", f"GPU={config.gpus_per_worker}"]
    if config.lifetime_enabled:
        lifetime, stagger = config.lifetime_seconds()
        worker_args += ["--lifetime", format_duration(lifetime),
                        "--lifetime-stagger", format_duration(stagger)]
    interface = config.slurm_value("interface")
    scheduler_options: dict[str, Any] = dict(config.slurm_value("scheduler-options") or {})
    if config.dashboard_address != "auto":  # else the site's (dask-jobqueue's) scheduler-options
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
    return {
        "walltime": format_slurm_time(config.walltime_seconds()),
        "cores": threads * processes,
        "job_cpu": config.slurm_value("cores"),
        "processes": processes,
        "memory": config.slurm_value("memory"),
        "interface": interface,
        "scheduler_options": scheduler_options,
        "local_directory": config.local_directory or config.slurm_value("local-directory"),
        "job_extra_directives": extra,
        "worker_extra_args": worker_args,
    }


def _import_jobqueue() -> Any:
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ClusterConfigError("kind 'slurm' needs dask-jobqueue: pip install 'wsi-nuclei[hpc]'") from exc
    return dask_jobqueue


@contextlib.contextmanager
def slurm_cluster(config: ClusterConfig) -> Iterator[Any]:
    """A started ``SLURMCluster`` (scheduler here, no jobs yet), closed on exit.

    The user's dask-jobqueue settings (``config.jobqueue``) are dask-jobqueue's
    configuration while it lives (each job reads queue, account, name ... when it is made),
    laid over the site's, which keeps every key they do not name."""
    dask_jobqueue = _import_jobqueue()
    with dask.config.set({f"jobqueue.slurm.{key}": value for key, value in config.jobqueue.items()}):
        cluster = dask_jobqueue.SLURMCluster(**slurm_cluster_kwargs(config))
        try:
            yield cluster
        except BaseException:
            try:  # the error that ended the run is the one to report
                cluster.close(timeout=CLOSE_TIMEOUT_S)
            except Exception as exc:
                log.debug("closing the SLURM cluster after an error: %r", exc)
            raise
        cluster.close()


def slurm_job_script(config: ClusterConfig) -> str:
    """The batch script each worker job would run (starts and stops a scheduler to get it)."""
    with slurm_cluster(config) as cluster:
        return cluster.job_script()


def sbatch_error_line(exc: BaseException) -> str:
    """dask-jobqueue's multi-line report of a failed ``sbatch`` (exit code, command, stdout,
    stderr) as one line: the exit code and what sbatch said."""
    text = str(exc)
    match = re.search(r"Exit code: (\d+).*?stdout:\n(.*?)\nstderr:\n(.*)", text, re.S)
    if match is None:
        return f"{type(exc).__name__}: {' '.join(text.split())}"
    said = " ".join(match.group(3).split()) or " ".join(match.group(2).split()) or "no message"
    return f"sbatch exited {match.group(1)}: {said}"


def submit_jobs(cluster: Any, jobs: int, timeout: float = SUBMIT_TIMEOUT_S) -> None:
    """Submit ``jobs`` worker jobs now and wait for sbatch's answers (not for the jobs to run).

    Why not leave it to ``adapt``: there a refused job (bad partition, account, limits) is
    one tornado traceback, and the run then waits for that job's worker forever. Here it is
    a :class:`JobSubmitError` with sbatch's message in one line. (``_correct_state`` starts
    the jobs of ``worker_spec`` and re-raises their errors; ``scale`` would run it unawaited.)
    """
    if jobs < 1:
        return
    for _ in range(jobs):
        cluster.worker_spec.update(cluster.new_worker_spec())
    try:
        cluster.sync(cluster._correct_state, callback_timeout=timeout)
    except (TimeoutError, asyncio.TimeoutError, RuntimeError) as exc:
        _forget_unsubmitted(cluster)
        if isinstance(exc, RuntimeError):  # dask-jobqueue's report of a non-zero exit
            raise JobSubmitError(_refused(exc)) from exc
        raise JobSubmitError(f"SLURM worker job: sbatch did not answer within {timeout:.0f} s") from exc


def _refused(exc: BaseException) -> str:
    return f"SLURM worker job refused: {sbatch_error_line(exc)}"


def watch_resubmissions(cluster: Any) -> None:
    """Make a job that sbatch refuses later in the run (``adapt`` replacing a worker retired
    at its lifetime, or scaling up) end the run: :func:`no_more_workers` with sbatch's message
    and one ERROR line, where it was a tornado traceback and a wait for that worker forever.
    After :func:`submit_jobs`, whose own refusals raise. (Every submission runs
    ``_correct_state_internal``; ``scale`` and ``adapt`` only schedule it on the loop.)"""
    correct_state = cluster._correct_state_internal

    async def correct_state_or_report() -> None:
        try:
            await correct_state()
        except RuntimeError as exc:  # dask-jobqueue's report of a non-zero exit
            _forget_unsubmitted(cluster)
            log.error("%s: the run ends", _refused(exc))
            no_more_workers(cluster, _refused(exc))

    cluster._correct_state_internal = correct_state_or_report


def _forget_unsubmitted(cluster: Any) -> None:
    """Mark the jobs that got no SLURM job id failed and drop them: closing the cluster
    cancels the submitted ones, and refuses (an assertion) jobs left in the status
    ``created``, as a refused or unanswered submission leaves them."""
    for job in list(cluster._created):
        if getattr(job, "job_id", None) is None:
            job.status = Status.failed
    for name, job in list(cluster.workers.items()):
        if getattr(job, "job_id", None) is None:
            del cluster.workers[name]
    for name in set(cluster.worker_spec) - set(cluster.workers):
        del cluster.worker_spec[name]
