"""The capture command (registered as ``tailattn capture`` by the project CLI)."""

import pytest

pytest.importorskip("diffusers")

import torch
import typer
from typer.testing import CliRunner

from diffusers_tiny import (
    TinyPipeline,
    one_thread,  # noqa: F401
    plain,
    wan,
)
from tailattn import capture_file
from tailattn.cli import capture as cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def app(monkeypatch):
    """A typer app with the capture command; the pipeline loader returns a tiny Wan pipeline
    (tests never load weights) and records what it was asked for."""
    loaded = []

    def load(model, dtype, device):
        loaded.append((model, dtype, device))
        return TinyPipeline(wan(num_layers=3))

    monkeypatch.setattr(cli, "_load_pipeline", load)
    app = typer.Typer()
    app.command("capture")(cli.capture_command)
    app.command("other")(lambda: None)
    app.loaded = loaded
    return app


def test_parse_indices():
    assert cli.parse_indices("0,5, 10-12,5", "--layers") == [0, 5, 10, 11, 12]
    assert cli.parse_indices("7", "--steps") == [7]


@pytest.mark.parametrize("text", ["", "a", "1-", "3-1", "-1", "1,,2"])
def test_parse_indices_rejects(text):
    with pytest.raises(ValueError, match="--layers"):
        cli.parse_indices(text, "--layers")


def test_capture_command_writes_the_chosen_entries(app, tmp_path):
    capture_module = capture_file
    out = tmp_path / "run.safetensors"
    args = ["capture", "--model", str(tmp_path), "--prompt", "a red ball", "--out", str(out)]
    args += ["--layers", "0,2", "--steps", "1-2", "--num-steps", "3", "--dtype", "float32"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--frames", "2"])
    assert result.exit_code == 0, result.output
    assert "4 entries" in plain(result.output)
    assert "capture: 4 entries of" in plain(result.output)  # the size estimate, said first
    assert app.loaded[0][1:] == (torch.float32, "cpu")
    loaded = capture_module.load_capture(out)
    assert [(e.layer, e.step) for e in loaded.entries] == [(0, 1), (2, 1), (0, 2), (2, 2)]
    assert loaded.meta["prompt"] == "a red ball"
    assert tuple(loaded.meta["grid"]) == (2, 4, 4)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "x"], "--layers must be comma-separated"),
        (["--steps", "4-2"], "--steps has a decreasing range"),
        (["--dtype", "int8"], "--dtype must be one of"),
        (["--num-steps", "0"], "--num-steps must be at least 1"),
        (["--layers", "5"], "out of range"),
    ],
)
def test_capture_command_bad_parameters(app, tmp_path, extra, message):
    args = ["capture", "--model", str(tmp_path), "--prompt", "p", "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 2
    assert message in plain(result.output)


def test_capture_command_model_that_is_neither_directory_nor_hub_id(app, tmp_path):
    args = ["capture", "--model", "./nowhere", "--prompt", "p", "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert not app.loaded
