"""Capture of q, k, v after norm and RoPE: round trips, selection of layers/steps/branch, files."""

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers_tiny import (
    CASES,
    TinyPipeline,
    hunyuan,
    hunyuan_inputs,
    one_thread,  # noqa: F401
    run,
    wan,
    wan_inputs,
)
from tailattn import capture_file, full_attention
from tailattn.integrations.diffusers import apply, capture
from tailattn.integrations.diffusers.models import kind_of

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = [case.name for case in CASES]


class ListSink:
    """Keeps what a capture session adds, in memory."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int], dict] = {}

    def add(self, layer, step, q, k, v, timestep=None):
        assert (layer, step) not in self.entries
        self.entries[(layer, step)] = {"q": q, "k": k, "v": v, "timestep": timestep}


def stock_attention_outputs(model, inputs):
    """Each layer's attention output before its output projections, from the stock model:
    {layer: {"out": ...} or {"out"/"video": ..., "text": ...}}, (B, N, H * D) each."""
    seen = {}

    def grab(layer, name):
        def hook(module, args):
            seen.setdefault(layer, {})[name] = args[0]

        return hook

    def grab_outputs(layer):
        def hook(module, args, output):
            seen.setdefault(layer, {}).update(video=output[0], text=output[1])

        return hook

    hooks = []
    for layer, attn in enumerate(kind_of(model).attention_modules(model)):
        if getattr(attn, "to_out", None) is not None:
            hooks.append(attn.to_out[0].register_forward_pre_hook(grab(layer, "out")))
        else:  # HunyuanVideo single-stream: the processor returns the attention outputs
            hooks.append(attn.register_forward_hook(grab_outputs(layer)))
        if getattr(attn, "to_add_out", None) is not None:
            hooks.append(attn.to_add_out.register_forward_pre_hook(grab(layer, "text")))
    run(model, inputs)
    for hook in hooks:
        hook.remove()
    return seen


def split_stock(case_name, parts, n_text):
    """(video, text) of one layer's stock attention output in the capture's token order."""
    if "video" in parts:
        return parts["video"], parts["text"]
    out = parts["out"]
    if case_name == "cogvideox":
        return out[:, n_text:], out[:, :n_text]
    if "text" in parts:
        return out, parts["text"]
    return out, out[:, :0]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_captured_qkv_reproduce_the_layer_attention_output(case):
    model = case.make()
    inputs = case.inputs(700.0)
    stock = stock_attention_outputs(model, inputs)
    sink = ListSink()
    with capture(model, sink):
        run(model, inputs)
    assert sorted(sink.entries) == [(layer, 0) for layer in range(case.n_layers)]
    for layer in range(case.n_layers):
        entry = sink.entries[(layer, 0)]
        assert entry["timestep"] == 700.0
        out = full_attention(entry["q"], entry["k"], entry["v"]).transpose(1, 2).flatten(2)
        video, text = split_stock(case.name, stock[layer], 8)
        n_video = video.shape[1]
        # HunyuanVideo pads 6 text tokens and masks the last 2: the capture keeps the valid 4
        n_valid = 4 if case.name == "hunyuanvideo" else text.shape[1]
        assert out.shape[1] == n_video + n_valid
        torch.testing.assert_close(out[:, :n_video], video, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, n_video:], text[:, :n_valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_capture_leaves_the_model_stock(case):
    model = case.make()
    inputs = case.inputs(700.0)
    stock = run(model, inputs)
    before = [attn.processor for attn in kind_of(model).attention_modules(model)]
    with capture(model, ListSink()):
        torch.testing.assert_close(run(model, inputs), stock, rtol=1e-5, atol=1e-5)
    assert [attn.processor for attn in kind_of(model).attention_modules(model)] == before
    assert torch.equal(run(model, inputs), stock)


def test_capture_chosen_layers_steps_and_branch():
    pipe = TinyPipeline(wan(num_layers=3))
    sinks = [ListSink(), ListSink()]
    for branch, sink in enumerate(sinks):
        with capture(pipe, sink, layers=[0, 2], steps=[1, 3], branch=branch):
            pipe(num_inference_steps=4, branches=2)
        assert sorted(sink.entries) == [(0, 1), (0, 3), (2, 1), (2, 3)]
        assert [sink.entries[(0, s)]["timestep"] for s in (1, 3)] == [750.0, 250.0]
    first, second = (sink.entries for sink in sinks)
    # the branches differ only in the text (TinyPipeline doubles it for branch 1), which enters
    # through cross-attention after layer 0's self-attention
    assert torch.equal(first[(0, 1)]["q"], second[(0, 1)]["q"])
    assert not torch.allclose(first[(2, 1)]["q"], second[(2, 1)]["q"])
    assert not pipe.transformer._forward_pre_hooks


def test_capture_under_a_sparse_handle_keeps_the_handle():
    model = wan()
    dense, sparse = ListSink(), ListSink()
    with capture(model, dense):
        run(model, wan_inputs(700.0))
    handle = apply(model, "topk+uta", keep=0.25)
    with capture(handle, sparse):
        run(model, wan_inputs(700.0))
    assert handle.active
    # layer 0 sees the same input; layer 1 sees what the sparse layer 0 produced
    assert torch.equal(sparse.entries[(0, 0)]["q"], dense.entries[(0, 0)]["q"])
    assert not torch.allclose(sparse.entries[(1, 0)]["q"], dense.entries[(1, 0)]["q"])
    handle.remove()


def test_capture_file_round_trip(tmp_path):
    capture_module = capture_file
    model = hunyuan()
    sink = ListSink()
    with capture(model, sink):
        run(model, hunyuan_inputs(700.0))
    path = tmp_path / "hunyuan.safetensors"
    with capture(model, path, model_name="tiny-hunyuan", prompt="a cat"):
        run(model, hunyuan_inputs(700.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hunyuan.safetensors"]
    loaded = capture_module.load_capture(path)
    assert loaded.meta["model"] == "tiny-hunyuan"
    assert loaded.meta["prompt"] == "a cat"
    assert tuple(loaded.meta["grid"]) == (3, 4, 4)
    assert loaded.meta["text_tokens"] == 4
    assert [(e.layer, e.step, e.timestep) for e in loaded.entries] == [(0, 0, 700.0), (1, 0, 700.0)]
    for entry in loaded.entries:
        for name in ("q", "k", "v"):
            assert torch.equal(getattr(entry, name), sink.entries[(entry.layer, 0)][name])


def test_failed_run_writes_no_file(tmp_path):
    model = wan()
    path = tmp_path / "wan.safetensors"
    with pytest.raises(RuntimeError, match="interrupted"), capture(model, path):
        run(model, wan_inputs(700.0))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    assert not model._forward_pre_hooks


# --- bad input -------------------------------------------------------------------------------


def test_capture_target_must_be_a_path_or_a_sink():
    model = wan()
    with pytest.raises(TypeError, match="file path or an object with add"):
        capture(model, 42)
    assert not model._forward_pre_hooks


def test_capture_into_a_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="no directory"):
        capture(wan(), tmp_path / "missing" / "x.safetensors")


def test_capture_layers_must_be_patched():
    handle = apply(wan(num_layers=2), "topk+uta", keep=0.5, layers=[0])
    with pytest.raises(ValueError, match=r"layers \[1\] are not patched"):
        capture(handle, ListSink(), layers=[1])
    handle.remove()


def test_capture_layer_out_of_range():
    with pytest.raises(ValueError, match=r"layers has layer indices \[7\] out of range"):
        capture(wan(num_layers=2), ListSink(), layers=[7])


def test_capture_that_records_nothing(tmp_path):
    model = wan()
    with (
        pytest.raises(ValueError, match=r"nothing was captured.*steps \[5\]"),
        capture(model, tmp_path / "x.safetensors", steps=[5]),
    ):
        run(model, wan_inputs(700.0))
    assert not model._forward_pre_hooks


def test_capture_of_differently_masked_prompts_in_one_batch():
    model = hunyuan()
    with (
        pytest.raises(ValueError, match="capture one prompt at a time"),
        capture(model, ListSink()),
    ):
        run(model, hunyuan_inputs(700.0, text_valid=(4, 6)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": [-1]}, "steps: expected a non-negative integer"),
        ({"steps": 3}, "steps must be a collection of indices"),
        ({"branch": -1}, "branch: expected a non-negative integer"),
    ],
)
def test_capture_bad_steps_and_branch(kwargs, match):
    model = wan()
    with pytest.raises((TypeError, ValueError), match=match):
        capture(model, ListSink(), **kwargs)
    assert not model._forward_pre_hooks
