"""What the study evaluates: parsed methods and the (method, keep) pairs each experiment needs.

A method spec comes from the registry (:data:`tailattn.registry`). Budgeted methods (those whose
selection takes ``keep``) are evaluated at every keep ratio asked for; the others once, at their
own parameters (``keep`` is then ``None`` and the measured density says what they kept).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .._checks import check_fraction
from ..methods import BoundMethod, Granularity, Method, registry
from ..tails import BlockDrop, BlockMoment, BlockUTA, PooledBlocks

BLOCK_TAILS = (BlockDrop, BlockUTA, BlockMoment, PooledBlocks)
"""Block tails the study evaluates (on the exact logits of the sampled rows, :mod:`.tails`)."""


@dataclass(frozen=True)
class MethodInfo:
    """A parsed study method.

    Attributes:
        spec: canonical spec string (``topk+uta``).
        selection: canonical selection part (``topk``, ``svg2(top_p=0.8)``).
        tail: tail name; ``tail_params`` its parameters.
        bound: the method bound once (at keep 0.5 when budgeted; see :meth:`at`).
    """

    spec: str
    selection: str
    tail: str
    tail_params: tuple
    bound: BoundMethod

    @property
    def granularity(self) -> Granularity:
        return self.bound.granularity

    @property
    def budgeted(self) -> bool:
        """The selection takes ``keep``."""
        return self.bound.budgeted

    @property
    def base(self) -> str:
        """The same selection with the ``drop`` tail: what a ``+tail`` is compared against."""
        return self.selection

    def at(self, keep: float | None) -> BoundMethod:
        """The bound method at a pair's keep ratio."""
        return self.bound.with_keep(keep) if self.budgeted else self.bound


@dataclass(frozen=True)
class Pair:
    """One evaluated configuration: a method at a keep ratio (``None``: the method's own)."""

    spec: str
    keep: float | None

    @property
    def label(self) -> str:
        return self.spec if self.keep is None else f"{self.spec}@{self.keep:g}"


def parse_method(spec: str) -> MethodInfo:
    """Parse and check one spec against the registry (ValueError with the known names)."""
    method = Method.parse(spec.strip())
    selections = registry.selections()
    if method.selection not in selections:
        raise ValueError(
            f"unknown selection {method.selection!r} in method {spec!r}; known: "
            f"{', '.join(n for n, e in selections.items() if e.granularity != Granularity.DENSE)}"
        )
    entry = selections[method.selection]
    if entry.granularity is Granularity.DENSE:
        raise ValueError(f"method {spec!r} is dense attention, the study's reference itself")
    bound = registry.bind(method, keep=0.5 if entry.budgeted else None)
    if bound.granularity.tails is Granularity.BLOCK and not isinstance(bound.tail, BLOCK_TAILS):
        names = ", ".join(registry.tails("block"))
        raise ValueError(f"the study evaluates block tails {names}; {spec!r} has {method.tail!r}")
    selection = Method(method.selection, "drop", method.selection_params).spec
    return MethodInfo(method.spec, selection, method.tail, method.tail_params, bound)


def parse_methods(specs: Iterable[str]) -> list[MethodInfo]:
    """Parse a list of specs, dropping repeats (first occurrence wins)."""
    seen: dict[str, MethodInfo] = {}
    for spec in specs:
        info = parse_method(spec)
        seen.setdefault(info.spec, info)
    if not seen:
        raise ValueError("no methods given")
    return list(seen.values())


def check_keeps(keeps: Sequence[float]) -> tuple[float, ...]:
    """Keep ratios in (0, 1], sorted ascending without repeats."""
    if not keeps:
        raise ValueError("the keep list is empty")
    return tuple(sorted({check_fraction(k, "keep") for k in keeps}))


def pairs_for(methods: Iterable[MethodInfo], keeps: Sequence[float]) -> list[Pair]:
    """Every method at every keep (budgeted) or once (not budgeted)."""
    pairs: list[Pair] = []
    for m in methods:
        pairs += [Pair(m.spec, k) for k in keeps] if m.budgeted else [Pair(m.spec, None)]
    return pairs
