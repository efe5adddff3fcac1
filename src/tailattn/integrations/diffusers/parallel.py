"""Sparse attention under diffusers' Ulysses context parallelism (``ulysses_degree = P > 1``).

``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`` gives every
attention processor a ``_parallel_config`` and adds hooks that cut the token sequence into P
contiguous chunks after the patch embedding (rank i of the Ulysses group holds tokens
``[i N/P, (i+1) N/P)``, ``tensor.chunk(P)``) and gather it again at the output projection. A
processor therefore sees q, k, v of N/P tokens and all H heads. Attention needs every token of
a head on one rank, so the sparse path trades the token split for a head split with one
all-to-all over the Ulysses process group,

    (B, N/P, H, D) on rank r  ->  (B, N, H/P, D) on rank r: heads [r H/P, (r+1) H/P), all tokens,

runs the method on the rank's H/P heads with the full latent grid (a per-head method computes
for those heads what it computes on one device), and sends the output back,

    (B, N, H/P, D) on rank r  ->  (B, N/P, H, D): the rank's own tokens, all heads.

This is the exchange diffusers' own Ulysses attention makes around its dense kernel; the dense
path (warm-up steps, dense layers, the ``full`` method) still goes through diffusers with the
processor's parallel config. Each rank has its own handle, clock and per-layer states (its
states see its own heads); every rank sees the same timesteps, so steps and branches agree.

Supported: ``WanTransformer3DModel`` with ``ring_degree = 1``, ``ulysses_anything = False`` and
a degree P that divides the number of heads. Everything else is refused when ``apply()`` runs
(:func:`ulysses_of`), and a processor whose parallel config differs at call time from the one
``apply()`` saw (``enable_parallelism`` after ``apply``) is refused before any communication
(:func:`check_config`): every rank raises at the same layer, so nothing waits on a collective.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .models import ModelKind

SUPPORTED_CONFIG = (
    "ContextParallelConfig(ulysses_degree=P) with ring_degree=1 and ulysses_anything=False, "
    "P dividing the number of attention heads, on a WanTransformer3DModel"
)
"""What tailattn runs under context parallelism, as the errors name it."""


@dataclass(frozen=True)
class Ulysses:
    """The Ulysses group of one transformer, as ``apply()`` found it.

    Attributes:
        config: diffusers' ``ParallelConfig`` of the processors (passed on to diffusers'
            ``dispatch_attention_fn`` on the dense path).
        group: the process group of the config's Ulysses mesh dimension.
        degree: P, the group's size.
    """

    config: object
    group: dist.ProcessGroup
    degree: int

    def to_heads(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, N/P, H, D) tensors of this rank's tokens -> (B, N, H/P, D) of its heads.

        One all-to-all for all of them: rank r sends heads [j H/P, (j+1) H/P) of its tokens to
        rank j and receives its own heads of every rank's tokens; token chunk i comes from
        rank i, so the received chunks in rank order are the sequence in its order.
        """
        b, n, h, d = xs[0].shape
        send = xs[0].new_empty((self.degree, len(xs), b, n, h // self.degree, d))
        for i, x in enumerate(xs):
            send[:, i] = x.unflatten(2, (self.degree, -1)).permute(2, 0, 1, 3, 4)
        recv = self._exchange(send)  # (P source ranks, len(xs), B, N/P, H/P, D)
        return tuple(recv[:, i].transpose(0, 1).flatten(1, 2) for i in range(len(xs)))

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H/P, D) of this rank's heads -> (B, N/P, H, D) of its tokens (the inverse
        of :meth:`to_heads`): token chunk i goes to rank i; the heads of rank j come back as
        heads [j H/P, (j+1) H/P)."""
        send = x.unflatten(1, (self.degree, -1)).transpose(0, 1).contiguous()
        recv = self._exchange(send)  # (P source ranks, B, N/P, H/P, D)
        return recv.permute(1, 2, 0, 3, 4).flatten(2, 3)

    def _exchange(self, send: torch.Tensor) -> torch.Tensor:
        """All-to-all over the group: slice j of dim 0 goes to rank j; slice i of the result
        came from rank i. No host synchronization on CUDA (NCCL orders it on the stream)."""
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv


def _describe(config: object) -> str:
    """A parallel config in the words of ``ContextParallelConfig``'s fields."""
    if config is None:
        return "no context parallelism"
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return f"{type(config).__name__} without a context_parallel_config"
    fields = ("ring_degree", "ulysses_degree", "ulysses_anything", "ring_anything")
    values = ", ".join(f"{f}={getattr(cp, f)!r}" for f in fields if hasattr(cp, f))
    return f"ContextParallelConfig({values})"


def _check_supported(config: object, model_name: str, kind: str) -> object:
    """The config's ``ContextParallelConfig``, when tailattn supports it (module docstring)."""
    cp = getattr(config, "context_parallel_config", None)
    if kind != "wan":
        raise ValueError(
            f"{model_name} runs context-parallel attention ({_describe(config)}); tailattn "
            f"supports context parallelism on WanTransformer3DModel only ({SUPPORTED_CONFIG}): "
            f"run {model_name} with tailattn on one device"
        )
    ring, anything = getattr(cp, "ring_degree", None), getattr(cp, "ulysses_anything", False)
    if cp is None or ring != 1 or getattr(cp, "ulysses_degree", 1) < 2 or anything:
        raise ValueError(
            f"{model_name} runs context-parallel attention with {_describe(config)}; tailattn "
            f"supports Ulysses only: {SUPPORTED_CONFIG}. Ring and unified attention "
            f"(ring_degree > 1) and ulysses_anything are not supported: enable parallelism with "
            f"ContextParallelConfig(ulysses_degree=P), or leave this model on one device"
        )
    return cp


def ulysses_of(model: torch.nn.Module, kind: ModelKind, layers: Collection[int]) -> Ulysses | None:
    """The Ulysses group of the patched ``layers`` (indices, ``models``) of ``model``, read from
    their processors' ``_parallel_config`` (set by diffusers' ``enable_parallelism``); None
    when they run on one device.

    Raises:
        ValueError: layers with different configs; a configuration other than
            :data:`SUPPORTED_CONFIG` (ring, unified, ``ulysses_anything``, a model other than
            Wan); heads not divisible by P; a config that ``enable_parallelism`` did not set up.
    """
    name = type(model).__name__
    modules = kind.attention_modules(model)
    chosen = {i: modules[i] for i in sorted(layers)}
    configs = {i: getattr(attn.processor, "_parallel_config", None) for i, attn in chosen.items()}
    distinct = {id(config): config for config in configs.values()}
    if len(distinct) > 1:
        first = next(iter(configs.values()))
        odd = [i for i, config in configs.items() if config is not first]
        raise ValueError(
            f"{name} runs context-parallel attention with different parallel configs: layers "
            f"{odd} differ from layer {next(iter(configs))}; tailattn needs one config for the "
            f"whole transformer (enable it with transformer.enable_parallelism(config=...))"
        )
    config = next(iter(distinct.values()), None)
    if config is None:
        return None
    cp = _check_supported(config, name, kind.name)
    degree = int(cp.ulysses_degree)
    for index, attn in chosen.items():
        if attn.heads % degree:
            raise ValueError(
                f"{name} has {attn.heads} attention heads (layer {index}), not divisible by "
                f"ulysses_degree={degree}: Ulysses gives every rank heads / ulysses_degree whole "
                f"heads; choose a ulysses_degree that divides {attn.heads}"
            )
    mesh = getattr(cp, "_ulysses_mesh", None)
    if mesh is None:
        raise ValueError(
            f"the ContextParallelConfig of {name} has no device mesh: enable it with "
            f"transformer.enable_parallelism(config=...) before tailattn's apply()"
        )
    return Ulysses(config, mesh.get_group(), degree)


def check_config(current: object, seen: Ulysses | None, layer: int) -> None:
    """Refuse a layer call whose processor's parallel config is not the one ``apply()`` saw.

    Raises:
        ValueError: e.g. ``enable_parallelism`` was called after ``apply()``.
    """
    expected = None if seen is None else seen.config
    if current is not expected:
        raise ValueError(
            f"layer {layer}: the parallel config of the transformer changed after tailattn's "
            f"apply() (apply() saw {_describe(expected)}, the layer now has "
            f"{_describe(current)}); call handle.remove(), then apply() again after "
            f"transformer.enable_parallelism(...)"
        )
