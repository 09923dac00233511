"""Analyses that show where a model's capacity is spent (per-layer separability, block benefit, importance).

Import-light on purpose: each analysis lives in its own module (``studio.analysis.separability``, ...), imported
where it is used, so importing this package costs nothing.
"""
