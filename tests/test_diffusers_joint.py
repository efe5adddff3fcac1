"""Joint [video, text] attention: sparse video-to-video, text always kept, against brute force."""

import math

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers_tiny import one_thread  # noqa: F401
from tailattn import attention
from tailattn.integrations.diffusers import TokenOrder, joint_attention

pytestmark = pytest.mark.usefixtures("one_thread")

NV, NT, H, D = 24, 5, 2, 64
KEEP = 0.25


def sparse_part(method):
    def sparse(q, k, v, need_lse):
        result = attention(q, k, v, method, keep=KEEP, layout="bnhd", return_info=need_lse)
        return (result[0], result[1]["lse"]) if need_lse else (result, None)

    return sparse


def qkv(batch=2, n_text=NT, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, NV + n_text, H, D)
    q = 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return (
        q,
        torch.randn(shape, generator=gen, dtype=torch.float64),
        torch.randn(shape, generator=gen, dtype=torch.float64),
    )


def brute_force(q, k, v, order, valid_text, uta):
    """Definition, query by query: a video query keeps its ceil(KEEP * NV) largest video logits
    and every valid text key (plus, with UTA, one token mean_D z + log |D|, mean_D v for its
    dropped video keys, Eq. 13); a text query attends to every valid key."""
    b, n, h, _ = q.shape
    first = torch.arange(order.n_text if order.text_first else NV)
    second = torch.arange(len(first), n)
    text_idx, video_idx = (first, second) if order.text_first else (second, first)
    out = torch.zeros_like(q)
    budget = math.ceil(KEEP * len(video_idx))
    for bi in range(b):
        text_keys = text_idx[valid_text[bi]]
        for hi in range(h):
            z = q[bi, :, hi] @ k[bi, :, hi].T / math.sqrt(D)
            for i in range(n):
                if i in text_idx:
                    keys = torch.cat([video_idx, text_keys])
                    out[bi, i, hi] = torch.softmax(z[i, keys], 0) @ v[bi, keys, hi]
                    continue
                zv = z[i, video_idx]
                kept = video_idx[zv.topk(budget).indices]
                dropped = video_idx[~torch.isin(video_idx, kept)]
                keys = torch.cat([kept, text_keys])
                logits, values = z[i, keys], v[bi, keys, hi]
                if uta:
                    tail = z[i, dropped].mean() + math.log(len(dropped))
                    logits = torch.cat([logits, tail.reshape(1)])
                    values = torch.cat([values, v[bi, dropped, hi].mean(0, keepdim=True)])
                out[bi, i, hi] = torch.softmax(logits, 0) @ values
    return out


@pytest.mark.parametrize("text_first", [False, True], ids=["text-last", "text-first"])
@pytest.mark.parametrize("method", ["topk", "topk+uta"])
@pytest.mark.parametrize("valid", [None, [5, 2]], ids=["no-mask", "padded-text"])
def test_joint_attention_against_brute_force(text_first, method, valid):
    q, k, v = qkv()
    order = TokenOrder(NT, text_first=text_first)
    mask = None
    valid_text = torch.ones(2, NT, dtype=torch.bool)
    if valid is not None:
        valid_text = torch.arange(NT).unsqueeze(0) < torch.tensor(valid).unsqueeze(1)
        ones = torch.ones(2, NV, dtype=torch.bool)
        full = torch.cat([valid_text, ones] if text_first else [ones, valid_text], dim=1)
        mask = full[:, None, None, :]
    out = joint_attention(q, k, v, order, sparse_part(method), mask=mask)
    expected = brute_force(q, k, v, order, valid_text, uta=method.endswith("uta"))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_video_only_sequence_is_the_method_itself():
    q, k, v = qkv(n_text=0)
    out = joint_attention(q, k, v, TokenOrder(), sparse_part("topk+uta"))
    torch.testing.assert_close(out, attention(q, k, v, "topk+uta", keep=KEEP, layout="bnhd"))


def test_a_batch_element_without_valid_text_attends_to_video_only():
    q, k, v = qkv()
    order = TokenOrder(NT)
    mask = torch.ones(2, NV + NT, dtype=torch.bool)
    mask[1, NV:] = False
    out = joint_attention(q, k, v, order, sparse_part("topk"), mask=mask[:, None, None, :])
    video_only = attention(q[1:, :NV], k[1:, :NV], v[1:, :NV], "topk", keep=KEEP, layout="bnhd")
    torch.testing.assert_close(out[1:, :NV], video_only)


def test_masked_video_keys_are_refused():
    q, k, v = qkv()
    mask = torch.ones(2, 1, 1, NV + NT, dtype=torch.bool)
    mask[..., 0] = False
    with pytest.raises(ValueError, match="masks video keys"):
        joint_attention(q, k, v, TokenOrder(NT), sparse_part("topk"), mask=mask)


def test_additive_masks_are_refused():
    q, k, v = qkv()
    mask = torch.zeros(2, 1, 1, NV + NT, dtype=torch.float64)
    with pytest.raises(TypeError, match="boolean key mask"):
        joint_attention(q, k, v, TokenOrder(NT), sparse_part("topk"), mask=mask)


def test_per_query_masks_are_refused():
    q, k, v = qkv()
    mask = torch.ones(2, 1, NV + NT, NV + NT, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"key mask of shape \(B, 1, 1, 29\)"):
        joint_attention(q, k, v, TokenOrder(NT), sparse_part("topk"), mask=mask)
