"""Joint attention over video and text tokens: sparse video-to-video, dense everything else.

HunyuanVideo and CogVideoX attend over one sequence of video tokens and text tokens. tailattn
makes only the video-to-video part sparse; text tokens are always kept:

- a video query attends sparsely to the video keys (the method, with its tail) and densely to
  the (unmasked) text keys. The two parts cover disjoint keys, so they merge exactly by
  log-sum-exp (``tailattn.parts.merge_tokens``):

      lse = logaddexp(lse_vv, lse_vt),
      o   = e^(lse_vv - lse) o_vv + e^(lse_vt - lse) o_vt;

- a text query attends densely to every key, as in the stock model.

Tensors here are in the diffusers layout (B, N, H, D). A boolean ``mask`` (B, 1, 1, N) marks the
keys attention may use (HunyuanVideo masks padded text tokens this way); video keys are never
masked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..._checks import accumulation_dtype
from ...parts import merge_tokens, softmax_part
from ...reference import iter_logits

SparsePart = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]
]
"""``sparse(q, k, v, need_lse) -> (out, lse)``: the method over video tokens, (B, N, H, D)
in and out; ``lse`` (B, H, Nq) is returned when ``need_lse`` is true."""


@dataclass(frozen=True)
class TokenOrder:
    """Where the text tokens sit in a joint sequence: ``n_text`` tokens first or last."""

    n_text: int = 0
    text_first: bool = False

    def video(self, x: torch.Tensor) -> torch.Tensor:
        """The video tokens of a (B, N, ...) tensor."""
        if self.n_text == 0:
            return x
        return x[:, self.n_text :] if self.text_first else x[:, : -self.n_text]

    def text(self, x: torch.Tensor) -> torch.Tensor:
        """The text tokens of a (B, N, ...) tensor."""
        return x[:, : self.n_text] if self.text_first else x[:, x.shape[1] - self.n_text :]

    def join(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        parts = (text, video) if self.text_first else (video, text)
        return torch.cat(parts, dim=1)


def key_mask(mask: torch.Tensor | None, n_keys: int, batch: int) -> torch.Tensor | None:
    """A boolean key mask (B, 1, 1, N) as (B, N); ``None`` stays ``None``.

    Raises:
        TypeError/ValueError: a mask of another dtype or shape (per-query masks and additive
            masks are not supported by the sparse path).
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise TypeError(
            f"attention_mask must be a boolean key mask for sparse attention, got {mask.dtype}"
        )
    if mask.ndim != 4 or mask.shape[1:3] != (1, 1) or mask.shape[-1] != n_keys:
        raise ValueError(
            f"attention_mask must be a key mask of shape (B, 1, 1, {n_keys}), "
            f"got {tuple(mask.shape)}"
        )
    return mask.reshape(mask.shape[0], n_keys).expand(batch, n_keys)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    backend: object,
    parallel_config: object = None,
) -> torch.Tensor:
    """Dense attention through diffusers' dispatcher and the stock processor's backend; with
    the processor's ``parallel_config``, diffusers' own context-parallel attention (q, k, v
    then hold this rank's tokens, as the stock processor passes them). The keyword goes to
    diffusers only when set: versions before context parallelism (0.35) do not take it."""
    parallel = {} if parallel_config is None else {"parallel_config": parallel_config}
    return dispatch_attention_fn(
        q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=backend, **parallel
    )


def _video_to_text(
    q_video: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of video queries over the valid text keys: out (B, Nv, H, D) and lse
    (B, Nv, H) in the accumulation dtype (float64 for float64 inputs, else float32); a batch
    element without valid text keys gets out 0 and lse -inf. Streamed over query chunks, with
    the key mask inside the softmax: nothing synchronizes with the device."""
    acc = accumulation_dtype(q_video.dtype)
    q, k, v = (x.transpose(1, 2) for x in (q_video, k_text, v_text))  # (B, H, N, D)
    scale = q.shape[-1] ** -0.5
    out = q.new_empty((*q.shape[:3], v.shape[-1]), dtype=acc)
    lse = q.new_empty(q.shape[:3], dtype=acc)
    keep = None if valid is None else valid[:, None, None, :]
    v_acc = v.to(acc)
    for rows, z in iter_logits(q, k, scale, acc):
        mask = None if keep is None else keep.expand_as(z)
        out[:, :, rows], lse[:, :, rows] = softmax_part(z, v_acc, mask)
    return out.transpose(1, 2), lse.transpose(1, 2)


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    order: TokenOrder,
    sparse: SparsePart,
    *,
    mask: torch.Tensor | None = None,
    backend: object = None,
) -> torch.Tensor:
    """Sparse video-to-video attention, dense text, merged by log-sum-exp (module docstring).

    Args:
        q, k, v: (B, N, H, D) in the model's token order.
        order: where the text tokens are.
        sparse: the method over video tokens (see :data:`SparsePart`).
        mask: optional boolean key mask (B, 1, 1, N); it may mask text keys only.
        backend: the stock processor's attention backend, for the dense text queries.

    Returns:
        (B, N, H, D) in the model's token order and q's dtype.
    """
    keys = key_mask(mask, k.shape[1], k.shape[0])
    if keys is not None:
        video_keys = order.video(keys).all()
        why = "attention_mask masks video keys; tailattn supports masked text keys only"
        if keys.device.type == "cpu":
            if not bool(video_keys):
                raise ValueError(why)
        else:  # a device-side assertion: checked without stopping the host (no sync); when it
            # fires, CUDA reports it at a later call and the CUDA context cannot be used again
            torch._assert_async(video_keys, why)
    if order.n_text == 0:
        out, _ = sparse(q, k, v, False)
        return out.to(q.dtype)

    q_video = order.video(q)
    out_vv, lse_vv = sparse(q_video, order.video(k), order.video(v), True)
    assert lse_vv is not None
    out_vt, lse_vt = _video_to_text(
        q_video, order.text(k), order.text(v), None if keys is None else order.text(keys)
    )
    merged, _ = merge_tokens(
        out_vv.to(out_vt.dtype),
        lse_vv.transpose(1, 2).to(out_vt.dtype),
        lse_vt.unsqueeze(-1),
        out_vt.unsqueeze(-2),
    )
    out_text = dense_attention(order.text(q), k, v, mask, backend)
    return order.join(merged.to(q.dtype), out_text.to(q.dtype))
