"""Toy model weights: the shipped model loads, matches its card, and bad files are caught."""

import json
import shutil

import pytest

pytest.importorskip("diffusers")

import torch
from safetensors.torch import load_file

from diffusers_tiny import one_thread  # noqa: F401
from tailattn.toy import weights
from tailattn.toy.model import ADDED_KEYS, ToyConfig, ToyModel

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_weights_load_and_match_their_card():
    card = weights.read_card()
    model = weights.load()
    assert model.config == ToyConfig.from_dict(card["config"])
    wan = model.transformer.config
    assert wan.num_attention_heads == card["config"]["heads"]
    assert wan.num_layers == card["config"]["layers"] == len(model.transformer.blocks)
    assert wan.attention_head_dim == model.config.head_dim
    assert tuple(wan.patch_size) == (1, 2, 2)
    assert wan.in_channels == wan.out_channels == 3
    for entry in card["files"]:
        path = weights.default_dir() / entry["name"]
        assert path.stat().st_size == entry["bytes"] <= 16 * 2**20
        assert weights.sha256(path) == entry["sha256"]
    assert sum(entry["bytes"] for entry in card["files"]) <= 30_000_000
    assert card["training"]["steps"] > 0
    assert card["training"]["final_loss"] > 0
    assert not model.training


def _copy_shipped(tmp_path):
    target = tmp_path / "weights"
    shutil.copytree(weights.default_dir(), target)
    return target


def test_corrupt_shard_is_a_clear_error(tmp_path):
    directory = _copy_shipped(tmp_path)
    shard = directory / weights.read_card(directory)["files"][0]["name"]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(weights.WeightsError, match="corrupt"):
        weights.load(directory)


def test_missing_shard_and_missing_card(tmp_path):
    directory = _copy_shipped(tmp_path)
    (directory / weights.read_card(directory)["files"][0]["name"]).unlink()
    with pytest.raises(weights.WeightsError, match="missing"):
        weights.load(directory)
    with pytest.raises(weights.WeightsError, match="no toy model card"):
        weights.load(tmp_path / "nowhere")


def test_card_with_a_different_config_is_rejected(tmp_path):
    directory = _copy_shipped(tmp_path)
    card = json.loads((directory / weights.CARD).read_text())
    card["config"]["layers"] += 1
    (directory / weights.CARD).write_text(json.dumps(card))
    with pytest.raises(weights.WeightsError, match="do not fit"):
        weights.load(directory)


def test_save_load_round_trip_in_several_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "SHARD_BYTES", 2**17)
    torch.manual_seed(0)
    model = ToyModel(ToyConfig.tiny()).eval()
    weights.save(model, tmp_path, {"training": {"steps": 0}})
    card = weights.read_card(tmp_path)
    assert len(card["files"]) > 1
    for entry in card["files"]:
        tensors = load_file(str(tmp_path / entry["name"]))
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 2**17
    loaded = weights.load(tmp_path)
    x = torch.randn(1, 3, 2, 8, 8)
    t, label = torch.tensor([0.5]), torch.tensor([1])
    with torch.no_grad():
        assert torch.equal(model(x, t, label), loaded(x, t, label))
    assert not list(tmp_path.glob(".*partial"))


def test_default_config_is_a_video_dit_of_16k_tokens_within_30_mb():
    """At least 8 heads and 16,384 tokens per training clip (128 key blocks of 128), and
    bfloat16 weights of at most 30 MB."""
    config = ToyConfig.default()
    tokens = config.frames * (config.size // 2) ** 2
    assert config.heads >= 8 and tokens >= 16_384 and tokens // 128 >= 128
    model = ToyModel(config)
    assert sum(p.numel() for p in model.state_dict().values()) * 2 <= 30_000_000
    assert model.transformer.config.attention_head_dim == config.head_dim


def test_cards_of_the_first_model_load_as_v1():
    """Cards written before ``head_dim``, ``frames`` and ``size`` existed take the first model's
    values; an unknown key or another missing key is an error."""
    old = {k: v for k, v in ToyConfig.v1().to_dict().items() if k not in ADDED_KEYS}
    assert ToyConfig.from_dict(old) == ToyConfig.v1()
    with pytest.raises(ValueError, match="do not match"):
        ToyConfig.from_dict({**old, "depth": 3})
    with pytest.raises(ValueError, match="do not match"):
        ToyConfig.from_dict({k: v for k, v in old.items() if k != "layers"})
    with pytest.raises(ValueError, match="one of"):
        ToyConfig.named("huge")


def test_bfloat16_shards_load_as_their_rounded_weights(tmp_path):
    torch.manual_seed(1)
    model = ToyModel(ToyConfig.tiny()).eval()
    weights.save(model, tmp_path, {"training": {"steps": 0}}, torch.bfloat16)
    card = weights.read_card(tmp_path)
    assert card["dtype"] == "bfloat16"
    stored = load_file(str(tmp_path / card["files"][0]["name"]))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    loaded = weights.load(tmp_path).state_dict()
    for name, value in model.state_dict().items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], value.to(torch.bfloat16).float())
