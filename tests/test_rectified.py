"""Rectified SpaAttn against a direct float64 transcription of docs/methods.md section 6."""

import math

import pytest
import torch

import tailattn
from tailattn.select import Rectified, neighbour_blocks
from video_like import grid_qkv

GRID = (2, 4, 6)  # 48 tokens, blocks of 8


def direct_rectified(q, k, v, grid, scale, drop_rate, p_remain, block):
    """Per head and query block, with explicit loops (row-major order, no text tokens)."""
    t, h, w = grid
    n = t * h * w
    blocks = [range(i, min(i + block, n)) for i in range(0, n, block)]
    mk = len(blocks)

    def coords(i):
        return i // (h * w), i // w % h, i % w

    out = torch.empty_like(v)
    for head in range(q.shape[1]):
        Q, K, V = q[0, head], k[0, head], v[0, head]
        mean = [(X[list(b)].mean(0)) for X in (Q, K, V) for b in blocks]
        qbar, kbar, vbar = mean[:mk], mean[mk : 2 * mk], mean[2 * mk :]
        dq = [(Q[list(b)] - qbar[i]).abs().mean(0) for i, b in enumerate(blocks)]
        dk = [(K[list(b)] - kbar[i]).abs().mean(0) for i, b in enumerate(blocks)]
        for m, bm in enumerate(blocks):
            logits = torch.stack(
                [scale * qbar[m] @ kbar[j] + math.log(len(b)) for j, b in enumerate(blocks)]
            )
            P = torch.softmax(logits, 0)
            order = sorted(range(mk), key=lambda j: -float(P[j]))
            prefix, mass = 0, 0.0
            while mass < p_remain:
                mass += float(P[order[prefix]])
                prefix += 1
            count = max(min(prefix + 1, mk), math.ceil((1 - drop_rate) * mk - 1e-9), 1)
            S = set(order[:count])
            for i in bm:
                for j in range(n):
                    if sum(abs(a - b) for a, b in zip(coords(i), coords(j), strict=True)) <= 1:
                        S.add(j // block)
            G = {
                j
                for j in range(mk)
                if j not in S
                and abs(qbar[m] @ kbar[j]) <= abs(dq[m] @ kbar[j]) + abs(qbar[m] @ dk[j])
            }
            R = sum(float(P[j]) for j in S | G)
            C = sum(P[j] * vbar[j] for j in range(mk) if j not in S | G)
            keys = [i for j in sorted(S) for i in blocks[j]]
            for i in bm:
                sparse = torch.softmax(scale * K[keys] @ Q[i], 0) @ V[keys]
                out[0, head, i] = R * sparse + C
    return out


@pytest.mark.parametrize("drop_rate, p_remain", [(0.75, 0.3), (0.9, 0.5), (0.5, 0.0), (0.95, 0.0)])
def test_matches_direct_transcription(drop_rate, p_remain):
    q, k, v = grid_qkv(GRID, seed=1, sharpness=1.5)
    want = direct_rectified(q, k, v, GRID, 0.2, drop_rate, p_remain, 8)
    spec = f"rectified(drop_rate={drop_rate}, p_remain={p_remain})"
    got = tailattn.attention(q, k, v, spec, grid=GRID, scale=0.2, block_q=8, block_k=8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curve, text", [("none", 0), ("gilbert", 0), ("hilbert", 6)])
def test_drop_rate_zero_is_full_attention(curve, text):
    q, k, v = grid_qkv(GRID, seed=2, text_tokens=text)
    full, full_lse = tailattn.full_attention(q, k, v, return_lse=True)
    spec = f"rectified(drop_rate=0, curve={curve}, text_tokens={text})"
    out, info = tailattn.attention(q, k, v, spec, grid=GRID, block_q=8, block_k=8, return_info=True)
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(info["lse"], full_lse, rtol=1e-10, atol=1e-12)
    assert info["density"] == 1.0 and abs(info["rescale"] - 1.0) < 1e-12


def test_rectification_beats_plain_renormalization():
    q, k, v = grid_qkv((4, 8, 8), seed=3)
    full = tailattn.full_attention(q, k, v)
    args = {"grid": (4, 8, 8), "block_q": 32, "block_k": 32}
    out, info = tailattn.attention(q, k, v, "rectified", return_info=True, **args)
    layout = info["layout"]
    assert info["density"] < 0.6 and info["rescale"] < 1.0
    plain, _, _ = tailattn.reference.block_attention(
        q, k, v, layout, tailattn.tails.BlockDrop(), 32**-0.5
    )
    assert tailattn.metrics.mse(out, full) < tailattn.metrics.mse(plain, full)


def test_text_blocks_and_neighbours_are_always_critical():
    q, k, v = grid_qkv(GRID, seed=4, text_tokens=10)
    spec = "rectified(drop_rate=0.95, curve=gilbert, text_tokens=10)"
    _, info = tailattn.attention(q, k, v, spec, grid=GRID, block_q=8, block_k=8, return_info=True)
    kept = info["layout"].to_dense()
    assert bool(kept[..., 6:].all())  # key blocks 6, 7 hold the 10 text tokens
    near = neighbour_blocks(GRID, "gilbert", 10, 8, 8)
    assert bool(kept[:, :, near].all())
    assert bool(near.diagonal()[:6].all()) and not bool(near[6:].any())


def test_bad_inputs():
    q, k, v = grid_qkv(GRID, seed=5)
    for rate in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\)"):
            Rectified(drop_rate=rate)
    with pytest.raises(TypeError, match="drop_rate"):
        Rectified(drop_rate="high")
    with pytest.raises(ValueError, match="p_remain"):
        Rectified(p_remain=1.5)
    with pytest.raises(ValueError, match="needs grid"):
        tailattn.attention(q, k, v, "rectified")
    with pytest.raises(ValueError, match="grid"):
        tailattn.attention(q, k, v, "rectified", grid=(2, 4, 5))
    with pytest.raises(ValueError, match="takes no tail"):
        tailattn.attention(q, k, v, "rectified+uta", grid=GRID)
    with pytest.raises(ValueError, match="backend='triton'"):
        tailattn.attention(q, k, v, "rectified", grid=GRID, backend="triton")
