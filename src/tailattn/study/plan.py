"""What the study evaluates: parsed methods and the (method, keep) pairs each experiment needs.

A method spec comes from the registry (:data:`tailattn.registry`). Budgeted methods (those whose
selection takes ``keep``) are evaluated at every keep ratio asked for; the others once, at their
own parameters (``keep`` is then ``None`` and the measured density says what they kept).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .._checks import check_fraction
from ..methods import Method, registry

BLOCK_TAILS = ("drop", "uta", "moment", "blocks")
"""Block tails the study evaluates (on the exact logits of the sampled rows, see token_pass)."""


@dataclass(frozen=True)
class MethodInfo:
    """A parsed study method.

    Attributes:
        spec: canonical spec string (``topk+uta``).
        selection: canonical selection part (``topk``, ``svg2(top_p=0.8)``).
        tail: tail name; ``tail_params`` its parameters.
        granularity: ``token``, ``block`` or ``fused``.
        budgeted: the selection takes ``keep``.
    """

    spec: str
    selection: str
    tail: str
    tail_params: tuple
    granularity: str
    budgeted: bool

    @property
    def base(self) -> str:
        """The same selection with the ``drop`` tail: what a ``+tail`` is compared against."""
        return self.selection

    def bind(self, keep: float | None):
        return registry.bind(self.spec, keep=keep)


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
            f"{', '.join(n for n, e in selections.items() if e.granularity != 'dense')}"
        )
    entry = selections[method.selection]
    if entry.granularity == "dense":
        raise ValueError(f"method {spec!r} is dense attention, the study's reference itself")
    budgeted = "keep" in entry.params
    registry.bind(method, keep=0.5 if budgeted else None)
    if entry.granularity in ("block", "fused") and method.tail not in BLOCK_TAILS:
        raise ValueError(
            f"the study evaluates block tails {', '.join(BLOCK_TAILS)}; "
            f"{spec!r} has {method.tail!r}"
        )
    selection = Method(method.selection, "drop", method.selection_params).spec
    return MethodInfo(
        method.spec,
        selection,
        method.tail,
        method.tail_params,
        entry.granularity,
        budgeted,
    )


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
