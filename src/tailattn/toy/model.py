r"""The toy video DiT: a diffusers ``WanTransformer3DModel`` in pixel space, label-conditioned.

The transformer is Wan's (patch embedding, 3D RoPE, adaLN modulation from the timestep,
self-attention, cross-attention, feed-forward) at a small size. The default config
(:meth:`ToyConfig.default`): 8 heads of dim 32, 8 layers, feed-forward 1,024, 9.0 M parameters;
patch (1, 2, 2) over its training clip of (3, 16, 64, 64) gives a 16 x 32 x 32 grid of
N = 16,384 tokens (128 key blocks of 128). RoPE works on any grid, so the same weights take
smaller clips (``tailattn generate`` on a CPU uses 8 frames of 32 x 32).
Conditioning: the label (a shape kind, ``data.SHAPES``) selects ``label_tokens`` learned vectors
of width ``text_dim`` that Wan takes as its ``encoder_hidden_states`` (the text embedding in
Wan); label ``len(SHAPES)`` is the *null* label, trained with label dropout, for
classifier-free guidance.

Velocity parametrization (flow matching as Wan trains): with ``x_t = (1 - t) x_0 + t eps``,
``t`` in [0, 1], the model predicts ``v = eps - x_0`` from ``(x_t, 1000 t, label)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from diffusers import WanTransformer3DModel

from . import data

ADDED_KEYS = ("head_dim", "frames", "size")
"""Config keys added after the first shipped model: a card without them is that model's, and
they take its values (:meth:`ToyConfig.v1`)."""


@dataclass(frozen=True)
class ToyConfig:
    """Size of the toy model and the clip it was trained on (``frames`` of ``size`` x ``size``
    pixels: the default clip of sampling and capture). Presets: :meth:`default` (the current
    model), :meth:`v1` (the first one) and :meth:`tiny` (tests)."""

    heads: int
    layers: int
    ffn_dim: int
    text_dim: int
    freq_dim: int
    label_tokens: int
    labels: int
    head_dim: int
    frames: int
    size: int

    @classmethod
    def default(cls) -> ToyConfig:
        """8 heads of 32, 8 layers, trained on 16 x 64 x 64 clips (16,384 tokens)."""
        return replace(cls.v1(), heads=8, layers=8, head_dim=32, size=64)

    @classmethod
    def v1(cls) -> ToyConfig:
        """The first shipped model: 4 heads of 64, 6 layers, 16 x 32 x 32 clips (4,096 tokens)."""
        return cls(
            heads=4,
            layers=6,
            ffn_dim=1024,
            text_dim=64,
            freq_dim=128,
            label_tokens=4,
            labels=len(data.SHAPES),
            head_dim=64,
            frames=16,
            size=32,
        )

    @classmethod
    def tiny(cls) -> ToyConfig:
        """One head of 64, two layers, 4 x 16 x 16 clips: for tests and CPU checks."""
        return replace(
            cls.v1(),
            heads=1,
            layers=2,
            ffn_dim=128,
            text_dim=32,
            freq_dim=32,
            label_tokens=2,
            frames=4,
            size=16,
        )

    @classmethod
    def named(cls, name: str) -> ToyConfig:
        """The preset ``default``, ``v1`` or ``tiny``.

        Raises:
            ValueError: another name.
        """
        presets = {"default": cls.default, "v1": cls.v1, "tiny": cls.tiny}
        if name not in presets:
            raise ValueError(f"toy config must be one of {', '.join(presets)}, got {name!r}")
        return presets[name]()

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> ToyConfig:
        """The inverse of :meth:`to_dict`; keys of :data:`ADDED_KEYS` may be missing.

        Raises:
            ValueError: unknown keys, or missing keys other than :data:`ADDED_KEYS`.
        """
        names = set(cls.__dataclass_fields__)
        missing = names - set(values) - set(ADDED_KEYS)
        if set(values) - names or missing:
            raise ValueError(
                f"toy config keys {sorted(values)} do not match the expected {sorted(names)}"
            )
        legacy = {name: getattr(cls.v1(), name) for name in ADDED_KEYS}
        return cls(**{name: int(value) for name, value in {**legacy, **values}.items()})

    def wan_kwargs(self) -> dict[str, object]:
        """Arguments of ``WanTransformer3DModel``."""
        return {
            "patch_size": (1, 2, 2),
            "num_attention_heads": self.heads,
            "attention_head_dim": self.head_dim,
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
