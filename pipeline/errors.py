"""Errors of the slide pipeline (validation raises these; the CLI turns them into one line)."""


class PipelineError(Exception):
    """Base of all pipeline errors."""


class SlideReadError(PipelineError):
    """A slide that cannot be opened or read."""


class MissingMppError(PipelineError):
    """The slide has no pixel size; the user must pass --mpp."""


class NoTissueError(PipelineError):
    """No tissue found on the slide."""


class ConfigError(PipelineError, ValueError):
    """Invalid configuration."""


class StitchError(PipelineError):
    """Tile results that do not fit together."""
