"""The scripts under scripts/: their command lines answer bad input with one line; the toy
report's plan; the error-aware diagnostics against the library (float64)."""

import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import tailattn
from tailattn.cli.common import split_methods
from tailattn.data.synthetic import SyntheticSource
from tailattn.select import BlockErr
from tailattn.select.blocks import block_budget, pool_blocks
from tailattn.select.error_aware import key_imbalance, probe_stats_torch, sketch_matrix
from tailattn.toy import data
from toy_tiny import tiny_weights  # noqa: F401

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


def test_toy_report_refuses_bad_selections_and_probe_rows_before_any_work():
    pytest.importorskip("diffusers")
    for bad, message in (
        (["--selections", "block-topk+uta"], "--selections takes selections"),
        (["--selections", "block-topk(keep=0.1"], "cannot parse"),
        (["--probe-rows", "0"], "--probe-rows must be at least 1"),
    ):
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "toy_report.py"), "--device", "cpu", *bad],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""},
        )
        assert result.returncode == 2 and message in result.stderr, (bad, result.stderr)
        assert "Traceback" not in result.stderr


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


def script(name: str):
    """scripts/NAME.py imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_report_takes_selections_with_parameters():
    pytest.importorskip("diffusers")
    report = script("toy_report")
    selections = list(split_methods("block-topk, block-err(for_tail=drop, budget=adaptive)"))
    assert report.runs(selections, [0.1], ["drop", "uta"]) == [
        ("block-topk+drop", 0.1),
        ("block-err(for_tail=drop, budget=adaptive)+drop", 0.1),
        ("block-topk+uta", 0.1),
        ("block-err(for_tail=drop, budget=adaptive)+uta", 0.1),
    ]


def test_toy_sampler_sweep_scores_every_setting(tiny_weights, tmp_path):  # noqa: F811
    """Two models x two step counts x two shifts: one row each, accuracies in [0, 1] that are
    multiples of 1 / clips, the same for the same model and settings."""
    pytest.importorskip("diffusers")
    sweep = script("toy_sampler_sweep")
    copy = shutil.copytree(tiny_weights, tmp_path / "copy")
    argv = ["--weights", str(tiny_weights), str(copy), "--steps", "1,2", "--shifts",
            "1,3", "--clips", "4", "--classifier-steps", "2", "--device", "cpu",
            "--json", str(tmp_path / "sweep.json")]  # fmt: skip
    result = sweep.main(argv)
    rows = result["rows"]
    assert len(rows) == 8 and json.loads((tmp_path / "sweep.json").read_text())["rows"] == rows
    assert {(r["steps"], r["shift"]) for r in rows} == {(1, 1.0), (1, 3.0), (2, 1.0), (2, 3.0)}
    assert all(r["accuracy"] * 4 == round(r["accuracy"] * 4) and 0 <= r["accuracy"] <= 1
               for r in rows)  # fmt: skip
    assert [r["accuracy"] for r in rows[:4]] == [r["accuracy"] for r in rows[4:]]
    for row in rows:  # each sample's outcome, summarised per shape
        assert len(row["recognised"]) == 4 and set(row["recognised"]) <= {0, 1}
        assert row["accuracy"] == sum(row["recognised"]) / 4
        assert row["per_shape"] == {shape: float(row["recognised"][i])
                                    for i, shape in enumerate(data.SHAPES)}  # fmt: skip
    assert "vs_first" not in rows[0]
    for row in rows[1:]:  # paired with the first row: the discordant samples and McNemar's p
        first, mine = rows[0]["recognised"], row["recognised"]
        paired = row["vs_first"]
        assert paired["only_first"] == sum(a > b for a, b in zip(first, mine, strict=True))
        assert paired["only_this"] == sum(b > a for a, b in zip(first, mine, strict=True))
        assert 0 < paired["p"] <= 1
    assert rows[4]["vs_first"] == {"only_first": 0, "only_this": 0, "p": 1.0}  # the same model


def test_toy_sampler_sweep_scores_a_row_against_the_first():
    score = script("toy_sampler_sweep").score
    labels = [2, 0, 2, 1, 0, 0]  # no cross: its accuracy is None
    row = score([1, 0, 0, 1, 1, 0], labels, first=[1, 1, 0, 0, 0, 0])
    assert row["accuracy"] == 0.5
    assert row["per_shape"] == dict(zip(data.SHAPES, [1 / 3, 1.0, 0.5, None], strict=True))
    assert row["vs_first"] == {"only_first": 1, "only_this": 2, "p": 1.0}
    row = score([0, 0, 0, 0, 0, 1], labels, first=[1, 1, 1, 1, 1, 0])
    assert row["vs_first"] == {"only_first": 5, "only_this": 1, "p": 2 * (1 + 6) / 64}
    assert "vs_first" not in score([1, 0, 1, 1, 0, 0], labels, first=None)


def test_toy_sampler_sweep_pairs_every_row_with_the_first(tiny_weights, monkeypatch):  # noqa: F811
    """With the sampling replaced by fixed outcomes per setting, each row's paired counts are
    against the first row (not the one before it) and each row keeps its own outcomes."""
    pytest.importorskip("diffusers")
    sweep = script("toy_sampler_sweep")
    outcomes = {1: [1, 1, 1, 0], 2: [0, 1, 1, 1], 3: [0, 0, 1, 1]}  # by steps
    monkeypatch.setattr(sweep, "recognised", lambda *args: outcomes[args[4]])
    argv = ["--weights", str(tiny_weights), "--steps", "1,2,3", "--clips", "4",
            "--classifier-steps", "1", "--device", "cpu"]  # fmt: skip
    rows = sweep.main(argv)["rows"]
    assert [row["recognised"] for row in rows] == [outcomes[1], outcomes[2], outcomes[3]]
    assert rows[1]["vs_first"] == {"only_first": 1, "only_this": 1, "p": 1.0}
    assert rows[2]["vs_first"] == {"only_first": 2, "only_this": 1, "p": 1.0}
    assert rows[2]["per_shape"] == dict(zip(data.SHAPES, [0.0, 0.0, 1.0, 1.0], strict=True))


def test_toy_sampler_sweep_refuses_bad_grids(tiny_weights):  # noqa: F811
    pytest.importorskip("diffusers")
    once = ["--weights", str(tiny_weights)]
    for bad in (
        [*once, "--steps", "0"],
        [*once, "--shifts", "a,b"],
        [*once, "--shifts", "nan"],
        [*once, "--clips", "0"],
        [*once, str(tiny_weights)],  # the same directory twice
    ):
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "toy_sampler_sweep.py"), "--device", "cpu",
             "--classifier-steps", "1", "--clips", "1", *bad],
            capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""},
        )  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr, bad


@pytest.fixture(scope="module")
def diagnostics():
    return script("error_aware_diagnostics")


@pytest.mark.parametrize("tail", ["drop", "uta"])
def test_diagnostics_exact_errors_are_the_librarys(diagnostics, tail):
    """The closed-form MSE of a kept set per query block equals tailattn.attention's (float64)."""
    q, k, v = (x.double() for x in SyntheticSource("small").head(1))
    out, info = tailattn.attention(
        q, k, v, f"block-topk+{tail}", keep=0.2, backend="reference", return_info=True
    )
    full = tailattn.full_attention(q, k, v)
    mask = info["layout"].to_dense()[0, 0]
    for m in (0, 7, mask.shape[0] - 1):
        rows = slice(m * 128, (m + 1) * 128)
        block = diagnostics.QueryBlock(q[0, 0, rows], k[0, 0], v[0, 0], q.shape[-1] ** -0.5)
        expected = ((out[0, 0, rows] - full[0, 0, rows]) ** 2).mean()
        assert float(block.mse(mask[m], tail)) == pytest.approx(float(expected), rel=1e-9)


def test_value_aware_greedy_is_block_errs_when_values_are_rotated_keys(diagnostics):
    """With v = k Q (Q orthogonal) and no sketch, the probe's mean values have the key
    imbalances' norms and inner products: the same greedy picks as block-err(for_tail=drop)."""
    q, k, _ = (x[0, 0].double() for x in SyntheticSource("small").head(2))
    rot = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0]
    v = k @ rot.double()
    sel = BlockErr(0.2, for_tail="drop", sketch=64)
    kept = sel(q[None, None], k[None, None], scale=0.125).to_dense()[0, 0]
    qhat = pool_blocks(q[None, None], 128)[0, 0]
    steps = block_budget(0.2, kept.shape[1])
    for m in (0, 5, 11):
        found = diagnostics.value_aware_greedy(qhat[m], k, v, 0.125, steps, 0.25)
        assert torch.equal(found, kept[m])


def test_candidate_greedy_over_every_block_is_block_errs(diagnostics):
    """With every key block a candidate the restricted greedy is block-err(for_tail=drop)'s; with
    fewer it keeps only candidates, as many as the budget."""
    q, k, _ = (x[0, 0].double() for x in SyntheticSource("small").head(4))
    kept = BlockErr(0.2, for_tail="drop")(q[None, None], k[None, None], scale=0.125)
    kept = kept.to_dense()[0, 0]
    qhat = pool_blocks(q[None, None], 128)
    sketch = sketch_matrix(64, 32, torch.float64, torch.device("cpu"))
    probe = probe_stats_torch(qhat, k[None, None], 0.125, 128, sketch)
    p, d = (x[0, 0] for x in key_imbalance(probe))
    steps = block_budget(0.2, kept.shape[1])
    for m in (0, 9):
        assert torch.equal(diagnostics.candidate_greedy(p[m], d[m], steps, 0.25, 999), kept[m])
        few = diagnostics.candidate_greedy(p[m], d[m], steps, 0.25, steps + 1)
        allowed = set(p[m].topk(steps + 1).indices.tolist())
        assert int(few.sum()) == steps and set(few.nonzero().flatten().tolist()) <= allowed


@pytest.mark.parametrize("bad", ["0", "64,x", "-8"])
def test_diagnostics_refuses_bad_candidates(diagnostics, bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        diagnostics.main(["--source", "synthetic:small", "--candidates", bad])
    assert exit_info.value.code == 2 and "--candidates must be positive" in capsys.readouterr().err


def test_diagnostics_report_of_one_head(diagnostics):
    q, k, v = (x[0, 0].double() for x in SyntheticSource("small").head(3))
    report = diagnostics.head_report(q, k, v, 0.2, [1, 6], 0.25, candidates=(4,))
    kinds = ("block-topk", "block-err", "exact greedy")
    expected = {f"{t}: {name}" for t in ("drop", "uta") for name in kinds}
    expected |= {"drop: value-aware", "drop: top-4"}
    assert set(report["mse"]) == expected and min(report["mse"].values()) > 0
    assert 0 <= report["uta_top_overlap"] <= 1 and -1 <= report["uta_score_spearman"] <= 1
    assert 0 < report["r2_v_on_k"] <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("script", ["profile_selection.py", "sweep_probe_tiles.py"])
def test_gpu_scripts_without_cuda_are_a_one_line_error(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""},
    )
    assert result.returncode == 1
    assert "needs CUDA" in result.stderr and "Traceback" not in result.stderr


def _report(rows: list[tuple[str, float | None]], skipped: tuple[str, ...] = (), **info) -> dict:
    """A toy_report.json with these (method, keep) rows and made-up measurements."""
    info = {
        "device": "cpu",
        "torch": "x",
        "dtype": "float32",
        "model": "tiny",
        "steps": 4,
        "shift": 2.0,
        "guidance": 1.0,
        "clips": 4,
        "seed": 0,
        "probe_rows": None,
        **info,
    }
    return {
        "info": info,
        "quality": {"clips": 4, "accuracy_samples_g3": 0.5},
        "rows": [
            {
                "method": m,
                "keep": k,
                "psnr": 20.0 + i,
                "ssim": 0.5,
                "mse_local_mean": 1e-3,
                "mse_vs_dense_mean": 2e-3,
                "accuracy_sparse": 0.25,
                "mse_local": [1e-3, 2e-3],
                "mse_vs_dense": [2e-3, 3e-3],
            }
            for i, (m, k) in enumerate(rows)
        ],
        "skipped": list(skipped),
    }


def _archive(out: Path, parts: dict[str, str]) -> None:
    """out/toy_results.tar.gz holding these files (name: text)."""
    with tarfile.open(out / "toy_results.tar.gz", "w:gz") as archive:
        for name, text in parts.items():
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


PARTS = {
    "train/loss.json": '{"step": [0]}',
    "train/loss.png": "loss figure",
    "report/toy_samples_g3.png": "samples figure",
    "report/toy_report.json": json.dumps(
        _report(
            [("block-topk+drop", 0.1), ("block-topk+uta", 0.1)],
            skipped=("rectified+drop keep=None: out of time",),
        )
    ),
    "anatomy/anatomy.md": "# anatomy\n\n![per head](anatomy.png)\n",
    "anatomy/anatomy.png": "anatomy figure",
    "study-toy/report.md": "# study\n\n| a |\n![recall](recall.png)\nlast line\n",
}


@pytest.fixture
def published(tiny_weights, tmp_path):  # noqa: F811
    """A $OUT of toy_gpu.sh report (tiny weights, a results archive), the directory of a second
    report and a repository root holding an older model's files and others."""
    out = shutil.copytree(tiny_weights, tmp_path / "out")
    _archive(out, PARTS)
    extra = tmp_path / "extra"
    extra.mkdir()
    second = _report([("rectified+drop", None), ("block-err+drop", 0.1)])
    (extra / "toy_report.json").write_text(json.dumps(second))
    root = tmp_path / "repo"
    for directory in ("src/tailattn/toy/weights", "docs/results", "docs/figures"):
        (root / directory).mkdir(parents=True)
        (root / directory / "unrelated.txt").write_text("kept")
    (root / "src/tailattn/toy/weights/toy-07.safetensors").write_text("an older model's shard")
    return out, extra, root


def _publish(out: Path, root: Path, *extra: Path):
    reports = [a for e in extra for a in ("--report", str(e))]
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "toy_publish.py"),
            "--out-dir",
            str(out),
            "--root",
            str(root),
            *reports,
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""},
    )


def test_toy_publish_replaces_the_models_files(published):
    pytest.importorskip("diffusers")
    from tailattn.toy import weights

    out, extra, root = published
    result = _publish(out, root, extra)
    assert result.returncode == 0, result.stderr
    target = root / "src/tailattn/toy/weights"
    card = json.loads((out / "card.json").read_text())
    shards = sorted(p.name for p in target.glob("toy-*.safetensors"))
    assert shards == sorted(f["name"] for f in card["files"])  # the older shard is gone
    assert weights.read_card(target) == card
    weights.load(target)  # every copied shard matches the card's SHA-256
    assert (target / "loss.json").read_text() == PARTS["train/loss.json"]
    report = json.loads((root / "docs/results/toy_report.json").read_text())
    assert [(r["method"], r["keep"]) for r in report["rows"]] == [
        ("block-topk+drop", 0.1),
        ("block-topk+uta", 0.1),
        ("block-err+drop", 0.1),
        ("rectified+drop", None),
    ]
    assert [(run["selections"], run["tails"], run["keeps"]) for run in report["runs"]] == [
        (["block-topk"], ["drop", "uta"], [0.1]),
        (["block-err", "rectified"], ["drop"], [0.1]),
    ]
    assert report["skipped"] == []  # the second report measured what the first skipped
    table = (root / "docs/results/toy_report.md").read_text()
    assert "| rectified+drop | - |" in table and "skipped" not in table
    assert "(../figures/toy_anatomy.png)" in (root / "docs/results/toy_anatomy.md").read_text()
    study = (root / "docs/results/toy_study.md").read_text()
    assert "![" not in study and "| a |" in study and study.endswith("last line\n")
    figures = root / "docs/figures"
    for name, part in (
        ("toy_loss.png", "train/loss.png"),
        ("toy_samples.png", "report/toy_samples_g3.png"),
        ("toy_anatomy.png", "anatomy/anatomy.png"),
    ):
        assert (figures / name).read_text() == PARTS[part]
    assert (figures / "toy_fig8b.png").read_bytes().startswith(b"\x89PNG")
    for directory in ("src/tailattn/toy/weights", "docs/results", "docs/figures"):
        assert (root / directory / "unrelated.txt").read_text() == "kept"


def _untouched(root: Path) -> bool:
    weights = sorted(p.name for p in (root / "src/tailattn/toy/weights").iterdir())
    results = [p.name for p in (root / "docs/results").iterdir()]
    return weights == ["toy-07.safetensors", "unrelated.txt"] and results == ["unrelated.txt"]


def test_toy_publish_replaces_nothing_on_bad_input(published, tmp_path, monkeypatch):
    """Each bad input is a ValueError (a one-line exit 1 from the command line, shown for the
    first) before any file of the repository is replaced."""
    pytest.importorskip("diffusers")
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    publish = script("toy_publish").publish
    out, extra, root = published
    again = tmp_path / "again"  # a row of the first report measured again
    again.mkdir()
    (again / "toy_report.json").write_text(json.dumps(_report([("block-topk+uta", 0.1)])))
    other = tmp_path / "other"  # another number of steps
    other.mkdir()
    (other / "toy_report.json").write_text(json.dumps(_report([("dfs+drop", 0.1)], steps=8)))
    result = _publish(out, root, extra, extra)
    assert result.returncode == 1 and "is in another report" in result.stderr
    assert "Traceback" not in result.stderr and _untouched(root)
    lacking = shutil.copytree(out, tmp_path / "lacking")
    _archive(lacking, {k: v for k, v in PARTS.items() if k != "anatomy/anatomy.md"})
    broken = shutil.copytree(out, tmp_path / "broken")
    (broken / "toy_results.tar.gz").write_bytes(b"not an archive")
    truncated = shutil.copytree(out, tmp_path / "truncated")
    shard = truncated / json.loads((out / "card.json").read_text())["files"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:-1])
    for directory, reports, message in (
        (out, [again], "block-topk\\+uta keep=0.1 is in another report"),
        (out, [other], "other settings than"),
        (lacking, [], "lacks anatomy/anatomy.md"),
        (broken, [], "toy_results.tar.gz"),
        (truncated, [], "toy-0"),
    ):
        with pytest.raises(ValueError, match=message):
            publish(directory, [d / "toy_report.json" for d in reports], root)
        assert _untouched(root), message
    for args, message in (
        ((extra, root), "no toy_results.tar.gz"),
        ((out, root, tmp_path), "no toy_report.json"),
    ):
        result = _publish(*args)
        assert result.returncode == 2 and message in result.stderr
