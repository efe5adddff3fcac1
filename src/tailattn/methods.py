"""Method specs, the registry of selections and tails, and the bound method that runs itself.

A method is a selection (which (query, key) pairs are computed exactly) plus a tail estimator
(what happens to the dropped keys), written as a spec string
``SELECTION[(params)][+TAIL[(params)]]``::

    "topk"                   top-k per query, tail dropped (Top-K renormalization)
    "topk+uta"               top-k, tail aggregated into one token (Eq. 13-14)
    "topk+bins8"             eight equal-count bins (``binsN`` is shorthand for ``bins(n=N)``)
    "topp(p=0.9)+uta"        parameters in parentheses, comma separated
    "threshold(lam=1e-3)+bins(n=4, mode=width)"

The budget of budgeted selections (``topk`` and the block methods) is the keep ratio, given as
``keep=`` to :func:`tailattn.attention` or inside the spec (``topk(keep=0.1)``).

Selections come in the kinds of :class:`Granularity` (their Protocols are in
:mod:`tailattn.contract`); each kind takes the tails of one kind and has one runner, the
executor that turns q, k, v into the output. :meth:`Registry.bind` parses a spec once into a
:class:`BoundMethod` (selection object, tail object, runner) that :func:`tailattn.attention`,
``apply()`` and the study run as it is. Modules register their classes with :data:`registry`
(``@registry.selection``, ``@registry.tail``, ``@registry.runner``); later parts of the
library add methods without touching this file.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .contract import Grid, Result, Selection, Tail


class Granularity(str, Enum):
    """What a selection works on, and so which tails it takes and which runner executes it.

    ``DENSE``: nothing to select (full attention). ``TOKEN``: exact logits (oracle policies),
    token tails. ``BLOCK``: a block layout from q and k, block tails. ``FUSED``: decides while
    it computes and runs the attention itself, block tails.
    """

    DENSE = "dense"
    TOKEN = "token"
    BLOCK = "block"
    FUSED = "fused"

    @property
    def tails(self) -> Granularity:
        """The kind of tail this kind of selection takes (tails are TOKEN or BLOCK)."""
        if self in (Granularity.DENSE, Granularity.TOKEN):
            return Granularity.TOKEN
        return Granularity.BLOCK


_CONTRACT: dict[tuple[bool, Granularity], tuple[str, tuple[str, ...]]] = {
    (False, Granularity.DENSE): ("a dense selection", ()),
    (False, Granularity.TOKEN): ("TokenSelection", ("__call__",)),
    (False, Granularity.BLOCK): ("BlockSelection", ("__call__", "block_q", "block_k")),
    (False, Granularity.FUSED): ("FusedSelection", ("attend",)),
    (True, Granularity.TOKEN): ("TokenTail", ("__call__",)),
    (True, Granularity.BLOCK): ("BlockTail", ("prepare", "tokens", "epilogue", "kernel")),
}
"""What each kind must provide: the members of its Protocol in :mod:`tailattn.contract`."""


def _check_contract(cls: type, granularity: Granularity, *, tail: bool) -> None:
    """A class registered as a selection or tail of ``granularity`` has its Protocol's members
    (checked at registration, so a wrong class fails there, not at its first call)."""
    protocol, members = _CONTRACT[(tail, granularity)]
    fields = {f.name for f in dataclasses.fields(cls)}
    defined = {name for base in cls.__mro__[:-1] for name in vars(base)}
    missing = [m for m in members if m not in defined and m not in fields]
    if missing:
        raise TypeError(
            f"{cls.__name__} is registered as a {granularity.value} "
            f"{'tail' if tail else 'selection'} but lacks {', '.join(missing)} "
            f"({protocol} in tailattn.contract)"
        )


def _budgeted(selection: object) -> bool:
    """A selection class or object takes a keep ratio (a ``keep`` field)."""
    return any(f.name == "keep" for f in dataclasses.fields(selection))


def _granularity(value: object) -> Granularity:
    try:
        return Granularity(value)
    except ValueError:
        known = ", ".join(g.value for g in Granularity)
        raise ValueError(f"granularity must be one of {known}, got {value!r}") from None


_ARGS = r"\s*(?:\((?P<args>[^()]*)\))?\s*$"
_SELECTION_PART = re.compile(r"^\s*(?P<name>[a-z][a-z0-9_-]*)" + _ARGS)
_TAIL_PART = re.compile(r"^\s*(?P<name>[a-z][a-z_-]*?)(?P<num>\d+)?" + _ARGS)


def _parse_value(text: str) -> Any:
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_part(text: str, spec: str, pattern: re.Pattern) -> tuple[str, dict[str, Any]]:
    match = pattern.match(text)
    if match is None:
        raise ValueError(
            f"cannot parse method spec {spec!r}: expected SELECTION[(k=v,...)][+TAIL[(k=v,...)]], "
            f"e.g. 'topk+uta' or 'topp(p=0.9)+bins8'"
        )
    name, num, args = match.group("name"), match.groupdict().get("num"), match.group("args")
    params: dict[str, Any] = {}
    if num is not None:
        params["n"] = int(num)
    if args and args.strip():
        for item in args.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key.isidentifier():
                raise ValueError(
                    f"cannot parse parameter {item.strip()!r} in method spec {spec!r}: "
                    f"expected name=value"
                )
            if key in params:
                raise ValueError(f"parameter {key!r} is given twice in method spec {spec!r}")
            params[key] = _parse_value(value)
    return name, params


def _format_params(params: tuple[tuple[str, Any], ...]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in params) + ")" if params else ""


@dataclass(frozen=True)
class Method:
    """A parsed method spec: selection name and parameters, tail name and parameters."""

    selection: str
    tail: str = "drop"
    selection_params: tuple[tuple[str, Any], ...] = ()
    tail_params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, spec: str | Method) -> Method:
        """Parse ``SELECTION[(params)][+TAIL[(params)]]``; a Method passes through."""
        if isinstance(spec, Method):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"method must be a spec string or a Method, got {type(spec).__name__}")
        parts = spec.split("+")
        if len(parts) > 2 or not all(p.strip() for p in parts):
            raise ValueError(
                f"cannot parse method spec {spec!r}: expected SELECTION or SELECTION+TAIL"
            )
        selection, sel_params = _parse_part(parts[0], spec, _SELECTION_PART)
        tail, tail_params = (
            _parse_part(parts[1], spec, _TAIL_PART) if len(parts) == 2 else ("drop", {})
        )
        return cls(
            selection,
            tail,
            tuple(sorted(sel_params.items())),
            tuple(sorted(tail_params.items())),
        )

    @property
    def spec(self) -> str:
        """The canonical spec string (parameters sorted; ``+drop`` omitted)."""
        sel = self.selection + _format_params(self.selection_params)
        if self.tail == "drop" and not self.tail_params:
            return sel
        return f"{sel}+{self.tail}{_format_params(self.tail_params)}"

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class Entry:
    """A registered selection or tail class and what it pairs with."""

    name: str
    factory: Callable[..., Any]
    granularity: Granularity
    summary: str

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.factory))

    @property
    def budgeted(self) -> bool:
        """The selection takes a keep ratio."""
        return _budgeted(self.factory)

    def build(self, kind: str, params: Mapping[str, Any]) -> Any:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            takes = ", ".join(self.params) or "no parameters"
            raise ValueError(
                f"{kind} {self.name!r} does not take {', '.join(map(repr, unknown))}; "
                f"it takes: {takes}"
            )
        missing = [
            f.name
            for f in dataclasses.fields(self.factory)
            if f.name not in params
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            needs = ", ".join(f"{name}=" for name in missing)
            raise ValueError(f"{kind} {self.name!r} needs {needs} (e.g. keep=0.1 for a keep ratio)")
        return self.factory(**params)


Runner = Callable[..., "Result"]
"""``runner(bound, q, k, v, *, scale, grid, state, backend, with_stats) -> Result`` on validated
(B, H, N, D) tensors: the executor of one :class:`Granularity`."""


@dataclass(frozen=True)
class BoundMethod:
    """A method ready to run: the selection and tail objects, bound once, and their runner.

    Call it on validated (B, H, N, D) tensors (:func:`tailattn.attention` validates and calls
    it; so do ``apply()`` and the study, which bind once and call many times)::

        bound = tailattn.registry.bind("block-topk+uta", keep=0.1)
        result = bound(q, k, v, scale=q.shape[-1] ** -0.5)      # Result(out, lse, stats, info)

    Attributes:
        method: the parsed spec as written (keyword parameters live in the objects).
        selection: the selection object (a Protocol of :mod:`tailattn.contract`).
        tail: the tail object.
        granularity: the selection's kind.
        runner: the executor of that kind.
    """

    method: Method
    selection: Selection
    tail: Tail
    granularity: Granularity
    runner: Runner = field(repr=False)

    @property
    def spec(self) -> str:
        """The canonical spec string."""
        return self.method.spec

    @property
    def budgeted(self) -> bool:
        """The selection takes a keep ratio (``keep=``)."""
        return _budgeted(self.selection)

    @property
    def keep(self) -> float | None:
        """The keep ratio the selection was bound with (``None`` without one)."""
        return getattr(self.selection, "keep", None)

    def with_keep(self, keep: float | None) -> BoundMethod:
        """The same method at another keep ratio (the objects are rebuilt and checked)."""
        if keep == self.keep:
            return self
        if not self.budgeted:
            raise ValueError(f"method {self.spec!r} takes no keep ratio")
        return dataclasses.replace(self, selection=dataclasses.replace(self.selection, keep=keep))

    def new_state(self) -> Any:
        """A fresh per-layer state for a stateful selection, ``None`` for the others."""
        factory = getattr(self.selection, "new_state", None)
        return factory() if callable(factory) else None

    @property
    def stateful(self) -> bool:
        """The selection keeps state across calls of a layer (``new_state``)."""
        return callable(getattr(self.selection, "new_state", None))

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        grid: Grid | None = None,
        state: Any = None,
        backend: str | None = None,
        with_stats: bool = False,
    ) -> Result:
        """Run on validated (B, H, N, D) tensors; see :func:`tailattn.attention` for the
        arguments. ``with_stats`` also computes the per-query statistics and info entries."""
        return self.runner(
            self,
            q,
            k,
            v,
            scale=scale,
            grid=grid,
            state=state,
            backend=backend,
            with_stats=with_stats,
        )


class Registry:
    """Names of selections and tails, by granularity, and one runner per granularity.

    Filled at import by the defining modules. ``builtins`` names modules to import before the
    first lookup (the library's own selections, tails and runners for :data:`registry`), so
    lookups see them however the registry was reached."""

    def __init__(self, builtins: tuple[str, ...] = ()) -> None:
        self._selections: dict[str, Entry] = {}
        self._tails: dict[tuple[str, Granularity], Entry] = {}
        self._runners: dict[Granularity, Runner] = {}
        self._builtins = builtins

    def _load(self) -> None:
        """Import the built-in modules once (they register themselves)."""
        modules, self._builtins = self._builtins, ()
        for module in modules:
            importlib.import_module(module)

    def selection(
        self, name: str, *, granularity: Granularity | str, summary: str = ""
    ) -> Callable:
        """Class decorator: register a frozen dataclass as a selection."""
        return self._register(name, _granularity(granularity), summary, tail=False)

    def tail(self, name: str, *, granularity: Granularity | str, summary: str = "") -> Callable:
        """Class decorator: register a frozen dataclass as a tail estimator (of TOKEN or BLOCK
        granularity)."""
        kind = _granularity(granularity)
        if kind not in (Granularity.TOKEN, Granularity.BLOCK):
            raise ValueError(f"tails are token or block tails, got granularity {kind.value!r}")
        return self._register(name, kind, summary, tail=True)

    def runner(self, granularity: Granularity | str) -> Callable[[Runner], Runner]:
        """Function decorator: register the executor of one granularity."""
        kind = _granularity(granularity)

        def decorate(fn: Runner) -> Runner:
            if kind in self._runners and self._runners[kind] is not fn:
                raise ValueError(f"a runner for {kind.value!r} selections is registered twice")
            self._runners[kind] = fn
            return fn

        return decorate

    def _register(self, name: str, granularity: Granularity, summary: str, *, tail: bool):
        def decorate(cls: type) -> type:
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{cls.__name__} must be a dataclass to be registered")
            entry = Entry(name, cls, granularity, summary or (cls.__doc__ or "").split("\n")[0])
            table, key = (self._tails, (name, granularity)) if tail else (self._selections, name)
            if key in table and table[key].factory is not cls:
                raise ValueError(f"{'tail' if tail else 'selection'} {name!r} is registered twice")
            _check_contract(cls, granularity, tail=tail)
            table[key] = entry
            return cls

        return decorate

    def selections(self) -> dict[str, Entry]:
        self._load()
        return dict(sorted(self._selections.items()))

    def tails(self, granularity: Granularity | str) -> dict[str, Entry]:
        self._load()
        kind = _granularity(granularity)
        return {n: e for (n, g), e in sorted(self._tails.items()) if g == kind}

    def resolve(
        self, method: str | Method | BoundMethod, *, keep: float | None = None, **params: Any
    ) -> BoundMethod:
        """A bound method as it is (then ``keep`` and parameters must not be given: they were
        fixed when it was bound), or a spec bound here (:meth:`bind`). What the entry points
        that take either (``attention()``, ``apply()``) call."""
        if isinstance(method, BoundMethod):
            if keep is not None or params:
                raise ValueError(
                    "method is already bound: give keep= and parameters to registry.bind() "
                    "when binding it"
                )
            return method
        return self.bind(method, keep=keep, **params)

    def bind(
        self, method: str | Method, *, keep: float | None = None, **params: Any
    ) -> BoundMethod:
        """Parse a spec, merge ``keep`` and keyword parameters, and build the objects once.

        Keyword parameters go to whichever of selection and tail takes that name; a parameter
        given both in the spec and as a keyword is an error. ``bound.spec`` is the spec as
        written (keywords not folded in); the objects hold every parameter.
        """
        self._load()
        m = Method.parse(method)
        if m.selection not in self._selections:
            known = ", ".join(self._selections)
            raise ValueError(
                f"unknown selection {m.selection!r} in method {m.spec!r}; known: {known}"
            )
        sel_entry = self._selections[m.selection]
        gran = sel_entry.granularity
        tail_entry = self._tails.get((m.tail, gran.tails))
        if tail_entry is None:
            known = ", ".join(self.tails(gran.tails))
            other = [g.value for (n, g) in self._tails if n == m.tail]
            why = (
                f"tail {m.tail!r} works with {other[0]} selections only"
                if other
                else f"unknown tail {m.tail!r}"
            )
            raise ValueError(
                f"{why}; {m.selection!r} is a {gran.value} selection and takes: {known}"
            )
        sel_params, tail_params = dict(m.selection_params), dict(m.tail_params)
        extra = dict(params)
        if keep is not None:
            extra["keep"] = keep
        for key, value in extra.items():
            targets = [
                p
                for p, entry in ((sel_params, sel_entry), (tail_params, tail_entry))
                if key in entry.params
            ]
            if not targets:
                raise ValueError(
                    f"method {m.spec!r} takes no parameter {key!r} "
                    f"(selection takes: {', '.join(sel_entry.params) or 'none'}; "
                    f"tail takes: {', '.join(tail_entry.params) or 'none'})"
                )
            for target in targets:
                if key in target and target[key] != value:
                    raise ValueError(
                        f"{key}={value!r} conflicts with {key}={target[key]!r} in method {m.spec!r}"
                    )
                target[key] = value
        if gran not in self._runners:
            raise ValueError(f"no runner is registered for {gran.value} selections")
        return BoundMethod(
            m,
            sel_entry.build("selection", sel_params),
            tail_entry.build("tail", tail_params),
            gran,
            self._runners[gran],
        )


registry = Registry(builtins=("tailattn.select", "tailattn.tails", "tailattn.execute"))
"""The library's method registry. Extend it with ``@registry.selection(...)``/``@registry.tail``."""
