"""The model on the workers: loaded once per worker process (:class:`ModelPlugin`) and handed to
tasks by :func:`get_worker_model` (or loaded once per process without Dask).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import logging
import os
import threading
from typing import Any, NoReturn

import torch
from distributed import Client, WorkerPlugin, get_worker

from models.checkpoints import ModelBundle, load, resolve
from models.inference import pick_device, retain_freed_memory
from models.runtime import with_runtime
from pipeline.cluster.config import ClusterConfig
from pipeline.determinism import pin_cuda_numerics

log = logging.getLogger(__name__)

PLUGIN_NAME = "wsi-nuclei-model"
# what tasks import, imported when a worker starts (with the model) rather than inside the
# first slide's tasks: 1-2.5 s per worker, paid once at start-up either way, but no longer
# counted in (and skewing) the first slide's timings and tile phases
TASK_MODULES = ("pipeline.slide.open", "pipeline.slide.region", "pipeline.stitch.tile", "pipeline.tissue",
                "pipeline.label_sampling",
                "pipeline.slide_run.plan", "pipeline.slide_run.tiles", "pipeline.slide_run.tile_file",
                "pipeline.slide_run.blocks", "pipeline.slide_run.outputs", "pipeline.slide_run.cells",
                "pipeline.measure.cells", "pipeline.writers.cells", "pipeline.writers.outlines",
                "pipeline.writers.features", "pipeline.writers.geojson",
                "pipeline.writers.table", "pipeline.writers.labels", "pipeline.writers.preview",
                "pipeline.writers.summary", "pipeline.writers.ngff",
                "anndata")  # anndata: the finalising task's table


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

