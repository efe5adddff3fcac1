"""The frame classifier of the toy model's quality measure: any frame size, deterministic."""

import pytest
import torch

from tailattn.toy import data, quality
from threads import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_classifier_takes_any_frame_size_and_trains_deterministically():
    first = quality.train_classifier(3, batch=2, frames=2, size=16, seed=4)
    second = quality.train_classifier(3, batch=2, frames=2, size=16, seed=4)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for size in (16, 64):
        videos, labels = data.clips(1, 3, frames=2, size=size)
        assert first.predict(videos).shape == (3,)
        assert 0.0 <= quality.label_accuracy(first, videos, labels) <= 1.0
    assert first(torch.zeros(5, 3, 32, 32)).shape == (5, len(data.SHAPES))
