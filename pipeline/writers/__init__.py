"""Slide outputs: OME-Zarr store (RGB slide copy, nuclei and tissue labels), nucleus table,
QuPath GeoJSON, preview, summary. Single-file outputs are written atomically;
``summary.json`` is written last and marks a slide as complete (see
``pipeline.writers.summary``)."""

# No re-exports: workers import only the writer modules their tasks use (importing
# ``table`` here would pull anndata, ~1.5 s, into every worker's first tile).
