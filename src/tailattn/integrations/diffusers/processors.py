"""Attention processors that replace the stock ones of Wan, HunyuanVideo and CogVideoX.

Each processor computes q, k, v with the same operations as the stock processor it replaces
(projections, q/k normalization, rotary embeddings: what attention sees), hands them to its
layer's route (the handle decides dense or sparse, captures, keeps state), and applies the
stock output projections. Tensors go to the route in the diffusers layout (B, N, H, D) in the
model's token order; the route returns the attention output in the same form.

The processors hold no state of their own beyond the replaced stock processor (given back by
``Handle.remove()``) and its attention backend, which the dense path keeps using. Their
``_parallel_config`` is the stock processor's (read and written through), and goes to the route
with every call (context parallelism: ``parallel``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from diffusers.models.embeddings import apply_rotary_emb

from .joint import TokenOrder


class Route(Protocol):
    """The handle's side of one attention layer (see ``runtime.LayerRoute``)."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        order: TokenOrder,
        mask: torch.Tensor | None,
        backend: object,
        parallel_config: object = None,
    ) -> torch.Tensor: ...


class TailProcessor:
    """Base of tailattn's processors: the replaced stock processor and the layer's route."""

    def __init__(self, stock: object, route: Route) -> None:
        self.stock = stock
        self.route = route
        self._attention_backend = getattr(stock, "_attention_backend", None)

    @property
    def _parallel_config(self) -> object:
        """The stock processor's parallel config (diffusers' ``ParallelConfig`` or None).

        diffusers' ``enable_parallelism`` sets ``_parallel_config`` on every processor that has
        one; through this property it lands on the stock processor, so that the stock
        processor ``Handle.remove()`` gives back is configured as diffusers meant, and the next
        call of this processor sees the change (``parallel.check_config``). A stock processor
        without one (CogVideoX) leaves this attribute missing too, as diffusers expects.
        """
        return self.stock._parallel_config  # type: ignore[attr-defined]

    @_parallel_config.setter
    def _parallel_config(self, config: object) -> None:
        self.stock._parallel_config = config  # type: ignore[attr-defined]

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        order: TokenOrder,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention output (B, N, H * D) in q's dtype."""
        parallel_config = getattr(self, "_parallel_config", None)
        out = self.route(q, k, v, order, mask, self._attention_backend, parallel_config)
        return out.flatten(2, 3).to(q.dtype)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H * D) -> (B, N, H, D)."""
    return x.unflatten(2, (heads, -1))


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on (B, N, H, D): channel pairs (2i, 2i+1) rotate by angle a_i,

        (x_2i, x_2i+1) -> (x_2i cos a_i - x_2i+1 sin a_i, x_2i sin a_i + x_2i+1 cos a_i),

    with ``cos``/``sin`` (1, N, 1, D) holding each angle twice (Wan's ``WanRotaryPosEmbed``).
    """
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 1::2]
    rotated = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1)
    return rotated.flatten(-2).type_as(x)


def _rope_span(
    x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor], start: int, stop: int
) -> torch.Tensor:
    """Rotary embedding (diffusers' ``apply_rotary_emb``, real form) on tokens [start, stop) of
    a (B, N, H, D) tensor; the other tokens (text) pass unchanged."""
    parts = [x[:, :start], apply_rotary_emb(x[:, start:stop], freqs, sequence_dim=1), x[:, stop:]]
    return torch.cat([p for p in parts if p.shape[1]], dim=1)


class WanProcessor(TailProcessor):
    """Wan2.1/2.2 self-attention (``blocks[i].attn1``): video tokens only."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(
                "tailattn's WanProcessor serves self-attention (attn1) only; it got "
                "encoder_hidden_states"
            )
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (_heads(x, attn.heads) for x in (q, k, v))
        if rotary_emb is not None:
            q, k = rotate_pairs(q, *rotary_emb), rotate_pairs(k, *rotary_emb)
        out = self._attend(q, k, v, TokenOrder(), attention_mask)
        return attn.to_out[1](attn.to_out[0](out))


class HunyuanVideoProcessor(TailProcessor):
    """HunyuanVideo joint attention: video tokens then text tokens.

    Dual-stream blocks project text with the added projections (``add_q_proj``...); single-stream
    blocks project the concatenated sequence. RoPE applies to video tokens only.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("HunyuanVideo joint attention needs encoder_hidden_states (text)")
        n_text = encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        x = hidden_states
        if single_stream:
            x = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q, k, v = (_heads(proj(x), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            n_video = q.shape[1] - n_text if single_stream else q.shape[1]
            q = _rope_span(q, image_rotary_emb, 0, n_video)
            k = _rope_span(k, image_rotary_emb, 0, n_video)
        if not single_stream:
            eq, ek, ev = (
                _heads(proj(encoder_hidden_states), attn.heads)
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            q, k, v = (torch.cat(pair, dim=1) for pair in ((q, eq), (k, ek), (v, ev)))
        order = TokenOrder(n_text, text_first=False)
        out = self._attend(q, k, v, order, attention_mask)
        video, text = order.video(out), order.text(out)
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


class CogVideoXProcessor(TailProcessor):
    """CogVideoX joint attention: text tokens then video tokens; RoPE on video tokens only."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError(
                "tailattn's CogVideoXProcessor takes no attention_mask (the stock CogVideoX "
                "blocks pass none)"
            )
        n_text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = (_heads(proj(x), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q = _rope_span(q, image_rotary_emb, n_text, q.shape[1])
            if not attn.is_cross_attention:
                k = _rope_span(k, image_rotary_emb, n_text, k.shape[1])
        order = TokenOrder(n_text, text_first=True)
        out = attn.to_out[1](attn.to_out[0](self._attend(q, k, v, order, None)))
        return order.video(out), order.text(out)
