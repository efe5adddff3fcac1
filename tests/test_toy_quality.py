"""The toy model's quality measure: the frame classifier (any frame size, deterministic) and
the exact McNemar test of two settings' paired outcomes."""

import itertools

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
    recognised = quality.recognised(first, videos, labels)
    assert recognised.dtype == torch.bool and recognised.shape == (3,)
    assert recognised.float().mean().item() == quality.label_accuracy(first, videos, labels)


@pytest.mark.parametrize(
    ("only_first", "only_second", "expected"),
    [
        (0, 5, 2 / 32),  # 2 P(B <= 0), B ~ Bin(5, 1/2)
        (1, 9, 2 * 11 / 1024),  # 2 (1 + 10) / 2^10
        (7, 2, 2 * (1 + 9 + 36) / 512),
        (3, 3, 1.0),  # capped at 1
        (0, 0, 1.0),  # no discordant sample: nothing tells the two apart
        (0, 1, 1.0),
    ],
)
def test_mcnemar_p_is_the_exact_binomial_tail(only_first, only_second, expected):
    assert quality.mcnemar_p(only_first, only_second) == pytest.approx(expected, rel=1e-12)
    assert quality.mcnemar_p(only_second, only_first) == quality.mcnemar_p(only_first, only_second)


def test_mcnemar_p_falls_as_the_split_grows_uneven():
    values = [quality.mcnemar_p(20 - c, c) for c in range(11)]
    assert all(a < b for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError, match=">= 0"):
        quality.mcnemar_p(-1, 3)
