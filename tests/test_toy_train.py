"""Training the toy model: a few CPU steps write loadable weights, a card and the loss log."""

import json

import pytest

pytest.importorskip("diffusers")

import torch
import typer

from diffusers_tiny import one_thread  # noqa: F401
from tailattn.toy import weights
from tailattn.toy.model import ToyConfig, ToyModel
from tailattn.toy.train import Settings, _lr_factor, flow_matching_loss, train

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
    loss = flow_matching_loss(model, x0, torch.tensor([0, 1]), gen.manual_seed(0), 0.1)
    assert float(loss) == 0.0


def test_lr_warms_up_then_decays_to_a_tenth():
    assert _lr_factor(0, 0.0, 10) == pytest.approx(0.1)
    assert _lr_factor(9, 0.0, 10) == pytest.approx(1.0)
    assert _lr_factor(50, 0.0, 10) == pytest.approx(1.0)
    assert _lr_factor(50, 0.5, 10) == pytest.approx(0.55)
    assert _lr_factor(50, 1.0, 10) == pytest.approx(0.1)


def test_a_few_cpu_steps_write_weights_card_and_loss(tmp_path):
    settings = Settings(
        minutes=2.0, config="tiny", batch=1, max_steps=3, log_every=2, strip_steps=1
    )
    card_path = train(settings, tmp_path)
    card = weights.read_card(tmp_path)
    assert card_path == tmp_path / weights.CARD
    assert card["training"]["steps"] == 3
    assert card["config"] == ToyConfig.tiny().to_dict()
    log = json.loads((tmp_path / "loss.json").read_text())
    assert log["step"] == [2, 3]
    assert all(value > 0 for value in log["loss"])
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
    args = ["train", "--minutes", "1", "--out", str(tmp_path), "--device", "cuda"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "is not available here" in " ".join(result.output.split())
    assert not any(tmp_path.iterdir())
