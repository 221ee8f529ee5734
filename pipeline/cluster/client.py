"""A connected Dask client for a :class:`ClusterConfig`: local cluster, attached scheduler or SLURM.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import dask
from dask.utils import format_bytes, parse_bytes, parse_timedelta
from distributed import Client

from pipeline.cluster.config import ADDRESS_RE, ClusterConfig, format_slurm_time
from pipeline.cluster.errors import JobSubmitError, SchedulerUnreachable
from pipeline.cluster.local import local_cluster
from pipeline.cluster.slurm import slurm_cluster, submit_jobs, watch_resubmissions
from pipeline.cluster.submit import QUIET_PLUGIN_NAME, QuietTaskErrors, quiet_task_errors, why_no_workers

log = logging.getLogger(__name__)

def _attach(scheduler: str, timeout: float | None) -> Client:
    """A client of a running scheduler (address or scheduler file), waiting at most
    ``timeout`` s, by default Dask's connect timeout (``distributed.comm.timeouts.connect``);
    nothing there is one line (:class:`SchedulerUnreachable`), not a chained traceback."""
    if timeout is None:
        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))
    try:
        if ADDRESS_RE.match(scheduler):
            return Client(scheduler, timeout=timeout)
        return Client(scheduler_file=scheduler, timeout=timeout)
    except OSError as exc:  # TimeoutError included
        raise SchedulerUnreachable(f"--scheduler {scheduler}: no scheduler answers there "
                                   f"({' '.join(str(exc).split()) or type(exc).__name__})") from exc


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
    scheduler's workers keep their own logging. A SLURM job that sbatch refuses, at the
    start or later, ends the run with :class:`JobSubmitError` (sbatch's message, one line).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}))
        if config.kind == "address":
            assert config.scheduler is not None  # validated
            client = _attach(config.scheduler, timeout)
            log.info("attached to scheduler %s", client.scheduler.address)
        else:
            if not debug:  # the scheduler runs in this process
                quiet_task_errors(True)
                stack.callback(quiet_task_errors, False)
            if config.kind == "local":
                cluster = stack.enter_context(local_cluster(config, debug))
                client = Client(cluster)
            else:
                cluster = stack.enter_context(slurm_cluster(config))
                if config.adaptive:
                    minimum, maximum = config.minimum_jobs or 0, config.maximum_jobs
                else:
                    minimum = maximum = config.jobs
                # sbatch's answer before the run waits for workers (at least one job, even adaptive)
                submit_jobs(cluster, max(minimum, min(maximum, 1)))
                watch_resubmissions(cluster)  # later refusals end the run (see the end)
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
        why = why_no_workers(client)
        if why is not None:  # the slides failed with it; the run ends with it too
            raise JobSubmitError(why)

