"""Per-object measurements with QuPath's names and definitions: shape (from the outline
polygons that go into the GeoJSON) and stain intensities (from colour deconvolution)."""
