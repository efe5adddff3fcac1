"""Dense schedule, keep schedule, steps and guidance branches, per-layer state."""

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers_tiny import (
    TinyPipeline,
    cogvideox,
    cogvideox_inputs,
    one_thread,  # noqa: F401
    run,
    wan,
    wan_inputs,
)
from tailattn.integrations.diffusers import StateKey, apply
from tailattn.integrations.diffusers import runtime as runtime_module
from tailattn.integrations.diffusers.clock import StepClock
from tailattn.integrations.diffusers.runtime import run_method as real_run
from tailattn.integrations.diffusers.schedule import Schedule
from tailattn.methods import Entry, Granularity, registry
from tailattn.select.oracle import TopK

pytestmark = pytest.mark.usefixtures("one_thread")


def test_clock_counts_runs_steps_and_branches():
    clock = StepClock()
    ticks = [clock.tick(t) for t in (999.0, 999.0, 800.0, 800.0, 600.0, 999.0, 900.0)]
    assert [(t.run, t.step, t.branch) for t in ticks] == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 1, 0),
        (0, 1, 1),
        (0, 2, 0),
        (1, 0, 0),
        (1, 1, 0),
    ]
    clock.reset()
    assert (clock.tick(10.0).run, clock.tick(10.0).branch) == (2, 1)


def test_schedule_plans_brute_force():
    dense_layers = frozenset({0, 3})
    schedule = Schedule(
        keep=0.5, warmup_steps=2, dense_layers=dense_layers, keep_schedule={4: 0.3, 6: 0.1}
    )
    for step in range(9):
        for layer in range(5):
            plan = schedule.plan(step, layer)
            assert plan.dense == (step < 2 or layer in dense_layers)
            if not plan.dense:
                assert plan.keep == (0.5 if step < 4 else 0.3 if step < 6 else 0.1)


def test_keep_schedule_function_is_checked():
    schedule = Schedule(keep=0.5, keep_schedule=lambda step: 1.0 / (step + 1))
    assert schedule.plan(3, 0).keep == 0.25
    with pytest.raises(ValueError, match=r"keep_schedule\(0\) must be in \(0, 1\]"):
        Schedule(keep=0.5, keep_schedule=lambda step: 2.0).plan(0, 0)


def test_dense_schedule_is_observable_with_guidance_as_two_calls():
    pipe = TinyPipeline(wan(num_layers=3))
    handle = apply(pipe, "topk+uta", keep=0.5, warmup_steps=2, dense_layers=[1])
    pipe(num_inference_steps=4, branches=2)
    calls = handle.calls
    assert len(calls) == 4 * 2 * 3
    seen = {(c.step, c.branch, c.layer): (c.dense, c.reason, c.keep) for c in calls}
    for step in range(4):
        for branch in range(2):
            for layer in range(3):
                expected = (
                    (True, "warmup", None)
                    if step < 2
                    else (True, "dense layer", None)
                    if layer == 1
                    else (False, "sparse", 0.5)
                )
                assert seen[(step, branch, layer)] == expected
    assert [c.timestep for c in calls[::6]] == [1000.0, 750.0, 500.0, 250.0]
    handle.remove()


def test_keep_schedule_over_steps_reaches_the_attention(monkeypatch):
    keeps = []

    def recording(bound, q, k, v, **kwargs):
        keeps.append(bound.keep)
        return real_run(bound, q, k, v, **kwargs)

    monkeypatch.setattr(runtime_module, "run_method", recording)
    pipe = TinyPipeline(wan(num_layers=1))
    with apply(pipe, "topk+uta", keep=0.5, warmup_steps=1, keep_schedule={2: 0.3, 3: 0.1}):
        pipe(num_inference_steps=4, branches=1)
    assert keeps == [0.5, 0.3, 0.1]


def test_a_new_generation_restarts_the_step_count():
    pipe = TinyPipeline(wan(num_layers=1))
    with apply(pipe, "topk+uta", keep=0.5, warmup_steps=1) as handle:
        pipe(num_inference_steps=2, branches=1)
        pipe(num_inference_steps=2, branches=1)
    assert [(c.run, c.step, c.dense) for c in handle.calls] == [
        (0, 0, True),
        (0, 1, False),
        (1, 0, True),
        (1, 1, False),
    ]
    handle.reset()
    assert handle.calls == ()


@dataclasses.dataclass(frozen=True)
class StatefulTopK(TopK):
    """TopK that asks for per-layer state, standing in for SVG2/DFSAttn in these tests."""

    def new_state(self) -> dict:
        return {"calls": 0}


@pytest.fixture
def stateful(monkeypatch):
    """Register ``stateful-topk`` for one test and record the state each call receives."""
    entry = Entry("stateful-topk", StatefulTopK, Granularity.TOKEN, "test")
    monkeypatch.setitem(registry._selections, "stateful-topk", entry)
    received = []

    def recording(bound, q, k, v, *, state=None, **kwargs):
        assert state is not None, "a stateful method must receive its state"
        state["calls"] += 1
        received.append(state)
        return real_run(bound, q, k, v, state=None, **kwargs)

    monkeypatch.setattr(runtime_module, "run_method", recording)
    return received


def test_state_per_layer_and_branch_with_guidance_as_two_calls(stateful):
    pipe = TinyPipeline(wan(num_layers=2))
    with apply(pipe, "stateful-topk+uta", keep=0.5, warmup_steps=1) as handle:
        pipe(num_inference_steps=3, branches=2)
        keys = list(handle.states)
        assert keys == [StateKey(0, layer, branch) for layer in (0, 1) for branch in (0, 1)]
        # two sparse steps: every (layer, branch) state saw exactly its own two calls
        assert all(handle.states[key]["calls"] == 2 for key in keys)
        assert len({id(s) for s in stateful}) == 4
        pipe(num_inference_steps=3, branches=2)
        assert all(handle.states[key]["calls"] == 2 for key in keys)
    assert len({id(s) for s in stateful}) == 8


def test_state_with_guidance_as_a_batch_of_two(stateful):
    model = cogvideox()
    with apply(model, "stateful-topk+uta", keep=0.5) as handle:
        for t in (900.0, 800.0):
            run(model, cogvideox_inputs(t, batch=2))
        assert list(handle.states) == [StateKey(0, 0, 0), StateKey(0, 1, 0)]
        assert [handle.states[key]["calls"] for key in handle.states] == [2, 2]


def test_stateless_methods_get_no_state(monkeypatch):
    def recording(bound, q, k, v, **kwargs):
        assert kwargs["state"] is None
        return real_run(bound, q, k, v, **kwargs)

    monkeypatch.setattr(runtime_module, "run_method", recording)
    model = wan()
    with apply(model, "topk+uta", keep=0.5) as handle:
        run(model, wan_inputs(700.0))
        assert len(handle.states) == 0


def test_tensor_timestep_per_token_uses_its_largest_value():
    # Wan2.2 TI2V passes one timestep per token, 0 for the conditioning frame
    model = wan(num_layers=1)
    inputs = wan_inputs(700.0)
    inputs["timestep"] = torch.tensor([[0.0] * 16 + [700.0] * 32])
    with apply(model, "topk+uta", keep=0.5) as handle:
        run(model, inputs)
    assert handle.calls[0].timestep == 700.0
