"""How many worker processes, threads and GPUs a cluster has, and which tasks go where.

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
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.cluster.errors import ClusterConfigError

MAX_LOCAL_WORKERS = 8  # CPU layout: beyond this, spare cores go to torch threads (see above)
MAX_POOL_WORKERS = 32  # GPU layout: post-processing processes (~0.4 GB each: torch, buffers)
POOL_RESOURCE = "POOL"  # advertised by the CPU pool of a local GPU layout (post_resources)
LOCAL_GPU_THREADS = 2  # a local GPU worker: its GPU task (GPU=1: one at a time) + one other
GPU_TASK_THREADS = 4  # a SLURM GPU worker (no CPU pool beside it): overlap I/O and watershed
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


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
    if not DEVICE_RE.match(device):
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

