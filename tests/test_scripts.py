"""The scripts under scripts/: their command lines answer bad input with one line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_toy_report_without_cuda_is_a_one_line_error():
    pytest.importorskip("diffusers")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "toy_report.py"), "--device", "cuda"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""},
    )
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr and "Traceback" not in result.stderr
