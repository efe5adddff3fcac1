"""The in-loop skipping kernel against the reference loop (CPU through TRITON_INTERPRET=1)."""

import os

import pytest
import torch

import tailattn

triton = pytest.importorskip("triton")

from tailattn.contract import KernelTail  # noqa: E402
from tailattn.kernels import skipping  # noqa: E402
from tailattn.kernels.skipping import (  # noqa: E402
    BlasstRule,
    RecallRule,
    skipping_attention,
    unsupported_reason,
)
from tailattn.reference import block_attention  # noqa: E402
from tailattn.select import dynamic  # noqa: E402
from tailattn.tails import BlockDrop, BlockUTA, PooledBlocks  # noqa: E402
from test_dynamic import exact_recall, tiled_qkv  # noqa: E402
from video_like import grid_qkv  # noqa: E402

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if CUDA else "cpu"

BLOCK_TAILS = {
    KernelTail.DROP: BlockDrop(),
    KernelTail.UTA: BlockUTA(),
    KernelTail.BLOCKS: PooledBlocks(),
}
RULES = {
    "blasst": (BlasstRule(lam=0.1), dynamic.Blasst(lam=0.1, block_q=64, block_k=64)),
    "recall": (RecallRule(recall=0.9), dynamic.Recall(recall=0.9, block_q=64, block_k=64)),
}


def on_device(*xs, dtype=torch.float32):
    return tuple(x.to(DEVICE, dtype) for x in xs)


def reference_over_own_tiles(q, k, v, result, tail):
    """Exact attention (float64) over the kernel's computed tiles plus the matching block tail."""
    q, k, v = (x.double() for x in (q, k, v))
    layout = result.layout()
    out, lse, _ = block_attention(q, k, v, layout, BLOCK_TAILS[tail], q.shape[-1] ** -0.5)
    return out.cpu(), lse.cpu()


def rel(a, b):
    return float((a.double().cpu() - b).norm() / b.norm())


@pytest.mark.parametrize("tail", list(KernelTail))
@pytest.mark.parametrize("rule", ["blasst", "recall"])
@pytest.mark.parametrize(("n", "d"), [(300, 64), (200, 32)])  # ragged last tiles
def test_kernel_is_exact_attention_over_its_own_tiles_plus_the_tail(tail, rule, n, d):
    q, k, v = on_device(*tiled_qkv(n=n, d=d, seed=n, focus=1.0))
    result = skipping_attention(q, k, v, RULES[rule][0], tail=tail, block_q=64, block_k=64)
    assert result.out.dtype == torch.float32 and result.lse.dtype == torch.float32
    assert result.fate.shape == (1, 2, (n + 63) // 64, (n + 63) // 64)
    assert float(result.density.mean()) < 1.0  # it does skip
    want, want_lse = reference_over_own_tiles(q, k, v, result, tail)
    assert rel(result.out, want) < 2e-5
    assert float((result.lse.double().cpu() - want_lse).abs().max()) < 2e-5


@pytest.mark.parametrize(
    ("dtype", "rule", "tail"),
    [(torch.bfloat16, "blasst", KernelTail.BLOCKS), (torch.float16, "recall", KernelTail.UTA)],
)
def test_low_precision_and_bnhd_views_without_copy(dtype, rule, tail):
    q, k, v = tiled_qkv(n=260, d=64, seed=3, focus=1.0)
    # (B, H, N, D) views of (B, N, H, D) memory
    q, k, v = (x.transpose(1, 2).contiguous().to(DEVICE, dtype).transpose(1, 2) for x in (q, k, v))
    result = skipping_attention(q, k, v, RULES[rule][0], tail=tail, block_q=64, block_k=64)
    assert result.out.dtype == dtype
    want, want_lse = reference_over_own_tiles(q, k, v, result, tail)
    assert rel(result.out, want) < 1.5e-2
    assert float((result.lse.double().cpu() - want_lse).abs().max()) < 1e-3


@pytest.mark.parametrize("rule", ["blasst", "recall"])
@pytest.mark.parametrize("data", ["tiled", "grid"])
def test_decisions_equal_the_reference_loop(rule, data):
    qkv = (
        tiled_qkv(n=300, seed=7) if data == "tiled" else grid_qkv((3, 8, 12), seed=2, sharpness=3.0)
    )
    q, k, v = on_device(*qkv)
    kernel_rule, loop = RULES[rule]
    result = skipping_attention(q, k, v, kernel_rule, block_q=64, block_k=64)
    walked = loop.walk(q, k, v, q.shape[-1] ** -0.5)
    assert torch.equal(result.fate, walked.fate)
    assert bool((result.fate != 2).any())


def test_query_and_key_tiles_of_different_sizes():
    q, k, v = on_device(*tiled_qkv(n=300, d=64, seed=8, focus=1.0))
    rule, loop = RecallRule(recall=0.9), dynamic.Recall(recall=0.9, block_q=128, block_k=64)
    result = skipping_attention(q, k, v, rule, tail=KernelTail.BLOCKS, block_q=128, block_k=64)
    assert torch.equal(result.fate, loop.walk(q, k, v, 64**-0.5).fate)
    want, want_lse = reference_over_own_tiles(q, k, v, result, KernelTail.BLOCKS)
    assert rel(result.out, want) < 2e-5
    assert float((result.lse.double().cpu() - want_lse).abs().max()) < 2e-5
    assert torch.equal(result.layout().to_dense(), result.fate == 2)


@pytest.mark.parametrize("r", [0.9, 0.95, 0.99])
def test_recall_guarantee_for_every_query_row(r):
    q, k, v = on_device(*tiled_qkv(n=300, seed=11))
    result = skipping_attention(q, k, v, RecallRule(recall=r), block_q=64, block_k=64)
    recall = exact_recall(q.cpu(), k.cpu(), result.fate.cpu() == 2, 64, 64, 32**-0.5)
    assert float(recall.min()) >= r
    # the kernel's own bound: sigma <= (1 - r) / r * l, and l / (l + sigma) <= exact recall
    ratio = result.skipped_ratio.double().cpu()
    assert float(ratio.max()) <= (1 - r) / r
    assert bool((1.0 / (1.0 + ratio) <= recall + 1e-6).all())


def test_a_priori_bound_skips_qk_and_keeps_the_guarantee():
    q, k, v = on_device(*tiled_qkv(n=300, d=64, seed=12))
    result = skipping_attention(q, k, v, RecallRule(recall=0.95), block_q=64, block_k=64)
    assert bool((result.fate == 0).any())
    assert bool((result.qk_density < 1.0).any())
    assert bool((result.density <= result.qk_density).all())
    recall = exact_recall(q.cpu(), k.cpu(), result.fate.cpu() == 2, 64, 64, 64**-0.5)
    assert float(recall.min()) >= 0.95


def test_blasst_at_tiny_lam_and_recall_one_are_full_attention():
    q, k, v = on_device(*grid_qkv((2, 8, 10), seed=3))
    full, full_lse = tailattn.full_attention(q, k, v, return_lse=True)
    for rule in (BlasstRule(lam=1e-30), RecallRule(recall=1.0)):
        result = skipping_attention(q, k, v, rule, tail=KernelTail.UTA, block_q=64, block_k=64)
        assert bool((result.fate == 2).all())
        torch.testing.assert_close(result.out, full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.lse, full_lse, rtol=1e-5, atol=1e-5)


def test_key_tile_statistics_match_the_reference():
    k, v = on_device(*tiled_qkv(n=200, seed=9)[1:])
    stats = skipping._key_stats(k, v, RecallRule(), KernelTail.UTA, 64)
    tiles = dynamic.key_tiles(k, 64)
    torch.testing.assert_close(stats["kbar"], tiles.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["rad"], tiles.radius, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["ktot"], k.sum(2), rtol=1e-5, atol=1e-4)


def test_bad_inputs_get_clear_errors():
    q, k, v = on_device(*tiled_qkv(n=100, seed=1))
    for lam in (0.0, 1.0, -1e-3, 2.0):
        with pytest.raises(ValueError, match=r"lam must be in \(0, 1\)"):
            BlasstRule(lam=lam)
    with pytest.raises(TypeError, match="lam"):
        BlasstRule(lam="small")
    for r in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"recall must be in \(0, 1\]"):
            RecallRule(recall=r)
    with pytest.raises(TypeError, match="rule must be"):
        skipping_attention(q, k, v, "blasst")
    with pytest.raises(ValueError, match="do not match"):
        skipping_attention(q, k[:, :1], v, RecallRule())
    with pytest.raises(ValueError, match="one dtype"):
        skipping_attention(q, k.half(), v, RecallRule())
    cases = [
        ((q.double(), k.double(), v.double()), {}, "dtype torch.float64"),
        ((q[..., :24], k[..., :24], v), {}, "head dim 24"),
        ((q, k, v), {"block_q": 32}, "block_q=32"),
        ((q, k, v), {"block_k": 256}, "block_k=256"),
        ((q, k, v), {"tail": "bins"}, "tail 'bins'"),
    ]
    for tensors, kwargs, message in cases:
        kwargs = {"block_q": 64, "block_k": 64} | kwargs
        with pytest.raises(ValueError, match=message):
            skipping_attention(*tensors, RecallRule(), **kwargs)
        tail = kwargs.pop("tail", KernelTail.DROP)
        assert message in unsupported_reason(tensors[0], tensors[2], tail, **kwargs)
    assert unsupported_reason(q, v, KernelTail.BLOCKS, 128, 64) is None


@pytest.mark.skipif(not CUDA, reason="launch configs only change the compiled code on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["blasst", "recall"])
def test_every_launch_config_is_exact_over_its_own_tiles(rule, dtype):
    """Autotuning may pick any config: each must compute the same attention over its tiles and
    keep recall's guarantee (a half-precision BLOCKS tail once came out wrong at num_warps=4
    only; the recall bound and the UTA token use the same tensor-core row-dot)."""
    q, k, v = on_device(*tiled_qkv(n=260, d=64, seed=3, focus=1.0), dtype=dtype)
    for tail in KernelTail:
        for config in skipping.launch_configs():
            result = skipping_attention(
                q, k, v, RULES[rule][0], tail=tail, block_q=64, block_k=64, config=config
            )
            want, want_lse = reference_over_own_tiles(q, k, v, result, tail)
            assert rel(result.out, want) < 5e-3, (tail, config)
            assert float((result.lse.double().cpu() - want_lse).abs().max()) < 1e-2, (tail, config)
            if rule == "recall":
                kept = result.fate.cpu() == 2
                recall = exact_recall(q.cpu(), k.cpu(), kept, 64, 64, 64**-0.5)
                assert float(recall.min()) >= 0.9, (tail, config)
                assert float(result.skipped_ratio.max()) <= (1 - 0.9) / 0.9, (tail, config)


@pytest.mark.skipif(not CUDA, reason="host-device syncs are only observable on CUDA")
def test_no_host_device_sync():
    q, k, v = on_device(*tiled_qkv(n=300, seed=2), dtype=torch.bfloat16)
    config = {"num_warps": 4, "num_stages": 2}
    for rule in (BlasstRule(), RecallRule()):
        call = {"tail": KernelTail.UTA, "block_q": 64, "block_k": 64, "config": config}
        skipping_attention(q, k, v, rule, **call)  # compiles
        torch.cuda.set_sync_debug_mode("error")
        try:
            skipping_attention(q, k, v, rule, **call)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    "spec", ["blasst(lam=0.01)+uta", "recall(recall=0.9)+blocks", "recall+moment"]
)
def test_attention_runs_the_kernel_with_the_same_decisions_as_the_reference(spec):
    q, k, v = on_device(*tiled_qkv(n=300, d=32, tile=64))
    kw = dict(block_q=64, block_k=64, return_info=True)
    ref, ref_info = tailattn.attention(q, k, v, spec, backend="reference", **kw)
    out, info = tailattn.attention(q, k, v, spec, backend="triton", **kw)
    assert torch.equal(info["layout"].to_dense(), ref_info["layout"].to_dense())
    assert info["density"] == pytest.approx(ref_info["density"])
    assert info["qk_density"] == pytest.approx(ref_info["qk_density"])
    assert float((out.cpu() - ref.cpu()).abs().max()) < 1e-4
