"""examples/wan_t2v.py: its command line and its PSNR (real-weight runs are for users)."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from typer.testing import CliRunner

from diffusers_tiny import plain

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "wan_t2v.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("wan_t2v", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_psnr_by_hand(example):
    reference = np.zeros((2, 4, 4, 3))
    video = reference.copy()
    video[0, 0, 0, 0] = 0.5  # one value off by 0.5 among 96: MSE = 0.25 / 96
    assert example.psnr(video, reference) == pytest.approx(10 * math.log10(96 / 0.25))
    assert example.psnr(reference, reference) == math.inf


def test_help_lists_the_settings(example):
    result = CliRunner().invoke(example.app, ["--help"])
    assert result.exit_code == 0
    for option in ("--model", "--method", "--keep", "--warmup-steps", "--dense-layers"):
        assert option in result.output


def test_missing_weights_directory(example, tmp_path):
    result = CliRunner().invoke(
        example.app, ["--model", str(tmp_path / "none"), "--prompt", "a cat"]
    )
    assert result.exit_code == 2
    assert "not a directory with Wan weights" in plain(result.output)
