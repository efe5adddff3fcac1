r"""The toy video DiT: a diffusers ``WanTransformer3DModel`` in pixel space, label-conditioned.

The transformer is Wan's (patch embedding, 3D RoPE, adaLN modulation from the timestep,
self-attention, cross-attention, feed-forward) at a small size: patch (1, 2, 2) over a
(3, 16, 32, 32) clip gives a 16 x 16 x 16 grid of N = 4,096 tokens, head dim 64.
Conditioning: the label (a shape kind, ``data.SHAPES``) selects ``label_tokens`` learned vectors
of width ``text_dim`` that Wan takes as its ``encoder_hidden_states`` (the text embedding in
Wan); label ``len(SHAPES)`` is the *null* label, trained with label dropout, for
classifier-free guidance.

Velocity parametrization (flow matching as Wan trains): with ``x_t = (1 - t) x_0 + t eps``,
``t`` in [0, 1], the model predicts ``v = eps - x_0`` from ``(x_t, 1000 t, label)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import WanTransformer3DModel

from . import data

HEAD_DIM = 64


@dataclass(frozen=True)
class ToyConfig:
    """Size of the toy model (``default()``: the shipped model; ``tiny()``: for tests)."""

    heads: int = 4
    layers: int = 6
    ffn_dim: int = 1024
    text_dim: int = 64
    freq_dim: int = 128
    label_tokens: int = 4
    labels: int = len(data.SHAPES)

    @classmethod
    def tiny(cls) -> ToyConfig:
        """One head, two layers: trains on a CPU in minutes; for tests and CPU checks."""
        return cls(heads=1, layers=2, ffn_dim=128, text_dim=32, freq_dim=32, label_tokens=2)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> ToyConfig:
        """The inverse of :meth:`to_dict`.

        Raises:
            ValueError: unknown or missing keys.
        """
        names = set(cls.__dataclass_fields__)
        if set(values) != names:
            raise ValueError(
                f"toy config keys {sorted(values)} do not match the expected {sorted(names)}"
            )
        return cls(**{name: int(values[name]) for name in names})

    def wan_kwargs(self) -> dict[str, object]:
        """Arguments of ``WanTransformer3DModel``."""
        return {
            "patch_size": (1, 2, 2),
            "num_attention_heads": self.heads,
            "attention_head_dim": HEAD_DIM,
            "in_channels": data.CHANNELS,
            "out_channels": data.CHANNELS,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.layers,
            "rope_max_seq_len": 64,
        }


class ToyModel(torch.nn.Module):
    """Label embedding + Wan transformer; ``forward(x_t, t, label) -> velocity``."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = WanTransformer3DModel(**config.wan_kwargs())
        self.label_embedding = torch.nn.Embedding(
            config.labels + 1, config.label_tokens * config.text_dim
        )
        torch.nn.init.normal_(self.label_embedding.weight, std=1.0)

    @property
    def null_label(self) -> int:
        """The label of the unconditional branch (classifier-free guidance)."""
        return self.config.labels

    def context(self, label: torch.Tensor) -> torch.Tensor:
        """``encoder_hidden_states`` (B, label_tokens, text_dim) of labels (B,)."""
        return self.label_embedding(label).view(
            label.shape[0], self.config.label_tokens, self.config.text_dim
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Velocity ``eps - x_0`` (B, 3, F, H, W) at ``x_t`` (B, 3, F, H, W), ``t`` (B,) in
        [0, 1], labels (B,) (``null_label`` for unconditional)."""
        return self.transformer(
            hidden_states=x,
            timestep=t * 1000.0,
            encoder_hidden_states=self.context(label),
            return_dict=False,
        )[0]
