"""Exact, seam-free instances from tiles: each nucleus once, as whole-image processing finds it.

* ``tile``: ``segment_tile``, a tile's own instances (ownership; the contract in its docstring);
* ``grown``: components cut by a tile's valid box, grown on larger windows until complete
  (``MAX_WINDOW``, giants, ``GrownPlan`` for a GPU layout, ``subwindow_predictor``);
* ``components``: what a tile decides of a component by itself; ``drop_giants``.
"""
