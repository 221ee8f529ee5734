"""The cluster package's errors: each is a ``ValueError``, so the CLI reports it as one line
(exit 2) instead of a traceback."""


class ClusterConfigError(ValueError):
    """A cluster configuration that cannot work; the message says which field and why."""



class SchedulerUnreachable(ClusterConfigError):
    """``--scheduler`` names an address (or scheduler file) where no scheduler answers."""


class JobSubmitError(ClusterConfigError):
    """SLURM refused a worker job (partition, account, limits: the cluster settings) or
    ``sbatch`` did not answer; the message is sbatch's, in one line."""
