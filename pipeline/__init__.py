"""Whole-slide nucleus segmentation: read, tissue, tile, infer, stitch, write."""

__version__ = "0.1.0"
