"""Exact, seam-free instances from tiles (see ``tile``)."""
