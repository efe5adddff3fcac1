"""Tiny random-weight diffusers video transformers (head dim 64) and their inputs, for the
diffusers integration tests. Import after ``pytest.importorskip("diffusers")``."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from threads import one_thread  # noqa: F401  (re-exported for the diffusers tests)

HEADS, HEAD_DIM = 2, 64
CHANNELS = 4


def wan(
    num_layers: int = 2,
    seed: int = 0,
    i2v: bool = False,
    heads: int = HEADS,
    head_dim: int = HEAD_DIM,
) -> WanTransformer3DModel:
    """Wan T2V, or with ``i2v`` Wan I2V: image tokens in cross-attention, latents with the
    conditioning channels concatenated (2 * CHANNELS in)."""
    torch.manual_seed(seed)
    image = {"image_dim": 16, "added_kv_proj_dim": heads * head_dim} if i2v else {}
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=2 * CHANNELS if i2v else CHANNELS,
        out_channels=CHANNELS,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=num_layers,
        rope_max_seq_len=32,
        **image,
    ).eval()


def wan_i2v_inputs(timestep: float, seed: int = 1) -> dict[str, Any]:
    """Wan I2V inputs: 512 text tokens (Wan's processor takes the last 512 of the context as
    text) and 5 image tokens."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 2 * CHANNELS, 3, 8, 8, generator=gen),
        "timestep": torch.full((1,), timestep),
        "encoder_hidden_states": torch.randn(1, 512, 32, generator=gen),
        "encoder_hidden_states_image": torch.randn(1, 5, 16, generator=gen),
    }


def hunyuan(seed: int = 0) -> HunyuanVideoTransformer3DModel:
    """One dual-stream and one single-stream block: layer 0 and layer 1."""
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(16, 24, 24),
    ).eval()


def cogvideox(patch_size_t: int | None = None, seed: int = 0) -> CogVideoXTransformer3DModel:
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        time_embed_dim=4,
        text_embed_dim=16,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        patch_size_t=patch_size_t,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
        use_rotary_positional_embeddings=True,
    ).eval()


def wan_inputs(
    timestep: float, frames: int = 3, height: int = 8, width: int = 8, batch: int = 1, seed: int = 1
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, CHANNELS, frames, height, width, generator=gen),
        "timestep": torch.full((batch,), timestep),
        "encoder_hidden_states": torch.randn(batch, 7, 32, generator=gen),
    }


def hunyuan_inputs(
    timestep: float,
    frames: int = 3,
    height: int = 8,
    width: int = 8,
    text_valid: Sequence[int] = (4,),
    seed: int = 1,
) -> dict[str, Any]:
    """Six text tokens per batch element, the first ``text_valid[b]`` of them unmasked."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(text_valid)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor(text_valid).unsqueeze(1)
    return {
        "hidden_states": torch.randn(batch, CHANNELS, frames, height, width, generator=gen),
        "timestep": torch.full((batch,), timestep),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=gen),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(batch, 8, generator=gen),
        "guidance": torch.full((batch,), 3000.0),
    }


def cogvideox_inputs(
    timestep: float,
    frames: int = 3,
    height: int = 8,
    width: int = 8,
    batch: int = 1,
    seed: int = 1,
    rope_frames: int | None = None,
) -> dict[str, Any]:
    """Latents (B, F, C, H, W), eight text tokens, 3D RoPE as the CogVideoX pipeline builds it
    (patch size 2: the rotary grid is (rope_frames or frames, height / 2, width / 2))."""
    gen = torch.Generator().manual_seed(seed)
    rope = get_3d_rotary_pos_embed(
        HEAD_DIM,
        ((0, 0), (height // 2, width // 2)),
        (height // 2, width // 2),
        rope_frames or frames,
    )
    return {
        "hidden_states": torch.randn(batch, frames, CHANNELS, height, width, generator=gen),
        "timestep": torch.full((batch,), timestep),
        "encoder_hidden_states": torch.randn(batch, 8, 16, generator=gen),
        "image_rotary_emb": rope,
    }


@dataclass(frozen=True)
class Case:
    """A tiny model and how to feed it."""

    name: str
    make: Callable[[], torch.nn.Module]
    inputs: Callable[..., dict[str, Any]]
    n_layers: int


CASES = (
    Case("wan", wan, wan_inputs, 2),
    Case("hunyuanvideo", hunyuan, hunyuan_inputs, 2),
    Case("cogvideox", cogvideox, cogvideox_inputs, 2),
)


def run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


class TinyPipeline:
    """Stands in for a diffusers pipeline: a ``transformer`` (and optional ``transformer_2``
    taking over below ``boundary``), called once per step and guidance branch at decreasing
    timesteps, like Wan's pipeline (guidance as separate calls)."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        transformer_2: torch.nn.Module | None = None,
        boundary: float = 0.0,
    ) -> None:
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary = boundary
        self.progress_disabled = False

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress_disabled = disable

    def __call__(
        self,
        prompt: str = "",
        num_inference_steps: int = 3,
        branches: int = 2,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        **_: Any,
    ) -> list[torch.Tensor]:
        outputs = []
        for i in range(num_inference_steps):
            t = 1000.0 * (num_inference_steps - i) / num_inference_steps
            model = self.transformer
            if self.transformer_2 is not None and t < self.boundary:
                model = self.transformer_2
            for branch in range(branches):
                inputs = wan_inputs(t, frames=num_frames or 3, height=height or 8, width=width or 8)
                inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"] * (1 + branch)
                outputs.append(run(model, inputs))
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {})
        return outputs


def plain(output: str) -> str:
    """Command output without rich's box drawing and line wrapping: words joined by spaces."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", output).split())
