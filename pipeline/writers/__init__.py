"""Slide outputs: OME-Zarr store (RGB slide copy, nuclei and tissue labels), nucleus table,
QuPath GeoJSON, preview, summary. Single-file outputs are written atomically;
``summary.json`` is written last and marks a slide as complete (see
``pipeline.writers.summary``)."""

from pipeline.writers.geojson import GeoJSONWriter, label_polygons, nucleus_feature
from pipeline.writers.labels import (
    LabelStoreSpec,
    build_pyramid,
    create_store,
    finalize,
    labels_thumbnail,
    write_block,
    write_image,
    write_tissue,
)
from pipeline.writers.preview import write_preview
from pipeline.writers.summary import is_done, read_summary, write_summary
from pipeline.writers.table import COLUMNS, empty_table, instance_measurements, write_table

__all__ = [
    "COLUMNS",
    "GeoJSONWriter",
    "LabelStoreSpec",
    "build_pyramid",
    "create_store",
    "empty_table",
    "finalize",
    "instance_measurements",
    "is_done",
    "label_polygons",
    "labels_thumbnail",
    "nucleus_feature",
    "read_summary",
    "write_block",
    "write_image",
    "write_preview",
    "write_summary",
    "write_table",
    "write_tissue",
]
