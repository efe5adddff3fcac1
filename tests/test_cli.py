"""The tailattn command: study, bench and capture registration, and their bad input."""

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from tailattn.capture_file import CaptureWriter
from tailattn.cli import app, split_methods

runner = CliRunner()


@pytest.fixture(scope="module")
def capture_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "c.safetensors"
    gen = torch.Generator().manual_seed(0)
    with CaptureWriter(path, model="m", grid=(2, 4, 8), text_tokens=0) as writer:
        for step in range(2):
            q, k, v = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(3))
            writer.add(0, step, 3 * q, k, v)
    return path


def study(*args):
    return runner.invoke(app, ["study", *args], terminal_width=200)


def test_study_prints_table1_and_writes_the_report(capture_file, tmp_path):
    out, js = tmp_path / "rep", tmp_path / "rows.json"
    result = study(
        "--source",
        str(capture_file),
        "--methods",
        "topk,topk+uta,topp(p=0.9)+uta",
        "--keep",
        "0.1,0.5",
        "--experiments",
        "table1,steps",
        "--out",
        str(out),
        "--json",
        str(js),
    )
    assert result.exit_code == 0, result.output
    assert "keep 0.1" in result.output and "topk+uta" in result.output and "%" in result.output
    assert (out / "report.md").exists() and not (out / "study.json").exists()
    topp_line = next(line for line in result.output.splitlines() if "topp(p=0.9)+uta" in line)
    cells = [cell.strip() for cell in topp_line.split("│")[2:-1]]
    assert len(cells) == 2 and sum(cell != "-" for cell in cells) == 1  # in one column only
    rows = json.loads(js.read_text())["rows"]
    assert {r["method"] for r in rows} >= {"topk", "topk+uta", "topp(p=0.9)+uta"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep", "0.1,1.5"], "keep must be in (0, 1]"),
        (["--keep", "a,b"], "--keep must be a comma-separated list"),
        (["--methods", "topk,nope+uta"], "unknown selection 'nope'"),
        (["--experiments", "table1,figure9"], "unknown experiment(s) 'figure9'"),
        (["--source", "nowhere"], "unknown source 'nowhere'"),
        (["--dtype", "half"], "dtype must be one of"),
    ],
)
def test_study_bad_input(args, message, tmp_path):
    result = study(*args, "--out", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()


def test_study_steps_skip_message(tmp_path):
    result = study(
        "--experiments",
        "steps,anatomy",
        "--heads",
        "3",
        "--queries",
        "64",
        "--out",
        str(tmp_path / "r"),
    )
    assert result.exit_code == 0, result.output
    assert "steps: skipped" in result.output


def test_toy_source_without_the_toy_model(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tailattn.toy", None)
    monkeypatch.setitem(sys.modules, "tailattn.toy.capture", None)
    result = study("--source", "toy", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert "needs the toy model" in " ".join(result.output.split())


def test_split_methods_keeps_parameters_together():
    assert split_methods("topp(p=0.9, x=1)+bins8, topk") == ("topp(p=0.9, x=1)+bins8", "topk")


def test_bench_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = runner.invoke(app, ["bench", "--shape", "1,2,256,64"])
    assert result.exit_code == 2 and "needs a CUDA GPU" in result.output
    result = runner.invoke(app, ["bench", "--shape", "huge"])
    assert result.exit_code == 2 and "shape must be one of" in " ".join(result.output.split())


def test_capture_is_registered():
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for name in ("study", "bench", "capture"):
        assert name in result.output


def test_a_capture_with_nan_values_is_an_error_naming_the_tensor(tmp_path):
    path = tmp_path / "nan.safetensors"
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    k[0, 1, 5, 3] = float("nan")
    with CaptureWriter(path, model="m", grid=(2, 4, 8), text_tokens=0) as writer:
        writer.add(3, 7, q, k, v)
    result = study("--source", str(path), "--experiments", "table1", "--methods", "topk",
                   "--keep", "0.1", "--out", str(tmp_path / "rep"))  # fmt: skip
    assert result.exit_code != 0
    assert "'0.k'" in result.output and "layer 3" in result.output and "NaN" in result.output
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize(
    ("option", "where"), [("--json", "/nonexistent/dir/x.json"), ("--out", "/proc/tailattn/x")]
)
def test_output_paths_are_checked_before_any_work(capture_file, option, where, monkeypatch):
    import tailattn.study as study_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("the study ran although its output cannot be written")

    monkeypatch.setattr(study_module, "run_study", must_not_run)
    result = study("--source", str(capture_file), option, where)
    assert result.exit_code == 2
    assert "cannot write" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tail", "foo"], "unknown block tails"),
        (["--level", "nope"], "--level must be one of"),
        (["--level", "e2e", "--models", "wan-99b"], "unknown models"),
        (["--level", "calls", "--shape", "1,2,256,64"], "--grid T,H,W is needed"),
        (["--json", "/nonexistent/dir/b.json"], "cannot write"),
    ],
)
def test_bench_checks_its_options_before_looking_for_cuda(args, message):
    result = runner.invoke(app, ["bench", *args], terminal_width=200)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
