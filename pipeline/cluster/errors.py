"""The cluster package's errors: each is a ``ValueError``, so the CLI reports it as one line
(exit 2) instead of a traceback."""


class ClusterConfigError(ValueError):
    """A cluster configuration that cannot work; the message says which field and why."""

