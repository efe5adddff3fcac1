"""Toy model weights on disk: safetensors shards (each at most 16 MiB) and a JSON model card.

A weights directory holds ``card.json`` and the shards it lists. The card records the model
config (``ToyConfig``), the data recipe, the training run (steps, minutes, final loss, ...), the
storage dtype (float32, or bfloat16 to halve the size; loading casts to float32) and, per shard,
its size and SHA-256. Loading checks every shard against the card before reading it,
so a corrupt, truncated or missing file is a clear error, never a silently wrong model. Files
are written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .model import ToyConfig, ToyModel

CARD = "card.json"
SHARD_BYTES = 15 * 2**20
"""Largest shard payload (MiB below the 16 MiB file limit, leaving room for the header)."""


class WeightsError(ValueError):
    """A weights directory that cannot be loaded: missing, corrupt or inconsistent files."""


def default_dir() -> Path:
    """The weights shipped in the package: ``tailattn/toy/weights``."""
    return Path(str(resources.files("tailattn.toy") / "weights"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    partial.replace(path)


def _shards(state: dict[str, torch.Tensor], dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Greedy split of a state dict, cast to ``dtype``, into groups of at most SHARD_BYTES (in
    key order)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > SHARD_BYTES:
            raise ValueError(f"tensor {name} ({nbytes} bytes) exceeds one shard")
        if size + nbytes > SHARD_BYTES and groups[-1]:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    return groups


def save(
    model: ToyModel, directory: Path, card: dict[str, Any], dtype: torch.dtype = torch.float32
) -> Path:
    """Write ``model``'s weights in ``dtype`` as shards and ``card.json`` (``card`` plus the
    config, the dtype and the shard checksums) into ``directory``; returns the card's path."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for index, group in enumerate(_shards(model.state_dict(), dtype)):
        path = directory / f"toy-{index:02d}.safetensors"
        _atomic_write(path, lambda p, group=group: save_file(group, str(p)))
        files.append({"name": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)})
    stored = str(dtype).removeprefix("torch.")
    full = {**card, "config": model.config.to_dict(), "dtype": stored, "files": files}
    card_path = directory / CARD
    _atomic_write(card_path, lambda p: p.write_text(json.dumps(full, indent=2) + "\n"))
    return card_path


def read_card(directory: Path | None = None) -> dict[str, Any]:
    """The model card of a weights directory (default: the shipped weights).

    Raises:
        WeightsError: no card, or not valid JSON with ``config`` and ``files``.
    """
    path = (directory or default_dir()) / CARD
    if not path.is_file():
        raise WeightsError(
            f"no toy model card at {path}; train weights with "
            f"'python -m tailattn.toy.train --minutes 13 --out DIR' and pass that directory"
        )
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"toy model card {path} is not valid JSON: {err}") from None
    if not isinstance(card, dict) or "config" not in card or "files" not in card:
        raise WeightsError(f"toy model card {path} lacks 'config' or 'files'")
    return card


def load(directory: Path | None = None, device: torch.device | str = "cpu") -> ToyModel:
    """The toy model from a weights directory (default: the shipped weights), in eval mode.

    Raises:
        WeightsError: a missing card or shard, a shard whose SHA-256 differs from the card's,
            or weights that do not fit the card's config.
    """
    directory = directory or default_dir()
    card = read_card(directory)
    try:
        config = ToyConfig.from_dict(card["config"])
    except (TypeError, ValueError) as err:
        raise WeightsError(f"toy model card in {directory}: {err}") from None
    state: dict[str, torch.Tensor] = {}
    for entry in card["files"]:
        path = directory / entry["name"]
        if not path.is_file():
            raise WeightsError(f"toy weights file {path} listed in {CARD} is missing")
        digest = sha256(path)
        if digest != entry["sha256"]:
            raise WeightsError(
                f"toy weights file {path} is corrupt: SHA-256 {digest} does not match "
                f"{entry['sha256']} in {CARD}; restore the file (git checkout) or retrain"
            )
        state.update(load_file(str(path)))
    model = ToyModel(config)
    try:
        model.load_state_dict(state, strict=True)  # copies cast to the float32 parameters
    except RuntimeError as err:
        raise WeightsError(f"toy weights in {directory} do not fit their card: {err}") from None
    return model.to(device).eval()
