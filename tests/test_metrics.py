"""Metrics against values computed by hand."""

import math

import pytest
import torch

from tailattn import metrics


def test_output_metrics_known_values():
    ref = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    ref[..., 0] = 1.0
    out = ref.clone()
    out[0, 1, :, 1] = 1.0  # head 1: error (0, 1, 0, 0) on every row
    assert metrics.mse(out, ref) == pytest.approx(0.125)
    assert metrics.mse(out, ref, per_head=True).tolist() == pytest.approx([0.0, 0.25])
    assert metrics.rel_l2(out, ref, per_head=True).tolist() == pytest.approx([0.0, 1.0])
    assert metrics.cosine(out, ref, per_head=True).tolist() == pytest.approx(
        [1.0, 1 / math.sqrt(2)]
    )
    report = metrics.compare(out, ref)
    assert report["mse"] == pytest.approx(0.125)
    assert report["per_head"]["cosine"] == pytest.approx([1.0, 1 / math.sqrt(2)])


def test_output_metrics_shape_check():
    with pytest.raises(ValueError, match="does not match reference"):
        metrics.mse(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))


def test_recall_and_tail_mass():
    z = torch.log(torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64))
    kept = torch.tensor([[True, True, False, False]])
    assert metrics.recall(z, kept).item() == pytest.approx(0.7)
    # one token of the exact tail mass: error 0; of half the mass: -0.5; none: -1
    assert metrics.tail_mass_error(
        z, kept, torch.log(torch.tensor([[3.0]], dtype=torch.float64))
    ).item() == pytest.approx(0)
    assert metrics.tail_mass_error(
        z, kept, torch.log(torch.tensor([[1.5]], dtype=torch.float64))
    ).item() == pytest.approx(-0.5)
    assert metrics.tail_mass_error(z, kept, torch.zeros(1, 0)).item() == pytest.approx(-1)
    full = torch.ones_like(kept)
    assert metrics.tail_mass_error(z, full, torch.zeros(1, 0)).item() == 0


def test_implied_tv_known_value():
    z = torch.log(torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64))
    kept = torch.tensor([[True, True, False, False]])
    # one tail token of exact mass 3 spread evenly: implied 1.5, 1.5 instead of 2, 1
    implied = torch.log(torch.tensor([[0.0, 0.0, 1.5, 1.5]], dtype=torch.float64))
    lse = torch.log(torch.tensor([10.0], dtype=torch.float64))
    assert metrics.implied_tv(z, kept, implied, lse).item() == pytest.approx(0.5 * (0.5 + 0.5) / 10)
