"""Random-weight tiny toy models saved as weights directories, for fast toy tests."""

from pathlib import Path

import pytest
import torch

from tailattn.toy import weights
from tailattn.toy.model import ToyConfig, ToyModel


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights directory (shards + card) of a random tiny toy model (ToyConfig.tiny())."""
    directory = tmp_path_factory.mktemp("tiny-toy")
    torch.manual_seed(0)
    weights.save(ToyModel(ToyConfig.tiny()), directory, {"training": {"steps": 0}})
    return directory
