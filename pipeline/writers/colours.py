"""The colours every output draws its layers in, so the preview PNG, the OME-Zarr label
metadata and the napari view agree (and neither writer imports the other for them)."""

from __future__ import annotations

__all__ = ["NUCLEUS_RGB", "TISSUE_RGB"]

NUCLEUS_RGB = (0, 255, 0)  # green: visible on pink/purple H&E
TISSUE_RGB = (0, 90, 255)  # blue tissue contour
