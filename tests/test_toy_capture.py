"""Capture from the toy model: the captured q, k, v reproduce its attention outputs."""

import pytest

pytest.importorskip("diffusers")

import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from diffusers_tiny import one_thread, plain  # noqa: F401
from tailattn import capture_file
from tailattn.cli import capture as capture_cli
from tailattn.integrations.diffusers import capture
from tailattn.toy.capture import default_steps, write_toy_capture
from tailattn.toy.pipeline import load_pipeline
from toy_tiny import tiny_weights  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = {"num_frames": 2, "height": 8, "width": 8}


class ListSink:
    def __init__(self):
        self.entries = {}

    def add(self, layer, step, q, k, v, timestep=None):
        self.entries[(layer, step)] = (q.clone(), k.clone(), v.clone())


def _attention_outputs(pipe):
    """Self-attention outputs (B, N, H * D) per (layer, call index), read where Wan's
    processor hands them to the output projection."""
    outputs, hooks = {}, []
    for layer, block in enumerate(pipe.transformer.blocks):

        def hook(module, args, layer=layer):
            calls = sum(1 for key in outputs if key[0] == layer)
            outputs[(layer, calls)] = args[0].detach().clone()

        hooks.append(block.attn1.to_out[0].register_forward_pre_hook(hook))
    return outputs, hooks


def test_captured_qkv_reproduce_the_attention_outputs():
    pipe = load_pipeline()
    sink = ListSink()
    outputs, hooks = _attention_outputs(pipe)
    try:
        with capture(pipe, sink, steps=[0, 2]):
            pipe("disc", num_inference_steps=3, generator=torch.Generator().manual_seed(0), **SIZE)
    finally:
        for hook in hooks:
            hook.remove()
    layers = len(pipe.transformer.blocks)
    assert sorted(sink.entries) == sorted((layer, s) for layer in range(layers) for s in (0, 2))
    for (layer, step), (q, k, v) in sink.entries.items():
        wan = pipe.transformer.config
        assert q.shape == (1, wan.num_attention_heads, 2 * 4 * 4, wan.attention_head_dim)
        exact = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        torch.testing.assert_close(exact, outputs[(layer, step)], rtol=1e-5, atol=1e-5)


def test_write_toy_capture_file(tmp_path, tiny_weights):  # noqa: F811
    """A 3-step capture of the tiny toy model at its training clip (4 x 16 x 16 pixels: a
    4 x 8 x 8 grid): each entry's exact attention is the attention output of that step in a
    second, identical run."""
    capture_format = capture_file
    path = write_toy_capture(
        tmp_path / "toy.safetensors", seed=1, steps=3, layers=[0], weights=tiny_weights
    )
    loaded = capture_format.load_capture(path)
    assert [(e.layer, e.step) for e in loaded.entries] == [(0, s) for s in default_steps(3)]
    assert tuple(loaded.meta["grid"]) == (4, 8, 8)
    assert loaded.meta["model"] == "toy"
    pipe = load_pipeline(weights=tiny_weights)
    outputs, hooks = _attention_outputs(pipe)
    try:
        pipe("disc", num_inference_steps=3, generator=torch.Generator().manual_seed(1))
    finally:
        for hook in hooks:
            hook.remove()
    for entry in loaded.entries:
        exact = F.scaled_dot_product_attention(entry.q, entry.k, entry.v)
        torch.testing.assert_close(
            exact.transpose(1, 2).flatten(2), outputs[(0, entry.step)], rtol=1e-5, atol=1e-5
        )


def test_capture_command_with_the_toy_model(tmp_path):
    capture_format = capture_file
    app = typer.Typer()
    app.command("capture")(capture_cli.capture_command)
    app.command("other")(lambda: None)
    out = tmp_path / "toy.safetensors"
    args = ["capture", "--model", "toy", "--prompt", "a triangle", "--out", str(out)]
    args += ["--layers", "0", "--steps", "1", "--num-steps", "2", "--dtype", "float32"]
    args += ["--device", "cpu", "--frames", "2", "--height", "8", "--width", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 entries" in plain(result.output)
    assert [(e.layer, e.step) for e in capture_format.load_capture(out).entries] == [(0, 1)]


def test_a_toy_prompt_that_names_no_shape_is_a_one_line_error(tmp_path):
    app = typer.Typer()
    app.command("capture")(capture_cli.capture_command)
    app.command("other")(lambda: None)
    args = ["capture", "--model", "toy", "--prompt", "dog", "--out", str(tmp_path / "x.st")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--prompt" in plain(result.output) and "Traceback" not in result.output
    assert not (tmp_path / "x.st").exists()


def test_toy_capture_module_command(tmp_path, tiny_weights):  # noqa: F811
    from tailattn.toy.capture import capture_command

    app = typer.Typer()
    app.command("capture")(capture_command)
    app.command("other")(lambda: None)
    out = tmp_path / "toy.safetensors"
    args = ["capture", "--out", str(out), "--weights", str(tiny_weights), "--steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    entries = capture_file.load_capture(out).entries
    assert sorted((e.layer, e.step) for e in entries) == [(0, 0), (0, 1), (1, 0), (1, 1)]
