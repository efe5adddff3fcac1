"""Sampling the toy model, dense against sparse, and ``tailattn generate``."""

import math

import pytest

pytest.importorskip("diffusers")

import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from diffusers_tiny import one_thread, plain  # noqa: F401
from tailattn.cli.generate import generate_command
from tailattn.toy import quality, weights
from tailattn.toy.pipeline import label_of
from tailattn.toy.sample import dense_and_sparse, dense_run, noise, sample, sample_batches, sigmas
from toy_tiny import tiny_weights  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = (4, 16, 16)  # frames, height, width: 256 tokens (4 blocks of 64), fast on a CPU


@pytest.fixture
def model(tiny_weights):  # noqa: F811
    return weights.load(tiny_weights)


def test_sigmas_run_from_one_to_zero_and_shift_moves_them_up():
    plain_levels, shifted = sigmas(8, 1.0), sigmas(8, 3.0)
    assert torch.allclose(plain_levels, torch.linspace(1, 0, 9, dtype=torch.float64))
    assert shifted[0] == 1 and shifted[-1] == 0
    assert bool((shifted[1:] < shifted[:-1]).all())
    assert bool((shifted[1:-1] > plain_levels[1:-1]).all())
    with pytest.raises(ValueError, match="steps"):
        sigmas(0, 1.0)


def test_sampling_in_batches_gives_the_clips_of_one_batch(model):
    labels = torch.tensor([0, 1, 2, 3, 0])
    x = noise(5, 5, (3, *SMALL), torch.device("cpu"))
    settings = {"steps": 2, "shift": 2.0, "guidance": 3.0}
    whole = sample(model, x, labels, **settings)
    for batch in (2, 5, 8):
        parts = sample_batches(model, x, labels, batch=batch, **settings)
        assert parts.shape == whole.shape
        assert torch.allclose(parts, whole, atol=1e-5), batch
    for bad in (0, 1.5):
        with pytest.raises((TypeError, ValueError), match="batch"):
            sample_batches(model, x, labels, batch=bad, **settings)


def _run(model, method, keep, seed=3, warmup=0):
    return dense_and_sparse(
        model,
        method,
        keep,
        seed=seed,
        labels=torch.tensor([label_of("square")]),
        steps=2,
        shift=2.0,
        warmup_steps=warmup,
        size=SMALL,
    )


def test_two_step_generation_is_deterministic(model):
    first, second = _run(model, "block-topk+uta", 0.25), _run(model, "block-topk+uta", 0.25)
    assert torch.equal(first.dense, second.dense)
    assert torch.equal(first.sparse, second.sparse)
    assert first.mse_local == second.mse_local
    assert first.mse_vs_dense == second.mse_vs_dense
    assert first.dense.shape == (1, 3, *SMALL)
    assert not torch.equal(first.dense, _run(model, "full", None, seed=4).dense)


def test_sampled_probe_rows_change_only_the_local_error_estimate(model):
    """probe_rows: the same videos and trajectory error; mse_local from a subset of the rows."""
    full = _run(model, "block-topk", 0.25, warmup=1)
    sampled = dense_and_sparse(
        model, "block-topk", 0.25, seed=3, labels=torch.tensor([label_of("square")]), steps=2,
        shift=2.0, warmup_steps=1, size=SMALL, probe_rows=40,
    )  # fmt: skip
    assert torch.equal(sampled.sparse, full.sparse) and torch.equal(sampled.dense, full.dense)
    assert sampled.mse_vs_dense == full.mse_vs_dense
    assert sampled.mse_local[0] < 1e-10 < sampled.mse_local[1] != full.mse_local[1]
    assert sampled.mse_local[1] == pytest.approx(full.mse_local[1], rel=0.5)


@pytest.mark.parametrize("method", ["block-topk+uta", "radial"])
def test_a_recorded_dense_run_gives_the_lockstep_numbers(model, method):
    """dense_run once, then sparse runs against it: the same clips and per-step errors as the
    two models in lockstep."""
    labels = torch.tensor([label_of("square")])
    kwargs = {"seed": 3, "labels": labels, "steps": 2, "shift": 2.0, "size": SMALL}
    recorded = dense_run(model, **kwargs)
    assert len(recorded.outputs) == 2 and len(recorded.outputs[0]) == len(model.transformer.blocks)
    lockstep = _run(model, method, 0.25, warmup=1)
    shared = dense_and_sparse(model, method, 0.25, warmup_steps=1, dense=recorded, **kwargs)
    assert torch.equal(shared.dense, lockstep.dense) and torch.equal(shared.sparse, lockstep.sparse)
    assert shared.mse_local == lockstep.mse_local
    assert shared.mse_vs_dense == lockstep.mse_vs_dense
    with pytest.raises(ValueError, match="recorded with other settings"):
        dense_and_sparse(model, method, 0.25, dense=recorded, **{**kwargs, "seed": 4})


def test_full_method_reproduces_the_dense_run(model):
    result = _run(model, "full", None)
    assert torch.equal(result.sparse, result.dense)
    assert result.mse_vs_dense == [0.0, 0.0]
    assert max(result.mse_local) < 1e-10
    assert quality.psnr(result.sparse, result.dense) == math.inf


def test_sparse_steps_have_attention_error_and_warmup_steps_none(model):
    result = _run(model, "block-topk", 0.25, warmup=1)
    assert result.mse_local[0] < 1e-10 and result.mse_vs_dense[0] == 0.0
    assert result.mse_local[1] > 0 and result.mse_vs_dense[1] > 0
    assert [call.dense for call in result.calls if call.layer == 0] == [True, False]


def test_psnr_and_ssim():
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 4, 16, 16, generator=gen) * 2 - 1
    noisy = (video + 0.1 * torch.randn(video.shape, generator=gen)).clamp(-1, 1)
    noisier = (video + 0.3 * torch.randn(video.shape, generator=gen)).clamp(-1, 1)
    assert quality.psnr(video, video) == math.inf
    assert quality.ssim(video, video) == pytest.approx(1.0)
    mse = float((((noisy + 1) / 2 - (video + 1) / 2) ** 2).mean())
    assert quality.psnr(noisy, video) == pytest.approx(-10 * math.log10(mse))
    assert quality.psnr(noisier, video) < quality.psnr(noisy, video)
    assert quality.ssim(noisier, video) < quality.ssim(noisy, video) < 1
    with pytest.raises(ValueError, match="equal shapes"):
        quality.psnr(video, video[:1])


@pytest.fixture
def app():
    app = typer.Typer()
    app.command("generate")(generate_command)
    app.command("other")(lambda: None)
    return app


def _generate(app, tmp_path, *extra):
    args = ["generate", "--steps", "2", "--frames", "4", "--size", "8", "--device", "cpu"]
    return CliRunner().invoke(app, [*args, "--out", str(tmp_path), *extra])


def test_generate_full_gives_identical_videos(app, tmp_path):
    result = _generate(app, tmp_path, "--method", "full", "--label", "cross")
    assert result.exit_code == 0, result.output
    assert "PSNR(sparse, dense) = inf dB" in plain(result.output)
    assert "SSIM = 1.0000" in plain(result.output)
    gifs = list(tmp_path.glob("cross-seed0-full.gif"))
    assert len(gifs) == 1
    with Image.open(gifs[0]) as gif:
        assert gif.n_frames == 4  # --frames 4
        assert gif.size == (4 * (8 + 4 + 8), 4 * 8)  # dense, 4 px gap, sparse; 4x enlarged


def test_generate_sparse_prints_error_per_step(app, tmp_path, tiny_weights):  # noqa: F811
    args = ["--method", "radial+uta", "--keep", "0.3", "--size", "16"]
    result = _generate(app, tmp_path, *args, "--weights", str(tiny_weights))
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    assert "attention-output MSE per step" in text
    assert "PSNR(sparse, dense) =" in text and "inf dB" not in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label", "hexagon"], "name exactly one of"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--method", "nope"], "unknown selection"),
        (["--method", "full", "--keep", "0.1"], "takes no parameter 'keep'"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--weights", "/nonexistent"], "no toy model card"),
    ],
)
def test_generate_bad_parameters(app, tmp_path, extra, message):
    result = _generate(app, tmp_path, *extra)
    assert result.exit_code == 2
    assert message in plain(result.output)
