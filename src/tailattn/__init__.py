"""tailattn: sparse attention for video diffusion transformers with tail aggregation.

Compute the important keys exactly and aggregate the dropped tail (Unified Tail Aggregation)
instead of discarding it. Entry points: :func:`attention`, :func:`full_attention`, the method
registry :data:`registry`, and :mod:`tailattn.metrics`.
"""

from . import execute, metrics, reference, select, tails
from ._api import attention
from .methods import BoundMethod, Granularity, Method, registry
from .reference import full_attention

__version__ = "0.1.0"

__all__ = [
    "BoundMethod",
    "Granularity",
    "Method",
    "__version__",
    "attention",
    "execute",
    "full_attention",
    "metrics",
    "reference",
    "registry",
    "select",
    "tails",
]
