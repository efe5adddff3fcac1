"""torch.compile of a patched transformer: graph breaks only at the attention call, no
recompilation as the diffusion steps advance, same outputs and schedule as eager."""

import pytest
import torch

pytest.importorskip("diffusers")

from torch._dynamo.utils import counters

from diffusers_tiny import (
    one_thread,  # noqa: F401
    run,
    wan,
    wan_inputs,
)
from tailattn.integrations.diffusers import apply

pytestmark = pytest.mark.usefixtures("one_thread")

TIMESTEPS = (900.0, 800.0, 700.0, 600.0, 500.0)


def test_compiled_transformer_matches_eager_and_stops_recompiling():
    model = wan()
    settings = {"warmup_steps": 1, "dense_layers": (0,), "keep_schedule": {3: 0.25}}
    with apply(model, "topk+uta", keep=0.5, **settings) as handle:
        eager = [run(model, wan_inputs(t)) for t in TIMESTEPS]
        eager_calls = handle.calls
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    graphs = []
    with apply(model, "topk+uta", keep=0.5, **settings) as handle:
        outputs = []
        for t in TIMESTEPS:
            outputs.append(run(compiled, wan_inputs(t)))
            graphs.append(counters["stats"]["unique_graphs"])
        compiled_calls = handle.calls
    for out, ref in zip(outputs, eager, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert compiled_calls == eager_calls
    # step 0 is dense everywhere, step 1 brings the first sparse call (a new output stride
    # after the break); from then on dense/sparse and keep changes need no new graph
    assert graphs[1] == graphs[-1]
    breaks = counters["graph_break"]
    assert breaks and all("LayerRoute.__call__" in reason for reason in breaks)
    torch._dynamo.reset()
