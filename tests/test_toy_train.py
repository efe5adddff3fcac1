"""Training the toy model: a few CPU steps write loadable weights, a card and the loss log."""

import json

import pytest

pytest.importorskip("diffusers")

import torch
import typer

from diffusers_tiny import one_thread  # noqa: F401
from tailattn.toy import weights
from tailattn.toy.model import ToyConfig, ToyModel
from tailattn.toy.train import (
    Settings,
    Stage,
    _lr_factor,
    _stage_at,
    flow_matching_loss,
    loss_trend,
    parse_stages,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flow_matching_loss_is_zero_for_the_exact_velocity():
    """With a model that returns eps - x0 exactly, the loss is 0 (x_t and the target agree)."""

    class Oracle(ToyModel):
        def forward(self, x, t, label):
            return self.eps - self.x0

    model = Oracle(ToyConfig.tiny())
    x0 = torch.rand(2, 3, 2, 4, 4) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    model.x0, model.eps = x0, torch.randn(x0.shape, generator=gen)
    for shift in (1.0, 2.0):
        loss = flow_matching_loss(model, x0, torch.tensor([0, 1]), gen.manual_seed(0), 0.1, shift)
        assert float(loss) == 0.0


def test_lr_warms_up_then_decays_to_a_tenth():
    assert _lr_factor(0, 0.0, 10) == pytest.approx(0.1)
    assert _lr_factor(9, 0.0, 10) == pytest.approx(1.0)
    assert _lr_factor(50, 0.0, 10) == pytest.approx(1.0)
    assert _lr_factor(50, 0.5, 10) == pytest.approx(0.55)
    assert _lr_factor(50, 1.0, 10) == pytest.approx(0.1)


def test_stages_parse_and_switch_by_fraction():
    stages = parse_stages("16:32:32:0.4, 16:64:8:1")
    assert stages == (Stage(16, 32, 32, 0.4), Stage(16, 64, 8, 1.0))
    assert [_stage_at(stages, f) for f in (0.0, 0.39, 0.4, 0.99, 1.2)] == [0, 0, 1, 1, 1]
    for bad in ("16:32:32", "16:31:8:1", "16:32:8:0.5", "8:16:2:0.6,8:32:1:0.5,8:32:1:1", "a:b"):
        with pytest.raises(ValueError):
            parse_stages(bad)


def test_loss_trend_is_zero_when_flat_and_negative_when_falling():
    steps = list(range(10, 210, 10))
    flat = {"step": steps, "loss": [0.05] * 20, "stage": [0] * 4 + [1] * 16}
    assert loss_trend(flat) == pytest.approx(0.0)
    falling = {**flat, "loss": [1.0 - 0.004 * s for s in steps]}
    # last quarter of the last stage: steps 170..200, loss 0.32..0.20, mean 0.26
    assert loss_trend(falling) == pytest.approx(-0.004 * 30 / 0.26, rel=1e-6)


def test_a_few_cpu_steps_write_weights_card_and_loss(tmp_path):
    """Four steps of the tiny config's two stages (4 x 8 x 8, then 4 x 16 x 16): two each."""
    settings = Settings(minutes=2.0, config="tiny", max_steps=4, log_every=3, strip_steps=1)
    card_path = train(settings, tmp_path)
    card = weights.read_card(tmp_path)
    assert card_path == tmp_path / weights.CARD
    assert card["training"]["steps"] == 4
    assert card["training"]["steps_per_stage"] == [2, 2]
    assert card["training"]["clips_seen"] == 2 * 2 + 2 * 1
    assert card["config"] == ToyConfig.tiny().to_dict()
    assert card["dtype"] == "bfloat16"
    log = json.loads((tmp_path / "loss.json").read_text())
    assert log["step"] == [2, 4] and log["stage"] == [0, 1]  # a window closes at a stage change
    assert all(value > 0 for value in log["loss"])
    assert card["training"]["final_loss"] == log["loss"][-1]
    assert card["samples"]["file"] == "samples.png" and (tmp_path / "samples.png").is_file()
    assert card["samples"]["steps"] == 1  # the strip's own settings, not the sampler's default


def test_the_config_records_the_clip_of_the_last_stage(tmp_path):
    stages = parse_stages("2:8:1:0.5,3:12:1:1")
    settings = Settings(
        minutes=2.0, config="tiny", layers=3, stages=stages, max_steps=2, strip_steps=1
    )
    train(settings, tmp_path)
    config = weights.load(tmp_path).config
    assert (config.frames, config.size, config.layers) == (3, 12, 3)
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert isinstance(weights.load(tmp_path), ToyModel)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_training_on_a_missing_device_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from tailattn.toy.train import train_command

    app = typer.Typer()
    app.command("train")(train_command)
    app.command("other")(lambda: None)
    for extra, message in (
        (["--device", "cuda:1"], "is not available here"),
        (["--stages", "16:32:8:0.5"], "--stages"),
        (["--config", "huge"], "--config must be one of"),
        (["--layers", "0"], "--layers must be at least 1"),
    ):
        args = ["train", "--minutes", "1", "--out", str(tmp_path), *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2
        assert message in " ".join(result.output.split())
    assert not any(tmp_path.iterdir())
