"""Triton kernels against the float64 reference (CPU through TRITON_INTERPRET=1, GPU for real)."""

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from tailattn.layout import BlockLayout, block_sizes  # noqa: E402
from tailattn.reference import merge_tokens, softmax_part  # noqa: E402

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if CUDA else "cpu"


def brute_force(q, k, v, layout, tail):
    """Token-level float64 evaluation of kept blocks + tail tokens, in permuted order."""
    q, k, v = (x.double().cpu() for x in (q, k, v))
    if layout.q_perm is not None:
        q = q.gather(2, layout.q_perm.cpu().expand(q.shape[:3]).unsqueeze(-1).expand(q.shape))
    if layout.kv_perm is not None:
        idx = layout.kv_perm.cpu().expand(k.shape[:3]).unsqueeze(-1)
        k, v = k.gather(2, idx.expand(k.shape)), v.gather(2, idx.expand(v.shape))
    s = 1 / math.sqrt(q.shape[-1])
    z = (q @ k.transpose(-1, -2)) * s
    kept = layout.token_mask().cpu()
    out, lse = softmax_part(z, v, kept)
    dropped = ~kept
    if tail == "uta":
        w = dropped.double()
        n = w.sum(-1)
        token = torch.where(
            n > 0, (z * w).sum(-1) / n.clamp_min(1) + torch.log(n.clamp_min(1)), -math.inf
        )
        out, lse = merge_tokens(
            out, lse, token[..., None], ((w @ v) / n.clamp_min(1)[..., None])[..., None, :]
        )
    elif tail == "blocks":
        sizes = block_sizes(layout.n_k, layout.block_k).double()
        block_of = torch.arange(layout.n_k) // layout.block_k
        onehot = torch.nn.functional.one_hot(block_of, sizes.numel()).double()  # (Nk, Mk)
        kbar = (onehot.T @ k) / sizes[:, None]
        vbar = (onehot.T @ v) / sizes[:, None]
        logits = (q @ kbar.transpose(-1, -2)) * s + torch.log(sizes)
        block_dropped = ~layout.to_dense().cpu()[:, :, torch.arange(layout.n_q) // layout.block_q]
        logits = logits.masked_fill(~block_dropped, -math.inf)
        out, lse = merge_tokens(out, lse, logits, vbar.unsqueeze(2).expand(*logits.shape, -1))
    if layout.q_perm is not None:
        inv = torch.argsort(layout.q_perm.cpu().expand(q.shape[:3]), dim=-1)
        out = out.gather(2, inv.unsqueeze(-1).expand(out.shape))
        lse = lse.gather(2, inv)
    return out, lse


def random_layout(b, h, n_q, n_k, bq, bk, p, seed, perm=False):
    gen = torch.Generator().manual_seed(seed)
    mq, mk = math.ceil(n_q / bq), math.ceil(n_k / bk)
    mask = torch.rand(b, h, mq, mk, generator=gen) < p
    mask[..., torch.randint(0, mk, (1,), generator=gen)] = True
    q_perm = torch.randperm(n_q, generator=gen) if perm else None
    kv_perm = torch.randperm(n_k, generator=gen) if perm else None
    layout = BlockLayout.from_dense(mask, n_q, n_k, bq, bk, q_perm, kv_perm)
    return BlockLayout(
        layout.kv_indices.to(DEVICE),
        layout.kv_counts.to(DEVICE),
        n_q,
        n_k,
        bq,
        bk,
        None if q_perm is None else q_perm.to(DEVICE),
        None if kv_perm is None else kv_perm.to(DEVICE),
    )


def rel(a, b):
    return float((a.double().cpu() - b).norm() / b.norm())


@pytest.mark.parametrize("tail", ["drop", "uta", "blocks"])
@pytest.mark.parametrize(
    ("b", "h", "n", "d", "bq", "bk", "p", "perm"),
    [
        (1, 2, 300, 64, 64, 64, 0.4, False),  # ragged last block
        (2, 1, 257, 32, 64, 128, 0.5, True),  # batch > 1, permutation, single ragged token
        (1, 1, 200, 64, 128, 64, 1.0, False),  # every block kept: empty tail
        (1, 1, 190, 64, 64, 64, 0.0, False),  # one kept block per query block
    ],
)
def test_kernel_matches_reference_float32(tail, b, h, n, d, bq, bk, p, perm):
    from tailattn.kernels import block_sparse_attention

    gen = torch.Generator().manual_seed(n + d)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(DEVICE) for _ in range(3))
    layout = random_layout(b, h, n, n, bq, bk, p, seed=n, perm=perm)
    out, lse = block_sparse_attention(q, k, v, layout, tail)
    ref_out, ref_lse = brute_force(q, k, v, layout, tail)
    assert out.dtype == torch.float32
    assert rel(out, ref_out) < 1e-3
    assert float((lse.double().cpu() - ref_lse).abs().max()) < 1e-3


@pytest.mark.parametrize("tail", ["drop", "uta", "blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_low_precision_and_bnhd_without_copy(tail, dtype):
    from tailattn.kernels import block_sparse_attention

    gen = torch.Generator().manual_seed(7)
    b, n, h, d = 1, 260, 2, 64
    q, k, v = (torch.randn(b, n, h, d, generator=gen).to(DEVICE, dtype) for _ in range(3))
    layout = random_layout(b, h, n, n, 64, 64, 0.3, seed=3)
    views = [x.transpose(1, 2) for x in (q, k, v)]  # (B, H, N, D) views of (B, N, H, D) memory
    out, _ = block_sparse_attention(*views, layout, tail)
    ref_out, _ = brute_force(*views, layout, tail)
    assert out.dtype == dtype
    assert rel(out, ref_out) < 1e-2


def test_kernel_rejects_what_it_cannot_run():
    from tailattn.kernels import block_sparse_attention

    q = torch.randn(1, 1, 128, 64, device=DEVICE)
    layout = random_layout(1, 1, 128, 128, 64, 64, 0.5, seed=0)
    with pytest.raises(ValueError, match="tail 'moment'"):
        block_sparse_attention(q, q, q, layout, "moment")
    with pytest.raises(ValueError, match="head dim 48"):
        x = torch.randn(1, 1, 128, 48, device=DEVICE)
        block_sparse_attention(x, x, x, layout, "uta")
    with pytest.raises(ValueError, match="dtype torch.float64"):
        block_sparse_attention(q.double(), q.double(), q.double(), layout, "uta")
    with pytest.raises(ValueError, match="layout is for"):
        x = torch.randn(1, 1, 192, 64, device=DEVICE)
        block_sparse_attention(x, x, x, layout, "uta")
    odd = BlockLayout.from_dense(torch.ones(1, 1, 4, 4, dtype=torch.bool), 128, 128, 32, 32)
    with pytest.raises(ValueError, match="block_q=32"):
        block_sparse_attention(q, q, q, odd, "drop")


def test_block_sums_ragged():
    from tailattn.kernels import block_sums

    x = torch.randn(2, 3, 300, 32, device=DEVICE)
    sums = block_sums(x, 128)
    ref = torch.stack([x[:, :, i : i + 128].sum(2) for i in range(0, 300, 128)], 2)
    assert sums.shape == (2, 3, 3, 32)
    assert float((sums - ref).abs().max()) < 1e-4


def test_block_means_and_log_counts():
    from tailattn.kernels.pooling import block_means

    x = torch.randn(1, 2, 200, 64, device=DEVICE)
    means, log_count = block_means(x, 64, torch.float32)
    sizes = block_sizes(200, 64).double()
    ref = torch.stack([x[:, :, i : i + 64].double().mean(2) for i in range(0, 200, 64)], 2)
    assert float((means.double().cpu() - ref.cpu()).abs().max()) < 1e-5
    assert torch.allclose(log_count.double().cpu(), torch.log(sizes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_spread_is_the_mean_and_mean_absolute_deviation(dtype):
    from tailattn.kernels import block_spread

    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 3, 200, 32, generator=gen) * 2 + 1).to(dtype)
    mean, spread = block_spread(x.to(DEVICE), 64)
    xd = x.double()
    ref_mean = torch.stack([xd[:, :, i : i + 64].mean(2) for i in range(0, 200, 64)], 2)
    ref_spread = torch.stack(
        [
            (xd[:, :, i : i + 64] - ref_mean[:, :, i // 64, None]).abs().mean(2)
            for i in range(0, 200, 64)
        ],
        2,
    )
    assert mean.shape == spread.shape == (2, 3, 4, 32)
    assert float((mean.double().cpu() - ref_mean).abs().max()) < 1e-5
    assert float((spread.double().cpu() - ref_spread).abs().max()) < 1e-5


def test_triton_block_means_match_torch_pooling():
    from tailattn.kernels.pooling import block_means
    from tailattn.select.blocks import pool_blocks

    x = torch.randn(1, 2, 300, 32, generator=torch.Generator().manual_seed(2))
    means, _ = block_means(x.to(DEVICE), 64)
    assert float((means.cpu() - pool_blocks(x, 64)).abs().max()) < 1e-5


@pytest.mark.parametrize("tail", ["drop", "uta", "blocks", "moment"])
@pytest.mark.parametrize("method", ["block-topk", "window"])
def test_attention_triton_backend_matches_reference(tail, method):
    import tailattn

    gen = torch.Generator().manual_seed(3)
    grid = (3, 8, 12)
    q, k, v = (torch.randn(1, 2, 288, 64, generator=gen).to(DEVICE) for _ in range(3))
    kw = dict(keep=0.4, grid=grid, block_q=64, block_k=64)
    ref = tailattn.attention(q, k, v, f"{method}+{tail}", backend="reference", **kw)
    out, info = tailattn.attention(
        q, k, v, f"{method}+{tail}", backend="triton", return_info=True, **kw
    )
    assert rel(out, ref.double().cpu()) < 1e-3
    assert 0 < info["density"] < 1


def test_triton_backend_refusals():
    import tailattn

    q = torch.randn(1, 1, 128, 64, device=DEVICE)
    with pytest.raises(ValueError, match="backend='triton' runs block and fused methods"):
        tailattn.attention(q, q, q, "topk+uta", keep=0.5, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        tailattn.attention(q, q, q, "block-topk", keep=0.5, backend="cuda")
    with pytest.raises(ValueError, match="block_q=32"):
        tailattn.attention(
            q, q, q, "block-topk", keep=0.5, block_q=32, block_k=32, backend="triton"
        )


@pytest.mark.parametrize("tail", ["drop", "uta", "blocks"])
def test_kernel_tma_descriptor_path(tail):
    """The Hopper path loads K and V through tensor descriptors (ragged rows come back zero)."""
    from tailattn.kernels import block_sparse_attention

    gen = torch.Generator().manual_seed(11)
    b, n, h, d = 1, 300, 2, 64
    q, k, v = (torch.randn(b, n, h, d, generator=gen).to(DEVICE) for _ in range(3))
    views = [x.transpose(1, 2) for x in (q, k, v)]
    layout = random_layout(b, h, n, n, 64, 64, 0.4, seed=5)
    config = {"BLOCK_M": 64, "BLOCK_N": 64, "USE_TMA": True}
    out, lse = block_sparse_attention(*views, layout, tail, config=config)
    ref_out, ref_lse = brute_force(*views, layout, tail)
    assert rel(out, ref_out) < 1e-3
    assert float((lse.double().cpu() - ref_lse).abs().max()) < 1e-3


@pytest.mark.parametrize("curve", ["none", "gilbert"])
def test_rectified_on_the_kernel_matches_the_reference(curve):
    import tailattn

    gen = torch.Generator().manual_seed(11)
    grid = (3, 8, 12)
    q, k, v = (torch.randn(1, 2, 288, 64, generator=gen).to(DEVICE) for _ in range(3))
    spec = f"rectified(curve={curve}, drop_rate=0.6, block_q=64, block_k=64)"
    ref, ref_info = tailattn.attention(
        q, k, v, spec, grid=grid, backend="reference", return_info=True
    )
    out, info = tailattn.attention(q, k, v, spec, grid=grid, backend="triton", return_info=True)
    assert rel(out, ref.double().cpu()) < 1e-3
    assert rel(info["lse"], ref_info["lse"].double().cpu()) < 1e-5
    assert info["density"] == ref_info["density"] < 1


def test_an_old_triton_interpreter_is_refused_with_the_reason(monkeypatch):
    from tailattn.kernels import runtime

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(runtime.triton, "__version__", "3.6.0")
    assert "triton>=3.9" in runtime.interpreter_problem()
    monkeypatch.setattr(runtime.triton, "__version__", "3.9.0")
    assert runtime.interpreter_problem() is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(runtime.triton, "__version__", "3.6.0")
    assert runtime.interpreter_problem() is None  # compiled on a GPU: 3.6 is fine
