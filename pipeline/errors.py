"""Errors of the slide pipeline (validation raises these; the CLI turns them into one line)."""


class PipelineError(Exception):
    """Base of all pipeline errors."""


class SlideReadError(PipelineError):
    """A slide that cannot be opened or read."""


class MissingMppError(PipelineError):
    """The slide has no usable pixel size (none, or far coarser than the model's); the
    user must pass --mpp."""


class ConfigError(PipelineError, ValueError):
    """Invalid configuration."""
