"""What every ``wsi-nuclei`` subcommand module shares (kept apart from ``cli.py`` so that
command modules can import it without a cycle)."""

from __future__ import annotations

import argparse


def formatter(prog: str) -> argparse.HelpFormatter:
    """Help text that keeps the examples in each epilog as written."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)
