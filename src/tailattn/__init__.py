"""tailattn: sparse attention for video diffusion transformers with tail aggregation.

Compute the important keys exactly and aggregate the dropped tail (Unified Tail Aggregation)
instead of discarding it. Entry points: :func:`attention`, :func:`full_attention`, the method
registry :data:`registry` (``registry.bind`` gives a :class:`BoundMethod`), and
:mod:`tailattn.metrics`.

The names below load on first use (PEP 562), so ``import tailattn`` and the ``tailattn``
command start without importing PyTorch; ``tailattn.attention`` imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "attention": "._api",
    "full_attention": ".reference",
    "BoundMethod": ".methods",
    "Granularity": ".methods",
    "Method": ".methods",
    "registry": ".methods",
}
_MODULES = ("contract", "execute", "layout", "metrics", "permute", "reference", "select", "tails")

__all__ = [
    "BoundMethod",
    "Granularity",
    "Method",
    "__version__",
    "attention",
    "contract",
    "execute",
    "full_attention",
    "layout",
    "metrics",
    "permute",
    "reference",
    "registry",
    "select",
    "tails",
]

if TYPE_CHECKING:
    from . import contract, execute, layout, metrics, permute, reference, select, tails
    from ._api import attention
    from .methods import BoundMethod, Granularity, Method, registry
    from .reference import full_attention


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'tailattn' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
