"""``wsi-nuclei export``: a finished slide's outputs in other tools' formats (today:
SpatialData, ``pipeline.export_spatialdata``). A thin layer: flags in, one call out."""

from __future__ import annotations

import argparse

from pipeline.cliutil import formatter
from pipeline.export_spatialdata import EXPORT_NAME, INSTALL_HINT, export_spatialdata

__all__ = ["add_export"]


def add_export(sub: argparse._SubParsersAction) -> None:
    """Register ``wsi-nuclei export``."""
    p = sub.add_parser(
        "export", formatter_class=formatter, help="a finished slide as a SpatialData store",
        description=f"Write OUT/<slide>/{EXPORT_NAME}, a SpatialData store (scverse) made with "
                    "spatialdata's own API: the slide image (full resolution, read lazily from "
                    "the slide's file; else the reduced copy in nuclei.zarr), the nuclei and "
                    "tissue labels with their pyramids, and the nucleus table linked to the "
                    "nuclei labels, all in µm. Open it with spatialdata.read_zarr. "
                    f"Needs spatialdata: {INSTALL_HINT}",
        epilog="examples:\n"
               "  wsi-nuclei export results/CMU-1 --spatialdata\n"
               "  wsi-nuclei export results/CMU-1 --spatialdata --no-slide   # small: reduced image\n"
               "  wsi-nuclei export results/CMU-1 --spatialdata --overwrite")
    p.add_argument("folder", help="a finished slide's output folder OUT/<slide>")
    formats = p.add_mutually_exclusive_group(required=True)
    formats.add_argument("--spatialdata", action="store_true",
                         help=f"write OUT/<slide>/{EXPORT_NAME}")
    p.add_argument("--no-slide", action="store_true",
                   help="take the image from nuclei.zarr's reduced copy instead of copying the "
                        "full-resolution slide (a 40x slide is GBs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    export_spatialdata(args.folder, slide=not args.no_slide, overwrite=args.overwrite)
    return 0
