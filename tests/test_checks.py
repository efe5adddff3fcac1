"""Bad input: a clear ValueError/TypeError naming the argument, never a silent NaN."""

import pytest
import torch

import tailattn


@pytest.fixture
def qkv():
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, 32, 16, generator=gen) for _ in range(3))


def call(q, k, v, method="topk+uta", **kw):
    kw.setdefault("keep", 0.5)
    return tailattn.attention(q, k, v, method, **kw)


def test_wrong_rank(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, H, N, D\)"):
        call(q[0], k, v)
    with pytest.raises(ValueError, match=r"k must be 4-D \(B, N, H, D\)"):
        call(q, k[0], v, layout="bnhd")


def test_not_a_tensor(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        call(q, k, v.numpy())


def test_integer_dtype(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        call(q.long(), k, v)


def test_mismatched_dtype(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="k has dtype torch.float64 but q has torch.float32"):
        call(q, k.double(), v)


def test_mismatched_device(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="v is on meta but q is on cpu"):
        call(q, k, v.to("meta"))


def test_mismatched_batch_heads(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"k has \(batch, heads\) = \(1, 1\)"):
        call(q, k[:, :1], v)


def test_mismatched_head_dim(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="k has head dim 8 but q has 16"):
        call(q, k[..., :8], v)


def test_mismatched_kv_length(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="v has 31 tokens but k has 32"):
        call(q, k, v[:, :, :31])


def test_empty_input(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="q must not be empty"):
        call(q[:, :, :0], k, v)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_non_finite(qkv, bad, which):
    tensors = [x.clone() for x in qkv]
    tensors[which][0, 1, 3, 2] = bad
    name = "qkv"[which]
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        call(*tensors)
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        tailattn.full_attention(*tensors)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.0001, 2])
def test_keep_out_of_range(qkv, keep):
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        call(*qkv, keep=keep)


def test_keep_wrong_type(qkv):
    with pytest.raises(TypeError, match="keep must be a number"):
        call(*qkv, keep="0.1")


def test_keep_missing_for_budgeted_selection(qkv):
    with pytest.raises(ValueError, match="selection 'topk'.*keep"):
        tailattn.attention(*qkv, "topk+uta")


def test_keep_given_to_unbudgeted_selection(qkv):
    with pytest.raises(ValueError, match="takes no parameter 'keep'"):
        call(*qkv, method="topp+uta")


def test_unknown_method(qkv):
    with pytest.raises(ValueError, match="unknown selection 'topq'.*known: .*topk"):
        call(*qkv, method="topq+uta")


def test_unknown_tail(qkv):
    with pytest.raises(ValueError, match="unknown tail 'utah'.*takes: .*uta"):
        call(*qkv, method="topk+utah")


def test_unparseable_spec(qkv):
    for spec in ("topk++uta", "topk+uta+bins4", "topk(keep)", "Topk", ""):
        with pytest.raises(ValueError, match="method spec"):
            call(*qkv, method=spec)


@pytest.mark.parametrize("spec", ["topk+bins0", "topk+bins(n=-2)", "topk+bins65"])
def test_bins_out_of_range(qkv, spec):
    with pytest.raises(ValueError, match="bins n must be"):
        call(*qkv, method=spec)


def test_bins_bad_mode(qkv):
    with pytest.raises(ValueError, match="bins mode must be 'count' or 'width'"):
        call(*qkv, method="topk+bins(n=4, mode=quantile)")


def test_bad_tail_parameters(qkv):
    with pytest.raises(ValueError, match="lowdelta delta must be >= 0"):
        call(*qkv, method="topk+lowdelta(delta=-1)")
    with pytest.raises(ValueError, match="tail 'uta' does not take 'n'"):
        call(*qkv, method="topk+uta(n=3)")


def test_bad_selection_parameters(qkv):
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        tailattn.attention(*qkv, "topp(p=1.5)")
    with pytest.raises(ValueError, match=r"lam must be in \(0, 1\]"):
        tailattn.attention(*qkv, "threshold(lam=3)")
    with pytest.raises(ValueError, match="lam must be positive"):
        tailattn.attention(*qkv, "threshold", lam=0)


def test_conflicting_parameter(qkv):
    with pytest.raises(ValueError, match="p=0.5 conflicts with p=0.9"):
        tailattn.attention(*qkv, "topp(p=0.9)", p=0.5)


def test_grid_mismatch(qkv):
    with pytest.raises(
        ValueError, match=r"grid \(2, 4, 5\) holds 40 tokens but the sequence has 32"
    ):
        call(*qkv, grid=(2, 4, 5))
    with pytest.raises(ValueError, match="grid must be three positive integers"):
        call(*qkv, grid=(2, 16))
    call(*qkv, grid=(2, 4, 4))


def test_bad_layout_and_scale(qkv):
    with pytest.raises(ValueError, match="layout must be one of"):
        call(*qkv, layout="nhd")
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        call(*qkv, scale=-1.0)
    with pytest.raises(TypeError, match="method must be a spec string"):
        call(*qkv, method=3)


def test_meta_tensors_are_refused_with_a_clear_error():
    q = torch.empty(1, 1, 64, 16, device="meta")
    with pytest.raises(ValueError, match="q is on the meta device"):
        tailattn.attention(q, q, q, "topk+uta", keep=0.5)


def test_a_bound_method_compiles_as_one_graph():
    # the NaN/Inf check is skipped under torch.compile; spec parsing is not traceable, so the
    # method is bound first (docs/methods.md, bad input)
    q = torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(0))
    bound = tailattn.registry.bind("block-topk(block_q=16, block_k=16)+uta", keep=0.5)
    compiled = torch.compile(lambda q, k, v: tailattn.attention(q, k, v, bound), fullgraph=True)
    torch.testing.assert_close(compiled(q, q, q), tailattn.attention(q, q, q, bound))
