"""The scripts under scripts/: their command lines answer bad input with one line."""

import json
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


def test_toy_gpu_script_names_its_usage():
    script = str(ROOT / "scripts" / "toy_gpu.sh")
    result = subprocess.run(["bash", script], capture_output=True, text=True)
    assert result.returncode != 0 and "usage: toy_gpu.sh train|report" in result.stderr
    result = subprocess.run(["bash", script, "evaluate", "0", "/nonexistent"], capture_output=True)
    assert result.returncode == 2 and b"unknown stage evaluate" in result.stdout


def _study(stats: dict[str, float], recall: float, mse: dict[str, float]) -> dict:
    label = "L3 s0 h1"
    return {
        "anatomy": {"per_head": {label: stats}},
        "rows": [
            {"method": method, "keep": 0.1, "mse": value, "per_head": {label: {"recall": recall}}}
            for method, value in mse.items()
        ],
    }


def test_toy_anatomy_compares_the_toy_with_a_preset(tmp_path):
    pytest.importorskip("matplotlib")
    names = ("top1_mass", "top10_mass", "lower90_logit_std", "local_mass", "frame_mass")
    toy = _study(dict.fromkeys(names, 0.25), 0.5, {"block-topk": 2e-3, "block-topk+uta": 1e-3})
    preset = _study(dict.fromkeys(names, 0.75), 0.6, {"block-topk": 1e-3})
    paths = []
    for name, study in (("toy", toy), ("preset", preset)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(study))
    out = tmp_path / "anatomy"
    args = ["--toy", str(paths[0]), "--preset", f"wan={paths[1]}", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "toy_anatomy.py"), *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    text = (out / "anatomy.md").read_text()
    assert "| top-1 % mass | 0.250 / 0.250 / 0.250 | 0.750 / 0.750 / 0.750 |" in text
    assert "| block-topk kept mass (keep 0.1) | 0.500 / 0.500 / 0.500 | 0.600 / 0.600" in text
    assert "| 3 | 1 | 0.250 |" in text  # the toy per layer and head
    assert "| toy | block-topk+uta | 0.1 | 1.000e-03 | -50.0 % |" in text
    assert (out / "anatomy.png").stat().st_size > 0
