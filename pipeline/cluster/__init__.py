"""Where the pipeline's tasks run: a local cluster, an existing scheduler, or SLURM jobs.

This is the only package that imports ``distributed`` / ``dask_jobqueue``: the rest of the
pipeline receives a :class:`distributed.Client` (or ``None`` for the sequential path) and
calls :func:`bounded_map` and :func:`get_worker_model`, so the maths never depends on how
it is scheduled.

Modules, one job each: :mod:`~pipeline.cluster.layout` (worker processes, threads, GPUs and
task resources), :mod:`~pipeline.cluster.config` (:class:`ClusterConfig`, cluster files,
durations), :mod:`~pipeline.cluster.local` and :mod:`~pipeline.cluster.slurm` (the clusters),
:mod:`~pipeline.cluster.client` (:func:`open_client`), :mod:`~pipeline.cluster.plugin` (the
model on the workers) and :mod:`~pipeline.cluster.submit` (:func:`bounded_map`, failure
reports). This module re-exports what the rest of the pipeline, the benchmarks and the
documented commands use.
"""

from pipeline.cluster.client import open_client
from pipeline.cluster.config import ClusterConfig, cluster_config_from
from pipeline.cluster.errors import ClusterConfigError
from pipeline.cluster.layout import plan_layout, post_resources, predict_resources
from pipeline.cluster.plugin import get_worker_model, load_for_inference, register_model
from pipeline.cluster.slurm import slurm_job_script
from pipeline.cluster.submit import TaskFailure, bounded_map

__all__ = ["ClusterConfig", "ClusterConfigError", "TaskFailure", "bounded_map",
           "cluster_config_from", "get_worker_model", "load_for_inference", "open_client",
           "plan_layout", "post_resources", "predict_resources", "register_model",
           "slurm_job_script"]  # the last: the job-script preview in workflows/README.md
