"""Method specs and the registry."""

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tailattn
from tailattn.methods import Method, Registry
from tailattn.tails import BlockUTA


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("topk", "topk"),
        ("topk+drop", "topk"),
        ("topk+uta", "topk+uta"),
        ("topk+bins8", "topk+bins(n=8)"),
        ("topk + bins(n=8, mode=width)", "topk+bins(mode=width, n=8)"),
        ("topp(p=0.9)+uta-norm", "topp(p=0.9)+uta-norm"),
        ("threshold(lam=1e-3)+lowdelta(delta=0.25)", "threshold(lam=0.001)+lowdelta(delta=0.25)"),
    ],
)
def test_parse_and_canonical_form(spec, canonical):
    m = Method.parse(spec)
    assert m.spec == canonical
    assert Method.parse(m.spec) == m


def test_selection_names_keep_their_digits():
    m = Method.parse("svg2(keep=0.1)+uta")
    assert m.selection == "svg2"
    assert dict(m.selection_params) == {"keep": 0.1}


def test_digit_shorthand_conflicts_with_explicit_n():
    with pytest.raises(ValueError, match="given twice"):
        Method.parse("topk+bins8(n=4)")


def test_bind_routes_keyword_parameters():
    bound = tailattn.registry.bind("topp+bins", p=0.8, n=4)
    assert bound.selection.p == 0.8
    assert bound.tail.n == 4
    assert bound.granularity == "token"


def test_keep_in_spec_or_keyword_is_the_same(skewed):
    q, k, v = skewed(n=64)
    a = tailattn.attention(q, k, v, "topk(keep=0.25)+uta")
    b = tailattn.attention(q, k, v, "topk+uta", keep=0.25)
    assert torch.equal(a, b)


def test_registry_is_extensible_without_touching_the_core(skewed):
    registry = Registry()

    @registry.selection("first-half", granularity="token")
    @dataclass(frozen=True)
    class FirstHalf:
        def __call__(self, z):
            kept = torch.zeros_like(z, dtype=torch.bool)
            kept[..., : z.shape[-1] // 2] = True
            return kept

    for name, entry in tailattn.registry.tails("token").items():
        registry.tail(name, granularity="token")(entry.factory)
    with pytest.raises(ValueError, match="no runner is registered for token selections"):
        registry.bind("first-half+uta")
    registry.runner("token")(tailattn.execute.run_token)
    bound = registry.bind("first-half+uta")
    assert isinstance(bound.selection, FirstHalf)
    # the bound method runs itself: the first half of the keys exactly, the rest as one token
    q, k, v = skewed(n=64)
    out = bound(q, k, v, scale=q.shape[-1] ** -0.5).out
    z = q @ k.mT * q.shape[-1] ** -0.5
    half = z.shape[-1] // 2
    tail = z[..., half:].mean(-1, keepdim=True) + math.log(z.shape[-1] - half)
    weights = torch.softmax(torch.cat([z[..., :half], tail], dim=-1), dim=-1)
    values = torch.cat([v[..., :half, :], v[..., half:, :].mean(-2, keepdim=True)], dim=-2)
    expected = torch.einsum("bhqk,bhkd->bhqd", weights[..., :half], values[..., :half, :])
    expected = expected + weights[..., half:] * values[..., None, half, :]
    assert torch.allclose(out, expected, atol=1e-12)
    with pytest.raises(ValueError, match="registered twice"):
        registry.selection("first-half", granularity="token")(
            dataclass(frozen=True)(type("Other", (), {}))
        )


def test_registered_names():
    assert {"full", "topk", "topp", "threshold"} <= set(tailattn.registry.selections())
    assert set(tailattn.registry.tails("token")) == {
        "drop",
        "uta",
        "uta-norm",
        "bins",
        "lowdelta",
        "moment",
    }


def test_a_bound_method_runs_as_it_is_and_refuses_new_parameters(skewed):
    q, k, v = skewed(n=64)
    bound = tailattn.registry.bind("topk+uta", keep=0.25)
    torch.testing.assert_close(
        tailattn.attention(q, k, v, bound), tailattn.attention(q, k, v, "topk+uta", keep=0.25)
    )
    assert bound.with_keep(0.5).selection.keep == 0.5 and bound.selection.keep == 0.25
    for kwargs in ({"keep": 0.5}, {"p": 0.9}):
        with pytest.raises(ValueError, match="method is already bound"):
            tailattn.attention(q, k, v, bound, **kwargs)
    with pytest.raises(ValueError, match="takes no keep ratio"):
        tailattn.registry.bind("topp+uta").with_keep(0.5)


def test_a_block_tail_without_a_kernel_form_runs_on_the_reference(skewed):
    @dataclass(frozen=True)
    class Halved(BlockUTA):
        """The uta token at half its mass; no kernel form declared."""

        kernel: ClassVar = None

        def tokens(self, summary, q_blocks, rows, kept, scale):
            chunk = super().tokens(summary, q_blocks, rows, kept, scale)
            return dataclasses.replace(chunk, logits=chunk.logits - math.log(2.0))

    registry = Registry()
    registry.selection("block-topk", granularity="block")(tailattn.select.BlockTopK)
    registry.tail("halved", granularity="block")(Halved)
    registry.runner("block")(tailattn.execute.run_block)
    bound = registry.bind("block-topk(block_q=16, block_k=16)+halved", keep=0.5)
    q, k, v = (x.float() for x in skewed(n=64))
    with pytest.raises(ValueError, match="has no kernel form"):
        bound(q, k, v, scale=0.25, backend="triton")
    out = bound(q, k, v, scale=0.25).out  # the reference path
    uta = tailattn.attention(
        q, k, v, "block-topk(block_q=16, block_k=16)+uta", keep=0.5, scale=0.25
    )
    assert 0 < float((out - uta).abs().max()) < 1


def test_a_class_that_lacks_its_protocol_is_refused_at_registration():
    registry = Registry()

    @dataclass(frozen=True)
    class NoLayout:
        keep: float = 0.1

    with pytest.raises(TypeError, match=r"lacks __call__, block_q, block_k \(BlockSelection"):
        registry.selection("no-layout", granularity="block")(NoLayout)
    with pytest.raises(TypeError, match=r"lacks attend \(FusedSelection"):
        registry.selection("no-attend", granularity="fused")(NoLayout)

    @dataclass(frozen=True)
    class NoTokens:
        pass

    with pytest.raises(TypeError, match="lacks prepare, tokens, epilogue, kernel"):
        registry.tail("no-tokens", granularity="block")(NoTokens)
