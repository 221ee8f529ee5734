"""Cells as QuPath makes them with ``cellExpansion``: their measurements (table columns)
and their GeoJSON features (``objectType: "cell"``, the cell boundary as ``geometry``
and the nucleus as ``nucleusGeometry``).

Names follow QuPath 0.6 (``ObjectMeasurements``): a cell's own shape and intensities
behind ``Cell: ``, the cytoplasm's (the cell without its nucleus) behind ``Cytoplasm: ``,
the nucleus's behind ``Nucleus: `` (in the GeoJSON; the table keeps the nucleus's
columns unprefixed, one row per nucleus and its cell), ``Nucleus/Cell area ratio``, and
``Detection probability`` unprefixed, as StarDist writes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.measure.intensity import INTENSITY_NAMES, cell_intensities
from pipeline.measure.shape import AREA, SHAPE_NAMES, shape_measurements
from pipeline.measure.stain import StainVectors
from pipeline.writers.features import CELL_RATIO, feature_bodies, geometry_text, measurement_texts
from pipeline.writers.outlines import trace_tile
from pipeline.writers.table import PROBABILITY

CELL = "Cell: "
CYTOPLASM = "Cytoplasm: "
NUCLEUS = "Nucleus: "
CELL_CLASS = {"name": "Cell", "color": [0, 200, 0]}
# the table's columns of a cell, after the nucleus's own
CELL_COLUMNS: tuple[str, ...] = (*(CELL + n for n in SHAPE_NAMES), *(CELL + n for n in INTENSITY_NAMES),
                                 *(CYTOPLASM + n for n in INTENSITY_NAMES), CELL_RATIO)


def cell_measurements(cells: np.ndarray, nuclei: np.ndarray, rgb: np.ndarray, offset_yx: tuple[int, int],
                      scale: float, mpp_level0: float, origin_shift: tuple[float, float],
                      stains: StainVectors, nucleus_columns: Mapping[str, np.ndarray]
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``CELL_COLUMNS`` of every cell of a model-pixel crop (rows in id order, the ids of
    ``nucleus_columns``, whose ``Area µm^2`` gives the ratio) and the cell outlines."""
    outlines = trace_tile(cells, offset_yx, scale, origin_shift, pieces_expected=True)
    ids = outlines.values
    expected = np.asarray(nucleus_columns["id"])
    if not np.array_equal(ids, expected):
        raise ValueError(f"{len(ids)} cells for {len(expected)} nuclei: every nucleus needs its cell")
    columns = {**shape_measurements(outlines.polygons, mpp_level0, CELL),  # cytoplasm: cell less nucleus
               **cell_intensities(cells, nuclei, rgb, stains, ids, CELL, CYTOPLASM)}
    cell_area = columns[CELL + AREA]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(nucleus_columns[AREA], np.float64) / cell_area
    columns[CELL_RATIO] = np.clip(np.where(cell_area > 0, ratio, np.nan), 0.0, 1.0)
    return {name: columns[name] for name in CELL_COLUMNS}, outlines.polygons


def cell_features(polygons: np.ndarray, columns: Mapping[str, np.ndarray],
                  nucleus_bodies: Sequence[str]) -> list[str]:
    """Each cell's QuPath feature text without its id (``features.feature_texts`` splices
    it in): the nucleus's measurements behind ``Nucleus: `` and its outline, both from its
    detection feature (``nucleus_bodies``), then the cell's."""
    return feature_bodies(polygons, columns, CELL_CLASS,
                          nucleus_geometries=[geometry_text(b) for b in nucleus_bodies],
                          lead=measurement_texts(nucleus_bodies, NUCLEUS, unprefixed=(PROBABILITY,)))
