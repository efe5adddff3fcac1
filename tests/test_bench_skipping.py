"""The skipping benchmark's data loading (its GPU figures are in BENCHMARKS.md)."""

import pytest
import torch

from tailattn.bench.skipping import load
from tailattn.capture_file import CaptureWriter


def test_a_capture_entry_is_picked_by_layer_and_step(tmp_path):
    path = tmp_path / "c.safetensors"
    writer = CaptureWriter(path, model="m", grid=(2, 2, 3), text_tokens=0)
    sent = {}
    for layer, step in [(0, 0), (4, 0), (0, 6), (4, 6)]:
        q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
        writer.add(layer, step, q, k, v, timestep=float(step))
        sent[layer, step] = (q, k, v)
    writer.close()
    for (layer, step), want in sent.items():
        got = load(str(path), None, "cpu", layer=layer, step=step)
        for x, y in zip(got, want, strict=True):
            assert x.dtype == torch.bfloat16 and torch.equal(x, y.to(torch.bfloat16))
    first = load(str(path), [1], "cpu")
    assert torch.equal(first[0], sent[0, 0][0][:, [1]].to(torch.bfloat16))
    with pytest.raises(SystemExit, match="no entry with layer 4 and step 3"):
        load(str(path), None, "cpu", layer=4, step=3)


def test_layer_and_step_are_refused_for_synthetic_data():
    with pytest.raises(SystemExit, match="pick an entry of a capture file"):
        load("synthetic:small", None, "cpu", layer=1)
