"""Selections: which (query, key) pairs are computed exactly."""

from .oracle import Full, Threshold, TopK, TopP

__all__ = ["Full", "Threshold", "TopK", "TopP"]
