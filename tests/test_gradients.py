"""Backward through sparse attention: finite, and equal to numerical derivatives (float64).

A selection is piecewise constant in q and k, so away from its decision boundaries the method is
a smooth function of q, k, v and ``torch.autograd.gradcheck`` compares autograd with finite
differences. The cases include query blocks that drop nothing (an empty tail token), which once
gave NaN gradients.
"""

import pytest
import torch

import tailattn

CASES = [
    ("block-topk(block_q=16, block_k=16)+uta", {"keep": 1.0}),  # nothing dropped
    ("block-topk(block_q=16, block_k=16)+uta", {"keep": 0.5}),
    ("block-topk(block_q=16, block_k=16)+moment", {"keep": 1.0}),
    ("block-topk(block_q=16, block_k=16)+blocks", {"keep": 0.5}),
    ("radial(block_q=16, block_k=16)+uta", {"keep": 0.3, "grid": (4, 4, 4)}),
    ("blasst(block_q=16, block_k=16)+uta", {}),
    ("recall(block_q=16, block_k=16)+uta", {}),
    ("topk+uta", {"keep": 0.25}),
    ("topk+uta", {"keep": 1.0}),
]


def inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(1, 1, 64, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )


@pytest.mark.parametrize(("spec", "kw"), CASES)
def test_gradients_are_finite_and_match_finite_differences(spec, kw):
    q, k, v = inputs()
    out = tailattn.attention(q, k, v, spec, **kw)
    out.sum().backward()
    assert all(bool(torch.isfinite(x.grad).all()) for x in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: tailattn.attention(q, k, v, spec, **kw),
        (q, k, v),
        eps=1e-6,
        atol=1e-6,
        fast_mode=True,
    )


def test_nothing_dropped_has_the_gradient_of_dense_attention():
    q, k, v = inputs(1)
    tailattn.attention(q, k, v, "block-topk(block_q=16, block_k=16)+uta", keep=1.0).sum().backward()
    sparse = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    tailattn.full_attention(q, k, v).sum().backward()
    for got, want in zip(sparse, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", ["block-topk(block_q=16, block_k=16)+uta", "rectified"])
def test_the_forward_only_kernels_refuse_inputs_that_need_gradients(spec):
    q, k, v = inputs()
    kw = {"keep": 0.5} if spec.startswith("block") else {"grid": (4, 4, 4)}
    with pytest.raises(ValueError, match="need gradients and the kernels are forward-only"):
        tailattn.attention(q, k, v, spec, backend="triton", **kw)
    with torch.no_grad():  # no gradients wanted: the kernel may run (interpreter, or CUDA)
        tailattn.attention(q.float(), k.float(), v.float(), spec, **kw)
