"""A cluster of worker processes on this machine, one spec per worker (GPU pinning, CPU pool).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from distributed import Nanny, Scheduler, SpecCluster
from distributed.worker_memory import parse_memory_limit

from pipeline.cluster.config import ClusterConfig
from pipeline.cluster.layout import POOL_RESOURCE, Layout

log = logging.getLogger(__name__)

LOCAL_DASHBOARD = ":8787"  # dashboard_address 'auto' on a local cluster (Dask's default port)

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
def local_cluster(config: ClusterConfig, debug: bool = False) -> Iterator[SpecCluster]:
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
    dashboard = LOCAL_DASHBOARD if config.dashboard_address == "auto" else config.dashboard_address
    scheduler = {"cls": Scheduler, "options": {
        "host": "127.0.0.1", "dashboard": dashboard is not None, "dashboard_address": dashboard}}
    cluster = SpecCluster(workers=local_worker_specs(layout, config.memory_limit,
                                                     config.local_directory, silence),
                          scheduler=scheduler, silence_logs=silence)
    try:
        yield cluster
    finally:
        cluster.close()

