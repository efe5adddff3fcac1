"""Method specs: ``SELECTION[(params)][+TAIL[(params)]]`` strings, the Method type, the registry.

A method is a selection (which (query, key) pairs are computed exactly) plus a tail estimator
(what happens to the dropped keys). Examples::

    "topk"                   top-k per query, tail dropped (Top-K renormalization)
    "topk+uta"               top-k, tail aggregated into one token (Eq. 13-14)
    "topk+bins8"             eight equal-count bins (``binsN`` is shorthand for ``bins(n=N)``)
    "topp(p=0.9)+uta"        parameters in parentheses, comma separated
    "threshold(lam=1e-3)+bins(n=4, mode=width)"

The budget of budgeted selections (``topk`` and the block methods) is the keep ratio, given as
``keep=`` to :func:`tailattn.attention` or inside the spec (``topk(keep=0.1)``).

Selections and tails come in granularities: ``token`` selections see exact logits (oracle
policies) and pair with token tails; ``block`` selections produce a block layout and pair with
block tails; ``fused`` selections run the attention themselves, because their decisions are
made during the computation (the in-loop skipping of ``blasst``/``recall``, Rectified
SpaAttn's rescaling), and pair with block tails. Modules register their classes with
:data:`registry`; later parts of the library add methods without touching this file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

GRANULARITIES = ("dense", "token", "block", "fused")

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

    def with_tail(self, tail: str, **params: Any) -> Method:
        return dataclasses.replace(self, tail=tail, tail_params=tuple(sorted(params.items())))

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class Entry:
    """A registered selection or tail class and what it pairs with."""

    name: str
    factory: Callable[..., Any]
    granularity: str
    summary: str

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.factory))

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


@dataclass(frozen=True)
class BoundMethod:
    """A method ready to run: selection and tail objects of one granularity."""

    method: Method
    selection: Any
    tail: Any
    granularity: str


class Registry:
    """Names of selections and tails, by granularity. Filled at import by the defining modules."""

    def __init__(self) -> None:
        self._selections: dict[str, Entry] = {}
        self._tails: dict[tuple[str, str], Entry] = {}

    def selection(self, name: str, *, granularity: str, summary: str = "") -> Callable:
        """Class decorator: register a frozen dataclass as a selection."""
        return self._register(name, granularity, summary, tail=False)

    def tail(self, name: str, *, granularity: str, summary: str = "") -> Callable:
        """Class decorator: register a frozen dataclass as a tail estimator."""
        return self._register(name, granularity, summary, tail=True)

    def _register(self, name: str, granularity: str, summary: str, *, tail: bool) -> Callable:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")

        def decorate(cls: type) -> type:
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{cls.__name__} must be a dataclass to be registered")
            entry = Entry(name, cls, granularity, summary or (cls.__doc__ or "").split("\n")[0])
            table, key = (self._tails, (name, granularity)) if tail else (self._selections, name)
            if key in table and table[key].factory is not cls:
                raise ValueError(f"{'tail' if tail else 'selection'} {name!r} is registered twice")
            table[key] = entry
            return cls

        return decorate

    def selections(self) -> dict[str, Entry]:
        return dict(sorted(self._selections.items()))

    def tails(self, granularity: str) -> dict[str, Entry]:
        return {n: e for (n, g), e in sorted(self._tails.items()) if g == granularity}

    def bind(
        self, method: str | Method, *, keep: float | None = None, **params: Any
    ) -> BoundMethod:
        """Parse a spec, merge ``keep`` and keyword parameters, and build the objects.

        Keyword parameters go to whichever of selection and tail takes that name; a parameter
        given both in the spec and as a keyword is an error.
        """
        m = Method.parse(method)
        if m.selection not in self._selections:
            known = ", ".join(self._selections)
            raise ValueError(
                f"unknown selection {m.selection!r} in method {m.spec!r}; known: {known}"
            )
        sel_entry = self._selections[m.selection]
        gran = sel_entry.granularity
        tail_gran = {"dense": "token", "fused": "block"}.get(gran, gran)
        tail_entry = self._tails.get((m.tail, tail_gran))
        if tail_entry is None:
            known = ", ".join(self.tails(tail_gran))
            other = [g for (n, g) in self._tails if n == m.tail]
            why = (
                f"tail {m.tail!r} works with {other[0]} selections only"
                if other
                else f"unknown tail {m.tail!r}"
            )
            raise ValueError(f"{why}; {m.selection!r} is a {gran} selection and takes: {known}")
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
        return BoundMethod(
            m,
            sel_entry.build("selection", sel_params),
            tail_entry.build("tail", tail_params),
            gran,
        )


registry = Registry()
"""The library's method registry. Extend it with ``@registry.selection(...)``/``@registry.tail``."""
