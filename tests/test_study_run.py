"""Study runs end to end: sources, experiments, report files, atomic writing, bad input."""

import json

import pytest
import torch

from tailattn.capture_file import CaptureWriter
from tailattn.study import StudyConfig, run_study, write_report
from tailattn.study import report as report_module
from tailattn.study.plan import check_keeps, parse_method

GRID = (2, 8, 8)
FAST = (
    "topk",
    "topk+uta",
    "block-topk(block_q=32, block_k=32)+uta",
    "block-topk(block_q=32, block_k=32)",
)


def write_capture(path, steps=3, heads=1, layers=(0,)):
    writer = CaptureWriter(path, model="test-dit", grid=GRID, text_tokens=0, prompt="a test")
    gen = torch.Generator().manual_seed(0)
    n = GRID[0] * GRID[1] * GRID[2]
    for step in range(steps):
        for layer in layers:
            q, k, v = (torch.randn(1, heads, n, 16, generator=gen) for _ in range(3))
            writer.add(layer, step, 3 * q, k, v, timestep=1000.0 - 100 * step)
    writer.close()
    return path


@pytest.fixture(scope="module")
def capture_file(tmp_path_factory):
    return write_capture(tmp_path_factory.mktemp("cap") / "run.safetensors", heads=2)


@pytest.fixture(scope="module")
def result(capture_file):
    config = StudyConfig(
        source=str(capture_file), methods=FAST, keeps=(0.1, 0.25, 0.5), bins=(1, 2, 4)
    )
    return run_study(config)


def test_capture_source_runs_every_experiment(result):
    assert result.selected.run == (
        "table1",
        "recall",
        "bins",
        "ablation",
        "distributions",
        "outputs",
        "anatomy",
        "steps",
    )
    assert len(result.units) == 3 * 2 and not result.sampled
    assert {u.step for u in result.units} == {0, 1, 2}


def test_report_files_and_json_rows(result, tmp_path):
    out = tmp_path / "study"
    path = write_report(result, out)
    text = path.read_text()
    for title in ("Table 1", "Recall", "Bins", "Ablation", "Anatomy", "per diffusion step"):
        assert title in text
    pngs = {p.name for p in out.glob("*.png")}
    assert {"mse_vs_keep.png", "recall.png", "bins.png", "anatomy.png", "steps.png"} <= pngs
    for png in pngs:
        assert f"]({png})" in text
    data = json.loads((out / "study.json").read_text())
    row = next(r for r in data["rows"] if r["method"] == "topk+uta" and r["keep"] == 0.1)
    assert {"method", "keep", "density", "mse", "rel_l2", "recall", "per_head"} <= set(row)
    assert len(row["per_head"]) == len(result.units)
    assert [s["step"] for s in data["steps"]] == [0, 1, 2]
    assert data["sampled"] is False
    # topk+uta never does worse than topk on average here, and the tail restores recall
    base = next(r for r in data["rows"] if r["method"] == "topk" and r["keep"] == 0.1)
    assert row["mse"] < base["mse"] and row["recall_implied"] > base["recall_implied"]
    assert row["recall"] == pytest.approx(base["recall"])


def test_interrupted_report_leaves_the_old_one(result, tmp_path, monkeypatch):
    out = tmp_path / "study"
    out.mkdir()
    (out / "report.md").write_text("old report")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module.figures, "mse_vs_keep", boom)
    json_path = tmp_path / "extra.json"
    with pytest.raises(KeyboardInterrupt):
        write_report(result, out, json_path)
    assert (out / "report.md").read_text() == "old report"
    assert not json_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]
    assert [p.name for p in out.iterdir()] == ["report.md"]


def test_sampled_rows_are_reported(capture_file, tmp_path):
    config = StudyConfig(
        source=str(capture_file),
        methods=("topk+uta",),
        keeps=(0.2,),
        queries=16,
        experiments=("table1",),
        heads=(1,),
    )
    result = run_study(config)
    assert result.sampled and result.rows_per_unit == 16
    assert [u.label for u in result.units] == ["L0 s0 h1", "L0 s1 h1", "L0 s2 h1"]
    markdown = report_module.render(result, report_module.build_json(result), tmp_path)
    assert "16 of 128 query rows per head, sampled uniformly" in markdown


def test_steps_is_skipped_on_a_single_step_source(tmp_path):
    path = write_capture(tmp_path / "one.safetensors", steps=1)
    config = StudyConfig(
        source=str(path), methods=("topk",), keeps=(0.5,), experiments=("table1", "steps")
    )
    result = run_study(config)
    assert result.selected.run == ("table1",)
    assert "has 1 diffusion step(s)" in result.selected.skipped["steps"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keeps": (0.0, 0.5)}, r"keep must be in \(0, 1\]"),
        ({"keeps": (1.5,)}, r"keep must be in \(0, 1\]"),
        ({"experiments": ("table1", "tabel2")}, "unknown experiment"),
        ({"queries": 0}, "queries must be a positive"),
        ({"dtype": "int8"}, "dtype must be one of"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig(**kwargs)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("topq+uta", "unknown selection 'topq'"),
        ("topk+tail", "unknown tail"),
        ("full", "dense attention"),
        ("svg2+bins4", "works with token selections only"),
        ("topk+", "cannot parse"),
    ],
)
def test_bad_methods(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_method(spec)


def test_bad_sources(tmp_path, capture_file):
    with pytest.raises(ValueError, match="unknown source 'nowhere.safetensors'"):
        run_study(StudyConfig(source="nowhere.safetensors"))
    with pytest.raises(ValueError, match="unknown synthetic preset 'tiny'"):
        run_study(StudyConfig(source="synthetic:tiny"))
    with pytest.raises(ValueError, match=r"heads \[9\] do not exist"):
        run_study(StudyConfig(source=str(capture_file), heads=(9,)))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(capture_file.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        run_study(StudyConfig(source=str(broken)))
    assert check_keeps((0.5, 0.1, 0.5)) == (0.1, 0.5)
