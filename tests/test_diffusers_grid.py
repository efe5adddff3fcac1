"""Latent grid detection from the transformer input, and grids that cannot be inferred."""

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers_tiny import (
    cogvideox,
    cogvideox_inputs,
    hunyuan,
    hunyuan_inputs,
    one_thread,  # noqa: F401
    run,
    wan,
    wan_inputs,
)
from tailattn.integrations.diffusers import apply
from tailattn.integrations.diffusers import runtime as runtime_module
from tailattn.integrations.diffusers.joint import TokenOrder
from tailattn.integrations.diffusers.runtime import run_method as real_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def seen_grids(monkeypatch):
    grids = []

    def recording(bound, q, k, v, **kwargs):
        grids.append((kwargs["grid"], k.shape[1]))
        return real_run(bound, q, k, v, **kwargs)

    monkeypatch.setattr(runtime_module, "run_method", recording)
    return grids


# (frames, height, width) of the latents -> grid after patching; Wan patches (1, 2, 2) and
# floors odd sizes as its Conv3d does
@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((3, 8, 8), (3, 4, 4)),
        ((1, 4, 6), (1, 2, 3)),
        ((5, 6, 10), (5, 3, 5)),
        ((2, 9, 7), (2, 4, 3)),
    ],
)
def test_wan_grid(size, grid, seen_grids):
    model = wan(num_layers=1)
    with apply(model, "topk+uta", keep=0.5) as handle:
        run(model, wan_inputs(700.0, *size))
    assert handle.calls[0].grid == grid
    assert seen_grids == [(grid, grid[0] * grid[1] * grid[2])]


@pytest.mark.parametrize(("size", "grid"), [((3, 8, 8), (3, 4, 4)), ((2, 4, 10), (2, 2, 5))])
def test_hunyuan_grid_excludes_the_text_tokens(size, grid, seen_grids):
    model = hunyuan()
    with apply(model, "topk+uta", keep=0.5) as handle:
        run(model, hunyuan_inputs(700.0, *size))
    assert [call.grid for call in handle.calls] == [grid, grid]
    # the sparse method sees the video tokens only
    assert all(n == grid[0] * grid[1] * grid[2] for _, n in seen_grids)


@pytest.mark.parametrize(
    ("patch_t", "size", "grid"),
    [(None, (3, 8, 8), (3, 4, 4)), (None, (2, 4, 12), (2, 2, 6)), (2, (4, 8, 6), (2, 4, 3))],
)
def test_cogvideox_grid_from_frames_first_latents(patch_t, size, grid, seen_grids):
    model = cogvideox(patch_size_t=patch_t)
    with apply(model, "topk+uta", keep=0.5) as handle:
        run(model, cogvideox_inputs(700.0, *size, rope_frames=grid[0]))
    assert [call.grid for call in handle.calls] == [grid, grid]
    assert all(n == grid[0] * grid[1] * grid[2] for _, n in seen_grids)


def test_grid_of_a_4d_input_cannot_be_inferred():
    model = wan()
    inputs = wan_inputs(700.0)
    inputs["hidden_states"] = inputs["hidden_states"][:, :, 0]
    with apply(model, "topk+uta", keep=0.5), pytest.raises(ValueError, match="5-D tensor"):
        run(model, inputs)


def test_input_smaller_than_a_patch():
    model = wan()
    with (
        apply(model, "topk+uta", keep=0.5),
        pytest.raises(ValueError, match=r"smaller than the patch \(1, 2, 2\)"),
    ):
        run(model, wan_inputs(700.0, 2, 1, 8))


def test_grid_that_does_not_match_the_tokens_attention_sees():
    model = wan(num_layers=1)
    handle = apply(model, "topk+uta", keep=0.5)
    runtime = handle._runtime
    runtime.begin_forward(0, (2, 2, 2), 500.0)
    q = torch.randn(1, 10, 2, 64)
    with pytest.raises(ValueError, match=r"cannot infer the grid of layer 0.*\(2, 2, 2\)"):
        runtime.route(0, 0, q, q, q, TokenOrder(), None, None)
    handle.remove()
