"""``apply()``: make a diffusers video transformer's self-attention sparse; the Handle undoes it.

``apply`` replaces the processors of the chosen self-attention layers with tailattn's (see
``processors``) and registers a forward pre-hook (grid and timestep) and a forward hook (end of
the call) on each transformer. Nothing else of the model changes: no forward method is replaced
and nothing global is set; ``Handle.remove()`` puts the original processor objects back and
removes the hooks, after which the model computes exactly what it computed before.

A transformer under diffusers' Ulysses context parallelism (``enable_parallelism`` before
``apply``) gets the group of its processors' parallel config (``parallel``); every rank applies
tailattn to its own copy of the model and keeps its own handle.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Mapping
from types import TracebackType
from typing import Any

import torch

from ...methods import BoundMethod, Granularity, Method, registry
from .models import ModelKind, find_transformers
from .parallel import Ulysses, ulysses_of
from .processors import TailProcessor
from .runtime import LayerCall, LayerRoute, Observer, Runtime
from .schedule import KeepSchedule, Schedule, check_layers
from .state import StateKey, StateStore


def _timestep_value(timestep: object) -> float:
    """The timestep of a transformer call as a number, for the step clock (``clock``). A tensor
    timestep on the GPU costs one host-device sync per transformer call (not per attention
    call): the clock decides on the host which step and branch a call is."""
    if isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
        return float(timestep.detach().max())
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        return float(timestep)
    raise ValueError(
        f"the transformer was called without a usable timestep (got {timestep!r}); tailattn "
        f"counts diffusion steps from it"
    )


class _ForwardHooks:
    """Forward pre-hook and hook of one transformer: announce and close each call."""

    def __init__(self, runtime: Runtime, index: int, model: torch.nn.Module, kind: ModelKind):
        self.runtime, self.index, self.model, self.kind = runtime, index, model, kind
        self.signature = inspect.signature(model.forward)

    @torch.compiler.disable
    def before(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        grid = self.kind.grid(self.model, bound.get("hidden_states"))
        self.runtime.begin_forward(self.index, grid, _timestep_value(bound.get("timestep")))

    @torch.compiler.disable
    def after(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        self.runtime.end_forward(self.index)


class Handle:
    """A transformer (or a pipeline's transformers) with tailattn attention installed.

    Attributes:
        models: the patched transformers (index = ``model`` in :class:`LayerCall`).
        method: the canonical method spec.
        layers: patched layer indices per transformer.

    ``ulysses``: per transformer, its Ulysses group under context parallelism, else None.
    """

    def __init__(
        self,
        targets: list[tuple[torch.nn.Module, ModelKind]],
        layers: list[frozenset[int]],
        runtime: Runtime,
        ulysses: list[Ulysses | None],
    ) -> None:
        self.models = tuple(model for model, _ in targets)
        self.method = runtime.bound.spec
        self.layers = tuple(layers)
        self._runtime = runtime
        self._parallel = any(group is not None for group in ulysses)
        self._originals: list[tuple[torch.nn.Module, object]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        for index, ((model, kind), chosen) in enumerate(zip(targets, layers, strict=True)):
            for layer, attn in enumerate(kind.attention_modules(model)):
                if layer in chosen:
                    self._originals.append((attn, attn.processor))
                    route = LayerRoute(runtime, index, layer, ulysses[index])
                    attn.set_processor(kind.processor(attn.processor, route))
            hooks = _ForwardHooks(runtime, index, model, kind)
            self._hooks.append(model.register_forward_pre_hook(hooks.before, with_kwargs=True))
            self._hooks.append(
                model.register_forward_hook(hooks.after, with_kwargs=True, always_call=True)
            )

    @property
    def active(self) -> bool:
        """False once :meth:`remove` ran."""
        return bool(self._hooks)

    @property
    def calls(self) -> tuple[LayerCall, ...]:
        """Every attention call since :func:`apply` or :meth:`reset`, in order: the dense
        schedule as it ran (which steps and layers were dense, and why)."""
        return tuple(self._runtime.calls)

    @property
    def states(self) -> Mapping[StateKey, object]:
        """Per-(model, layer, branch) state objects of a stateful method (see ``state``)."""
        return self._runtime.states

    def reset(self) -> None:
        """Treat the next transformer call as the first step of a new generation; clears the
        call log and the per-layer states."""
        self._runtime.reset()

    def check_observable(self) -> None:
        """Raise unless observers (capture sessions) can watch this handle's calls."""
        if not self.active:
            raise ValueError("this handle was removed; apply tailattn again")
        if self._parallel:
            raise ValueError(
                "capture under context parallelism is not supported (each rank sees a part of "
                "the sequence); capture on one device"
            )

    def add_observer(self, observer: Observer) -> None:
        """Show q, k, v of every attention call to ``observer`` (capture sessions)."""
        self.check_observable()
        self._runtime.observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        if observer in self._runtime.observers:
            self._runtime.observers.remove(observer)

    def remove(self) -> None:
        """Put the original processors back and remove the hooks; a second call does nothing."""
        for attn, original in reversed(self._originals):
            attn.set_processor(original)
        for hook in self._hooks:
            hook.remove()
        self._originals.clear()
        self._hooks.clear()
        self._runtime.observers.clear()

    def __enter__(self) -> Handle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        models = ", ".join(type(m).__name__ for m in self.models)
        return f"Handle({self.method!r} on {models}, {state})"


def _check_installable(
    targets: list[tuple[torch.nn.Module, ModelKind]], chosen: list[frozenset[int]]
) -> None:
    for (model, kind), layers in zip(targets, chosen, strict=True):
        for layer, attn in enumerate(kind.attention_modules(model)):
            processor = attn.processor
            if layer not in layers and not isinstance(processor, TailProcessor):
                continue
            if isinstance(processor, TailProcessor):
                raise ValueError(
                    f"tailattn is already applied to this {type(model).__name__}; call "
                    f"handle.remove() on the first handle before applying again"
                )
            if type(processor).__name__ not in kind.stock_processors:
                raise ValueError(
                    f"layer {layer} of {type(model).__name__} uses {type(processor).__name__}; "
                    f"tailattn replaces the stock {' or '.join(kind.stock_processors)} only "
                    f"(reset the processors, e.g. unfuse projections, first)"
                )


DEFAULT_METHOD = "block-topk+uta"
"""The method of ``apply()`` when none is given: of the methods whose transformer step is within
5 % of block-topk+drop, the one whose quality was measured as it runs, on both data sets the
project has (docs/diffusers.md#the-default-block-topkuta-at-keep-01)."""
DEFAULT_KEEP = 0.1
"""The keep ratio of budgeted methods when ``apply()`` gets none."""


def _bind(
    method: str | Method | BoundMethod, keep: float | str | None, params: dict[str, Any]
) -> BoundMethod:
    """Bind once. ``keep="default"``: :data:`DEFAULT_KEEP` for a budgeted method whose spec
    has no keep, nothing for the others; a number given to a method without a budget stays an
    error."""
    if keep == "default":
        keep = None
        spec = method if isinstance(method, BoundMethod) else Method.parse(method)
        entry = None if isinstance(spec, BoundMethod) else registry.selections().get(spec.selection)
        in_spec = entry is not None and "keep" in dict(spec.selection_params)
        if entry is not None and entry.budgeted and not in_spec and "keep" not in params:
            keep = DEFAULT_KEEP
    elif isinstance(keep, str):
        raise ValueError(f"keep must be a number in (0, 1], None or 'default', got {keep!r}")
    return registry.resolve(method, keep=keep, **params)


def apply(
    model_or_pipeline: object,
    method: str | Method | BoundMethod = DEFAULT_METHOD,
    keep: float | str | None = "default",
    *,
    warmup_steps: int = 0,
    dense_layers: Collection[int] = (),
    layers: Collection[int] | None = None,
    keep_schedule: KeepSchedule | None = None,
    **method_params: Any,
) -> Handle:
    """Make the video self-attention of a diffusers transformer (or pipeline) sparse.

    Supported: ``WanTransformer3DModel`` (Wan2.1, Wan2.2; T2V, I2V),
    ``HunyuanVideoTransformer3DModel`` and ``CogVideoXTransformer3DModel``, or a pipeline holding
    one (its ``transformer`` and, for Wan2.2 A14B, ``transformer_2``). Only self-attention over
    video tokens becomes sparse; text tokens of joint attention (HunyuanVideo, CogVideoX) are
    always kept and attend densely (``joint``); cross-attention stays stock.

    Args:
        model_or_pipeline: the transformer or the pipeline.
        method: tailattn method spec (``tailattn.attention``), e.g. ``"svg2+uta"``, ``"topk+uta"``,
            or a method bound with ``tailattn.registry.bind``.
        keep: keep ratio of video keys for budgeted methods; ``"default"``:
            :data:`DEFAULT_KEEP` (0.1) for budgeted methods and nothing for methods without a
            budget; ``None``: no keep ratio (e.g. DFSAttn's own keep schedule).
        warmup_steps: the first diffusion steps that run dense.
        dense_layers: layer indices (``models``) that always run dense, e.g. ``(0,)``.
        layers: layer indices to patch (default: all); the others stay stock.
        keep_schedule: keep over steps: ``{step: keep}`` holding from each step on, or a
            function ``step -> keep`` (``schedule``).
        **method_params: further method parameters (e.g. ``p=0.9``).

    Returns:
        A :class:`Handle`; ``handle.remove()`` restores the original processors exactly.

    Raises:
        TypeError: an unsupported model class, or not a model or pipeline.
        ValueError: a pipeline without a transformer, layer indices out of range, tailattn
            already applied, an unknown method or parameter, keep outside (0, 1], a context
            parallel configuration other than Ulysses on Wan (``parallel``).

    Under diffusers' Ulysses context parallelism (``enable_parallelism`` first, then ``apply``
    on every rank), each rank runs the method on its heads over the whole sequence
    (``parallel``); ``handle.calls`` and ``handle.states`` are this rank's.
    """
    targets = find_transformers(model_or_pipeline)
    counts = [len(kind.attention_modules(model)) for model, kind in targets]
    n_layers = min(counts)
    chosen = [
        frozenset(range(count)) if layers is None else check_layers(layers, "layers", n_layers)
        for count in counts
    ]
    dense = check_layers(dense_layers, "dense_layers", n_layers)
    bound = _bind(method, keep, method_params)
    schedule = Schedule(
        keep=bound.keep,
        warmup_steps=warmup_steps,
        dense_layers=dense,
        keep_schedule=keep_schedule,
        dense_method=bound.granularity is Granularity.DENSE,
    )
    if keep_schedule is not None and bound.keep is None:
        raise ValueError("keep_schedule needs a budgeted method and keep= for the steps before it")
    _check_installable(targets, chosen)
    ulysses = [
        ulysses_of(model, kind, layers)
        for (model, kind), layers in zip(targets, chosen, strict=True)
    ]
    states = StateStore(bound.new_state if bound.stateful else None)
    runtime = Runtime(bound, schedule, states)
    return Handle(targets, chosen, runtime, ulysses)
