"""What happens at each attention call of a patched transformer.

The transformer's forward pre-hook tells the :class:`Runtime` the grid and the timestep of the
call (:meth:`Runtime.begin_forward`); each patched layer's :class:`LayerRoute` then asks it to
attend: the runtime places the call (run, step, branch), plans it (dense or sparse at which
keep, ``schedule``), logs it, offers q, k, v to the capture sessions, and runs dense attention
(the stock backend) or the sparse method (``joint.joint_attention``) with the layer's state.
Under diffusers' Ulysses context parallelism the route gets the layer's :class:`~.parallel.Ulysses`
group: the dense path hands diffusers the parallel config, the sparse path exchanges tokens for
heads around the method (``parallel``).

The route is excluded from ``torch.compile`` tracing (``torch.compiler.disable``): a compiled
transformer breaks its graph at each attention call and nowhere else, and the step-dependent
decisions never become guards (no recompilation as steps advance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..._checks import check_grid, check_qkv, check_scale
from ...methods import BoundMethod
from .clock import StepClock, Tick
from .joint import SparsePart, TokenOrder, dense_attention, joint_attention
from .parallel import Ulysses, check_config
from .schedule import Plan, Schedule
from .state import StateKey, StateStore


@dataclass(frozen=True)
class LayerCall:
    """One attention call as the handle ran it: where (run, step, branch, model, layer,
    timestep, latent grid) and how (``dense`` with its ``reason``, or sparse at ``keep``)."""

    run: int
    step: int
    branch: int
    model: int
    layer: int
    timestep: float
    grid: tuple[int, int, int]
    dense: bool
    reason: str
    keep: float | None


@dataclass(frozen=True)
class ForwardContext:
    """The transformer call in progress: its place in the run and its latent grid."""

    tick: Tick
    grid: tuple[int, int, int]


class Observer(Protocol):
    """Sees q, k, v of every attention call (capture sessions)."""

    def observe(
        self,
        layer: int,
        tick: Tick,
        grid: tuple[int, int, int],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        order: TokenOrder,
        mask: torch.Tensor | None,
    ) -> None: ...


class Runtime:
    """The per-handle context of attention calls (module docstring). No global state: every
    handle has its own runtime."""

    def __init__(self, bound: BoundMethod, schedule: Schedule, states: StateStore) -> None:
        self.bound = bound
        self._by_keep = {bound.keep: bound}
        self.schedule = schedule
        self.states = states
        self.clock = StepClock()
        self.calls: list[LayerCall] = []
        self.observers: list[Observer] = []
        self._forwards: dict[int, ForwardContext] = {}

    def begin_forward(self, model: int, grid: tuple[int, int, int], timestep: float) -> None:
        tick = self.clock.tick(timestep)
        if tick.new_run:
            self.states.clear()
        self._forwards[model] = ForwardContext(tick, grid)

    def end_forward(self, model: int) -> None:
        self._forwards.pop(model, None)

    def reset(self) -> None:
        """Start a new run at the next call: step 0, fresh states, empty log."""
        self.clock.reset()
        self.states.clear()
        self.calls.clear()

    def _context(self, model: int, layer: int) -> ForwardContext:
        context = self._forwards.get(model)
        if context is None:
            raise ValueError(
                f"layer {layer} was called outside its transformer's forward: tailattn takes the "
                f"grid and the step from the transformer's input, so call the transformer "
                f"itself, not its blocks"
            )
        return context

    def route(
        self,
        model: int,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        order: TokenOrder,
        mask: torch.Tensor | None,
        backend: object,
        ulysses: Ulysses | None = None,
    ) -> torch.Tensor:
        """Attention of one layer call, (B, N, H, D) in and out (module docstring); under
        ``ulysses`` (degree P) this rank's N/P tokens of all H heads in and out."""
        context = self._context(model, layer)
        tick, grid = context.tick, context.grid
        n_video = k.shape[1] * (1 if ulysses is None else ulysses.degree) - order.n_text
        try:
            check_grid(grid, n_video)
        except ValueError as err:
            raise ValueError(
                f"cannot infer the grid of layer {layer}: the input latents give {grid} "
                f"({grid[0] * grid[1] * grid[2]} tokens) but attention sees {n_video} video "
                f"tokens ({err})"
            ) from None
        plan = self.schedule.plan(tick.step, layer)
        self.calls.append(
            LayerCall(
                tick.run,
                tick.step,
                tick.branch,
                model,
                layer,
                tick.timestep,
                grid,
                plan.dense,
                plan.reason,
                plan.keep,
            )
        )
        for observer in self.observers:
            observer.observe(layer, tick, grid, q, k, v, order, mask)
        if plan.dense:
            return dense_attention(
                q, k, v, mask, backend, None if ulysses is None else ulysses.config
            )
        state = (
            self.states.get_or_create(StateKey(model, layer, tick.branch))
            if self.states.wanted
            else None
        )
        if isinstance(getattr(state, "step", None), int):
            state.step = tick.step  # the diffusion step, not the count of sparse calls
        sparse = self._sparse(plan, grid, state)
        if ulysses is None:
            return joint_attention(q, k, v, order, sparse, mask=mask, backend=backend)
        q, k, v = ulysses.to_heads(q, k, v)  # (B, N, H/P, D): all tokens of this rank's heads
        out = joint_attention(q, k, v, order, sparse, mask=mask, backend=backend)
        return ulysses.to_tokens(out)

    def _bound_at(self, keep: float | None) -> BoundMethod:
        """The method bound at this keep ratio (bound once per keep the schedule uses)."""
        if keep not in self._by_keep:
            self._by_keep[keep] = self.bound.with_keep(keep)
        return self._by_keep[keep]

    def _sparse(self, plan: Plan, grid: tuple[int, int, int], state: object | None) -> SparsePart:
        """The method over video tokens at this call's keep, grid and state."""
        bound = self._bound_at(plan.keep)

        def sparse(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_lse: bool
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
            return run_method(bound, q, k, v, grid=grid, state=state, need_lse=need_lse)

        return sparse


def run_method(
    bound: BoundMethod,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int, int],
    state: object | None,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sparse call on (B, N, H, D) tensors as a processor passes them: out (B, N, H, Dv) in
    q's dtype and, when asked for, lse (B, H, N). The bound method runs as it is (no binding,
    no statistics); the stock processor computed q, k, v, so only shapes are checked here."""
    q4, k4, v4 = check_qkv(q, k, v, "bnhd", finite=False)
    result = bound(q4, k4, v4, scale=check_scale(None, q4.shape[-1]), grid=grid, state=state)
    out = result.out.to(q.dtype).transpose(1, 2)
    return out, (result.lse if need_lse else None)


class LayerRoute:
    """A patched layer's way into its runtime; called by the processor, never traced.
    ``ulysses``: the transformer's Ulysses group as ``apply()`` found it (None: one device)."""

    def __init__(
        self, runtime: Runtime, model: int, layer: int, ulysses: Ulysses | None = None
    ) -> None:
        self.runtime = runtime
        self.model = model
        self.layer = layer
        self.ulysses = ulysses

    @torch.compiler.disable
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        order: TokenOrder,
        mask: torch.Tensor | None,
        backend: object,
        parallel_config: object = None,
    ) -> torch.Tensor:
        """``parallel_config``: the processor's ``_parallel_config`` now; it must be the one
        ``apply()`` saw (``parallel.check_config``)."""
        check_config(parallel_config, self.ulysses, self.layer)
        return self.runtime.route(
            self.model, self.layer, q, k, v, order, mask, backend, self.ulysses
        )
