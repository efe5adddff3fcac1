"""The ``one_thread`` fixture, for tests of small tensors on a shared CPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread: these models are tiny, and on a shared 2-core machine two
    OpenMP threads wait on each other (a 128 x 128 linear layer took 14 ms instead of 0.1 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
