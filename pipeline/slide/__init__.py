"""Slide reading (transient: ``pipeline/slide.py`` moved here whole, split in the next commit)."""

from pipeline.slide.tiff_reader import *  # noqa: F403
from pipeline.slide.tiff_reader import _residual  # noqa: F401
