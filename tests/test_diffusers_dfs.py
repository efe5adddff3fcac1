"""DFSAttn in a diffusers pipeline: the handle keeps one mask cache per layer and branch."""

import pytest

pytest.importorskip("diffusers")

from diffusers_tiny import TinyPipeline, one_thread, wan  # noqa: F401
from tailattn.integrations.diffusers import apply

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mask_cache_follows_the_steps_of_each_layer_and_branch():
    pipe = TinyPipeline(wan(num_layers=2))
    spec = "dfs(warmup=1, rebuild=1/3, keeps=0.5/0.25, tile=4, block_q=8, block_k=8)+uta"
    with apply(pipe, spec, keep=None) as handle:  # keep=None: DFSAttn's own keep schedule
        pipe(num_inference_steps=4, branches=2)
        assert len(handle.states) == 4
        for state in handle.states.values():
            assert [(s, a, kp) for s, a, kp in state.history] == [
                (0, "dense", None),
                (1, "rebuild", 0.5),
                (2, "reuse", 0.5),
                (3, "rebuild", 0.25),
            ]


def test_a_fixed_keep_overrides_the_keep_schedule():
    pipe = TinyPipeline(wan(num_layers=1))
    spec = "dfs(warmup=1, rebuild=2, keeps=0.5, tile=4, block_q=8, block_k=8)"
    with apply(pipe, spec, keep=0.25) as handle:
        pipe(num_inference_steps=3, branches=1)
        (state,) = handle.states.values()
        assert [a for _, a, _ in state.history] == ["dense", "rebuild", "rebuild"]
        assert [kp for *_, kp in state.history] == [None, 0.25, 0.25]


def test_the_warmup_of_apply_and_of_dfsattn_overlap_instead_of_adding_up():
    pipe = TinyPipeline(wan(num_layers=1))
    spec = "dfs(warmup=2, rebuild=2, keeps=0.5, tile=4, block_q=8, block_k=8)"
    with apply(pipe, spec, keep=None, warmup_steps=1) as handle:
        pipe(num_inference_steps=4, branches=1)
        (state,) = handle.states.values()
        # step 0 dense by the schedule, step 1 by DFSAttn's warm-up, then sparse from step 2
        assert [(s, a) for s, a, _ in state.history] == [(1, "dense"), (2, "rebuild"), (3, "reuse")]
    assert [c.dense for c in handle.calls] == [True, False, False, False]
