"""Slides: readers behind one interface, the read plan, and model-resolution region reads.

This is the only package that imports OpenSlide or tifffile for slides.

* ``reader``: ``SlideReader``, the interface (reads of any pyramid level, damaged stored
  tiles painted as glass);
* ``openslide_reader``: ``OpenSlideReader``, every format OpenSlide knows (SVS, NDPI, MRXS,
  DICOM, generic TIFF...);
* ``tiff_reader``: ``TiffFileReader``, tifffile fallback for what OpenSlide refuses
  (OME-TIFF, plain TIFF);
* ``memory``: ``MemorySlide``, a numpy array or a pixel-generating callable (tests, benchmarks);
* ``open``: ``open_slide``, the reader for a path, and the in-memory slides it can open;
* ``region``: ``plan_read`` (which level, what model-pixel size) and ``read_region``
  (model-pixel boxes, bit-identical wherever they overlap).
"""
