"""The run's configuration (``wsi-nuclei run``'s options) and its checks, made before any
cluster starts; where a slide's results go."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from models.checkpoints import default_model
from pipeline.errors import ConfigError
from pipeline.tiling import DEFAULT_CLUSTER_MARGIN, DEFAULT_TILE_SIZE

MAX_CELL_EXPANSION_UM = 50.0  # a cell reaching further from its nucleus is not a cell
WORK_DIR = ".work"  # a slide's partial work (tile files, label-block markers, fingerprint)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs besides the slide paths; defaults serve a laptop."""

    model: str = field(default_factory=default_model)
    out: str = "results"
    tile_size: int = DEFAULT_TILE_SIZE
    batch_size: int = 1
    mpp: float | None = None
    device: str = "auto"
    gzip: bool = False
    overwrite: bool = False
    tissue_mask: bool = True
    chunk: int = 1024
    cluster_margin: int = DEFAULT_CLUSTER_MARGIN
    keep_outside_tissue: bool = False  # keep nuclei whose centroid is off the tissue mask
    # colour deconvolution: None = estimated per slide from its tissue; "default" = QuPath's
    # H&E defaults; or a QuPath setColorDeconvolutionStains string
    stain_vectors: str | None = None
    # the network sees each tile re-rendered from the slide's stain vectors in the training
    # images' typical H&E (measure.stain.REFERENCE); off: the slide's own colours
    stain_normalise: bool = False
    cell_expansion: float = 0.0  # µm a nucleus grows into its cell; 0: no cells
    cell_constrain_scale: float | None = None  # cells kept inside the nucleus hull scaled by this

    def validate(self) -> None:
        """Raise ``ConfigError`` (the CLI exits 2) for settings no slide can run with, before
        any cluster starts; loads the model's metadata (a missing model raises too)."""
        import math

        from models.checkpoints import load

        multiple = load(self.model, "cpu").config.size_multiple
        problems = []
        if self.tile_size <= 0 or self.tile_size % multiple:
            problems.append(f"tile size {self.tile_size} must be a positive multiple of "
                            f"{multiple} (e.g. {max(multiple, self.tile_size // multiple * multiple)})")
        if self.batch_size < 1:
            problems.append(f"batch size {self.batch_size} must be at least 1")
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            problems.append(f"--mpp {self.mpp} must be a positive number of µm per pixel")
        if self.chunk <= 0 or self.chunk % 16:
            problems.append(f"label chunk {self.chunk} must be a positive multiple of 16")
        if self.cluster_margin < 0:
            problems.append(f"cluster margin {self.cluster_margin} must not be negative")
        if self.stain_vectors is not None:
            from pipeline.measure.stain import StainVectors

            try:
                StainVectors.parse(self.stain_vectors)
            except ValueError as exc:
                problems.append(f"--stain-vectors: {exc}")
        if not (math.isfinite(self.cell_expansion) and self.cell_expansion >= 0):
            problems.append(f"--cell-expansion {self.cell_expansion} must be a number of µm, 0 or more")
        elif self.cell_expansion > MAX_CELL_EXPANSION_UM:
            problems.append(f"--cell-expansion {self.cell_expansion} µm is more than a cell "
                            f"(at most {MAX_CELL_EXPANSION_UM:g})")
        if self.cell_constrain_scale is not None:
            if not self.cell_expansion:
                problems.append("--cell-constrain-scale needs --cell-expansion")
            if not (math.isfinite(self.cell_constrain_scale) and self.cell_constrain_scale >= 1):
                problems.append(f"--cell-constrain-scale {self.cell_constrain_scale} must be 1 or more "
                                "(the hull scaled about the nucleus's centre)")
        problems += _output_folder_problems(Path(self.out))
        if problems:
            raise ConfigError("; ".join(problems))


def _output_folder_problems(out: Path) -> list[str]:
    """Why results could not be written under ``out`` (a file there, or a folder this user
    may not write), found before any cluster starts instead of after the first slide."""
    if out.exists() and not out.is_dir():
        return [f"--out {out} is a file, not a folder"]
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return [f"--out {out}: no permission to write in {existing}"]
    return []



def slide_dir(cfg: RunConfig, path: str | Path, name: str | None = None) -> Path:
    """``OUT/<name>``; ``name`` from :func:`pipeline.discovery.output_names` (default: the
    slide id, right when the slide is the only one of its id in the run)."""
    from pipeline.discovery import check_name, slide_id

    return Path(cfg.out) / check_name(name if name is not None else slide_id(path))

