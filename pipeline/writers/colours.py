"""The colours every output draws its layers in, so the preview PNG, the OME-Zarr label
metadata and the napari view agree (and neither writer imports the other for them)."""

from __future__ import annotations

__all__ = ["CELL_RGB", "NUCLEUS_RGB", "TISSUE_RGB"]

NUCLEUS_RGB = (0, 255, 0)  # green: visible on pink/purple H&E
TISSUE_RGB = (0, 90, 255)  # blue tissue contour
CELL_RGB = (255, 200, 0)  # amber cell boundaries (--cell-expansion), apart from the green nuclei
