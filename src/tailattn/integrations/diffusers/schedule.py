"""Which (step, layer) calls run dense, and the keep ratio of the others.

Practical sparse methods stay dense where sparsity hurts most (docs/methods.md section 2):

- the first ``warmup_steps`` diffusion steps (steps 0 .. warmup_steps - 1), where the layout of
  the video is still being decided;
- the ``dense_layers`` (e.g. Wan's layer 0, whose attention is nearly uniform);
- every call when the method itself is dense (``full``).

Sparse calls use ``keep``, or ``keep_schedule`` when given: a mapping ``{step: keep}`` that holds
from each listed step on (before the first listed step, ``keep``), e.g. DFSAttn's
``{12: 0.3, 24: 0.2, 36: 0.1}``, or a function ``step -> keep``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..._checks import check_fraction

KeepSchedule = Mapping[int, float] | Callable[[int], float]


@dataclass(frozen=True)
class Plan:
    """What one attention call does: ``dense`` (with the ``reason``) or sparse at ``keep``."""

    dense: bool
    reason: str
    keep: float | None


def check_index(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative integer index, got {value!r}")
    return value


def check_layers(value: object, name: str, n_layers: int) -> frozenset[int]:
    """A collection of layer indices in [0, n_layers)."""
    if isinstance(value, (int, str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{name} must be a collection of layer indices such as (0,) or range(2), got {value!r}"
        )
    layers = frozenset(check_index(layer, name) for layer in value)
    out = sorted(layer for layer in layers if layer >= n_layers)
    if out:
        raise ValueError(
            f"{name} has layer indices {out} out of range: the model has {n_layers} attention "
            f"layers (0..{n_layers - 1})"
        )
    return layers


def _check_keep_schedule(keep_schedule: object) -> KeepSchedule | None:
    if keep_schedule is None or callable(keep_schedule):
        return keep_schedule  # type: ignore[return-value]
    if not isinstance(keep_schedule, Mapping) or not keep_schedule:
        raise TypeError(
            "keep_schedule must be a non-empty mapping {step: keep} (e.g. {12: 0.3, 24: 0.2}) "
            f"or a function step -> keep, got {keep_schedule!r}"
        )
    return {
        check_index(step, "keep_schedule steps"): check_fraction(keep, f"keep_schedule[{step}]")
        for step, keep in sorted(keep_schedule.items())
    }


class Schedule:
    """The dense schedule and the keep ratio over steps (module docstring)."""

    def __init__(
        self,
        *,
        keep: float | None,
        warmup_steps: int = 0,
        dense_layers: frozenset[int] = frozenset(),
        keep_schedule: KeepSchedule | None = None,
        dense_method: bool = False,
    ) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(
                f"warmup_steps must be a non-negative integer (dense steps), got {warmup_steps!r}"
            )
        self.keep = None if keep is None else check_fraction(keep, "keep")
        self.warmup_steps = warmup_steps
        self.dense_layers = dense_layers
        self.keep_schedule = _check_keep_schedule(keep_schedule)
        self.dense_method = dense_method

    def keep_at(self, step: int) -> float | None:
        """The keep ratio of a sparse call at ``step``."""
        schedule = self.keep_schedule
        if schedule is None:
            return self.keep
        if callable(schedule):
            return check_fraction(schedule(step), f"keep_schedule({step})")
        listed = [s for s in schedule if s <= step]
        return schedule[max(listed)] if listed else self.keep

    def plan(self, step: int, layer: int) -> Plan:
        if step < self.warmup_steps:
            return Plan(True, "warmup", None)
        if layer in self.dense_layers:
            return Plan(True, "dense layer", None)
        if self.dense_method:
            return Plan(True, "dense method", None)
        return Plan(False, "sparse", self.keep_at(step))
