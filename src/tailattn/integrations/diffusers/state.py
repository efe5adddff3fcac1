"""Per-layer state of stateful methods, held by the handle, one object per (model, layer, branch).

Some selections carry state from one diffusion step to the next: SVG2 warm-starts its k-means
centroids, DFSAttn reuses a mask between rebuild steps. The state of a layer must not leak
into another layer, nor from the conditional pass into the unconditional one, so the handle
keeps one object per :class:`StateKey` and passes it to ``tailattn.attention(..., state=...)``.

Protocol: a selection that wants state defines a method ``new_state()`` returning a fresh
state object; the handle calls it on a layer's first sparse call of a run and passes the same
object on every later call of that key. Selections without ``new_state`` get no ``state=``.
A state with an integer attribute ``step`` (DFSAttn's mask cache) is told the diffusion step
before each call, so its own dense warm-up and rebuild steps count diffusion steps: with
``apply(..., warmup_steps=W)`` and DFSAttn's ``warmup=12`` the first max(W, 12) steps are
dense, not W + 12.
With guidance as a batch of 2 (CogVideoX) one call carries both passes; the state object then
sees that batch, so per-batch-element content (one entry per batch element) stays separate.
A new run (see ``clock``) starts from fresh states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class StateKey:
    """Transformer index in the pipeline, layer index, guidance branch (0, 1, ...)."""

    model: int
    layer: int
    branch: int


class StateStore(Mapping[StateKey, object]):
    """State objects by key, created on first use by the method's factory."""

    def __init__(self, factory: Callable[[], object] | None) -> None:
        self.factory = factory
        self._states: dict[StateKey, object] = {}

    @property
    def wanted(self) -> bool:
        return self.factory is not None

    def get_or_create(self, key: StateKey) -> object:
        if self.factory is None:
            raise ValueError("this method keeps no state (its selection has no new_state())")
        if key not in self._states:
            self._states[key] = self.factory()
        return self._states[key]

    def clear(self) -> None:
        self._states.clear()

    def __getitem__(self, key: StateKey) -> object:
        return self._states[key]

    def __iter__(self) -> Iterator[StateKey]:
        return iter(sorted(self._states))

    def __len__(self) -> int:
        return len(self._states)
