"""What every ``wsi-nuclei`` subcommand module shares (kept apart from ``cli.py`` so that
command modules can import it without a cycle)."""

from __future__ import annotations

import argparse
import logging
from typing import Any, TextIO

# Progress bars written to a file (a SLURM job's log) update at most this often, so a
# slide of thousands of tiles leaves a few lines per minute, not one per tile.
LOG_PROGRESS_S = 60.0


def formatter(prog: str) -> argparse.HelpFormatter:
    """Help text that keeps the examples in each epilog as written."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch CPU threads, the same meaning in every command."""
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default: all cores)")


def set_torch_threads(threads: int) -> None:
    """Apply ``--threads`` (0 leaves torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def progress_options(stream: TextIO) -> dict[str, Any]:
    """``tqdm`` options for a bar on ``stream``: none with ``--quiet`` (warnings and errors
    only), live on a terminal, every ``LOG_PROGRESS_S`` seconds into a file."""
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return {"file": stream, "disable": logging.getLogger().getEffectiveLevel() > logging.INFO,
            "mininterval": 0.1 if tty else LOG_PROGRESS_S}
