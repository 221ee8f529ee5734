"""The phases of a slide's run, one module each; ``pipeline.run.process_slide`` drives a
slide through them, and none of them imports ``pipeline.run``.

- ``config``: the run's options (``RunConfig``) and their checks; ``slide_dir``.
- ``executors``: where tasks run (serial, Dask), ``mapped``/``one``, ``NetworkTask``.
- ``plan``: planning a slide on a worker (``prepare_slide``), claiming its work folder.
- ``tiles``: phase 1, the tile tasks (read, predict, segment) and their driver.
- ``tile_file``: the tile file's format: written, read back, summarised for a resume.
- ``blocks``: phase 2, the level-0 label blocks.
- ``outputs``: phase 3, table, GeoJSON, layers, pyramid, preview.
- ``report``: the finished slide's numbers for ``summary.json``.
"""
