"""The supported diffusers transformers: where their self-attention layers are and their grid.

A *layer index* counts the video self-attention modules of one transformer in forward order:
Wan ``blocks[i].attn1``; HunyuanVideo ``transformer_blocks[i].attn`` (dual stream, indices
0..num_layers-1) then ``single_transformer_blocks[j].attn`` (single stream, the following
indices); CogVideoX ``transformer_blocks[i].attn1``. Cross-attention (Wan ``attn2``) and the
HunyuanVideo text refiner are never touched.

The grid (T, H, W) comes from the transformer's input latents and its patch sizes: Wan and
HunyuanVideo take (B, C, F, H, W), CogVideoX takes (B, F, C, H, W).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    WanTransformer3DModel,
)

from .processors import CogVideoXProcessor, HunyuanVideoProcessor, TailProcessor, WanProcessor

PIPELINE_TRANSFORMERS = ("transformer", "transformer_2")
"""Pipeline attributes that may hold a transformer (Wan2.2 A14B has two: high and low noise)."""


@dataclass(frozen=True)
class ModelKind:
    """How tailattn reads one transformer class."""

    name: str
    model_class: type
    stock_processors: tuple[str, ...]
    processor: type[TailProcessor]
    attention_modules: Callable[[torch.nn.Module], list[torch.nn.Module]]
    frames_axis: int

    def patch(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """Patch sizes (pt, ph, pw) from the model's config."""
        size = model.config.patch_size
        if isinstance(size, (tuple, list)):
            pt, ph, pw = (int(p) for p in size)
            return pt, ph, pw
        return int(getattr(model.config, "patch_size_t", None) or 1), int(size), int(size)

    def grid(self, model: torch.nn.Module, hidden_states: object) -> tuple[int, int, int]:
        """Latent grid (T, H, W) after patching, from the transformer's input latents.

        Raises:
            ValueError: the input is not a 5-D tensor or is smaller than one patch.
        """
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
            got = (
                f"shape {tuple(hidden_states.shape)}"
                if isinstance(hidden_states, torch.Tensor)
                else type(hidden_states).__name__
            )
            layout = "(B, C, F, H, W)" if self.frames_axis == 2 else "(B, F, C, H, W)"
            raise ValueError(
                f"cannot infer the latent grid: {self.model_class.__name__} hidden_states must be "
                f"a 5-D tensor {layout}, got {got}"
            )
        patch = self.patch(model)
        sizes = (hidden_states.shape[self.frames_axis], *hidden_states.shape[-2:])
        t, h, w = (size // p for size, p in zip(sizes, patch, strict=True))
        if min(t, h, w) < 1:
            raise ValueError(
                f"cannot infer the latent grid: input (frames, height, width) = {tuple(sizes)} is "
                f"smaller than the patch {patch}"
            )
        return t, h, w


def _wan_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block.attn1 for block in model.blocks]


def _hunyuan_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block.attn for block in (*model.transformer_blocks, *model.single_transformer_blocks)]


def _cogvideox_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block.attn1 for block in model.transformer_blocks]


KINDS: tuple[ModelKind, ...] = (
    ModelKind(
        "wan",
        WanTransformer3DModel,
        ("WanAttnProcessor", "WanAttnProcessor2_0"),
        WanProcessor,
        _wan_layers,
        frames_axis=2,
    ),
    ModelKind(
        "hunyuanvideo",
        HunyuanVideoTransformer3DModel,
        ("HunyuanVideoAttnProcessor2_0",),
        HunyuanVideoProcessor,
        _hunyuan_layers,
        frames_axis=2,
    ),
    ModelKind(
        "cogvideox",
        CogVideoXTransformer3DModel,
        ("CogVideoXAttnProcessor2_0",),
        CogVideoXProcessor,
        _cogvideox_layers,
        frames_axis=1,
    ),
)
"""The supported transformer classes."""

SUPPORTED = tuple(kind.model_class.__name__ for kind in KINDS)


def kind_of(model: object) -> ModelKind:
    """The :class:`ModelKind` of a supported transformer.

    Raises:
        TypeError: any other class.
    """
    for kind in KINDS:
        if isinstance(model, kind.model_class):
            return kind
    raise TypeError(
        f"tailattn does not support {type(model).__name__}; expected one of {', '.join(SUPPORTED)} "
        f"or a pipeline holding one"
    )


def find_transformers(model_or_pipeline: object) -> list[tuple[torch.nn.Module, ModelKind]]:
    """The supported transformers of a transformer or a pipeline, with their kinds.

    A pipeline is any object with a ``transformer`` attribute (diffusers pipelines); its
    ``transformer_2`` is included when present (Wan2.2 A14B).

    Raises:
        TypeError: an unsupported model class, or an object that is neither.
        ValueError: a pipeline without a transformer.
    """
    if isinstance(model_or_pipeline, torch.nn.Module):
        return [(model_or_pipeline, kind_of(model_or_pipeline))]
    if not any(hasattr(model_or_pipeline, name) for name in PIPELINE_TRANSFORMERS):
        components = getattr(model_or_pipeline, "components", None)
        if isinstance(components, dict):
            raise ValueError(
                f"{type(model_or_pipeline).__name__} has no transformer (components: "
                f"{', '.join(components) or 'none'}); expected a pipeline holding one of "
                f"{', '.join(SUPPORTED)}"
            )
        raise TypeError(
            f"expected a diffusers transformer ({', '.join(SUPPORTED)}) or a pipeline with a "
            f"'transformer', got {type(model_or_pipeline).__name__}"
        )
    found = [
        getattr(model_or_pipeline, name, None)
        for name in PIPELINE_TRANSFORMERS
        if getattr(model_or_pipeline, name, None) is not None
    ]
    if not found:
        raise ValueError(
            f"{type(model_or_pipeline).__name__} has transformer=None; load the pipeline with its "
            f"transformer ({', '.join(SUPPORTED)})"
        )
    return [(model, kind_of(model)) for model in found]
