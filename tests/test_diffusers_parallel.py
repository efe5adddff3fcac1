"""apply() under diffusers' Ulysses context parallelism.

Two gloo processes on the CPU run a tiny Wan under ``ContextParallelConfig(ulysses_degree=2)``
with tailattn (``ulysses_ranks.py``; one spawn for the whole module) and must give what one
process gives: the same outputs to float tolerance, the same call log, states for their own
heads. Unsupported configurations are refused by ``apply()`` before anything runs.
"""

import json
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", minversion="0.36")  # context parallelism

from diffusers import ContextParallelConfig, ParallelConfig

from diffusers_tiny import hunyuan, one_thread  # noqa: F401
from tailattn.integrations.diffusers import apply
from tailattn.integrations.diffusers.models import kind_of
from tailattn.integrations.diffusers.processors import TailProcessor
from ulysses_ranks import HEADS, METHODS, forward, generate, load_script, run_ranks, wan

WORLD = 2
SPARSE = [name for name in METHODS if name != "full"]


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    """Every method's run on one process, and the stock model's output."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = wan()
        return {"stock": forward(model), **{name: generate(model, name) for name in METHODS}}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The results of the two ranks (ulysses_ranks.rank_results)."""
    return run_ranks(WORLD, tmp_path_factory.mktemp("ulysses"))


def test_the_exchange_moves_tokens_to_heads_and_back(ranks):
    for rank in ranks:
        assert rank["exchange"] == {"to_heads": True, "to_tokens": True}


@pytest.mark.parametrize("name", list(METHODS))
def test_two_ranks_compute_what_one_process_computes(ranks, one_process, name):
    expected = one_process[name]["outputs"]
    for rank in ranks:
        assert len(rank[name]["outputs"]) == len(expected)
        for out, ref in zip(rank[name]["outputs"], expected, strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SPARSE)
def test_the_sparse_runs_differ_from_dense(one_process, name):
    # not vacuous: after the dense warm-up step the method changes the output
    last, dense = one_process[name]["outputs"][-1], one_process["full"]["outputs"][-1]
    assert (last - dense).norm() > 1e-3 * dense.norm()


@pytest.mark.parametrize("name", list(METHODS))
def test_every_rank_logs_the_calls_and_states_of_one_process(ranks, one_process, name):
    for rank in ranks:
        assert rank[name]["calls"] == one_process[name]["calls"]
        assert rank[name]["states"] == one_process[name]["states"]
    calls = one_process[name]["calls"]
    assert [(c[1], c[2], c[4]) for c in calls][:4] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)]
    assert {c[6] for c in calls} == {(3, 8, 8)}  # the full grid on every rank


def test_each_rank_keeps_states_for_its_own_heads(ranks, one_process):
    assert one_process["svg2+uta"]["centroid_heads"] == {HEADS}
    for rank in ranks:
        assert rank["svg2+uta"]["centroid_heads"] == {HEADS // WORLD}
        assert len(rank["dfs+uta"]["states"]) == 4  # 2 sparse layers x 2 branches


def test_capture_under_context_parallelism_is_refused(ranks):
    for rank in ranks:
        assert "capture under context parallelism is not supported" in rank["capture"]


def test_enable_parallelism_after_apply_is_refused_and_remove_restores_the_stock_model(
    ranks, one_process
):
    for rank in ranks:
        error = rank["late_enable"]["error"]
        assert "changed after tailattn's apply()" in error
        assert "call handle.remove(), then apply() again" in error
        # the stock processors got diffusers' config through tailattn's: Ulysses as usual
        torch.testing.assert_close(
            rank["late_enable"]["after_remove"], one_process["stock"], rtol=1e-4, atol=1e-5
        )


def test_the_two_gpu_script_runs_on_two_cpu_processes(ranks):
    result = ranks[0]["script"]["result"]
    assert [row["setup"] for row in result["rows"]] == [
        "1 GPU dense",
        "1 GPU sparse",
        "2 GPUs dense",
        "2 GPUs sparse",
    ]
    assert result["check"]["passed"], result["check"]
    assert result["check"]["sparse_vs_dense_one_gpu"] > 0
    assert "| 2 GPUs sparse | block-topk+uta | 0.1 |" in ranks[0]["script"]["table"]
    assert json.loads(ranks[0]["script"]["json"])["rows"] == result["rows"]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--reps", "0"], "--reps >= 1"),
        (["--model", "hunyuan-544p"], "invalid choice"),
        (["--json", "/no/such/dir/report.json"], "no directory /no/such/dir"),
    ],
)
def test_the_script_checks_its_arguments(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit):
        load_script().parse_args(["--json", str(tmp_path / "r.json"), *argv])
    assert words in capsys.readouterr().err


def with_config(model: torch.nn.Module, **fields: Any) -> torch.nn.Module:
    """The model with a context-parallel config on its processors, as enable_parallelism sets
    it (without a device mesh: apply() refuses these before it needs one)."""
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(**fields))
    for attn in kind_of(model).attention_modules(model):
        attn.processor._parallel_config = config
    return model


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"ring_degree": 2}, "ring_degree=2, ulysses_degree=1"),
        ({"ring_degree": 2, "ulysses_degree": 2}, "ring_degree=2, ulysses_degree=2"),
        ({"ulysses_degree": 2, "ulysses_anything": True}, "ulysses_anything=True"),
    ],
    ids=["ring", "unified", "ulysses-anything"],
)
def test_ring_unified_and_ulysses_anything_are_refused(fields, words):
    model = with_config(wan(), **fields)
    with pytest.raises(ValueError, match="tailattn supports Ulysses only") as err:
        apply(model, "block-topk+uta")
    assert words in str(err.value)
    assert "ContextParallelConfig(ulysses_degree=P)" in str(err.value)
    modules = kind_of(model).attention_modules(model)
    assert not any(isinstance(attn.processor, TailProcessor) for attn in modules)


@pytest.mark.usefixtures("one_thread")
def test_heads_not_divisible_by_the_degree_are_refused():
    model = with_config(wan(heads=3), ulysses_degree=2)
    with pytest.raises(ValueError, match="3 attention heads .* not divisible by ulysses_degree=2"):
        apply(model, "block-topk+uta")


@pytest.mark.usefixtures("one_thread")
def test_joint_attention_models_are_refused_under_context_parallelism():
    model = with_config(hunyuan(), ulysses_degree=2)
    with pytest.raises(ValueError, match="on WanTransformer3DModel only"):
        apply(model, "block-topk+uta")


@pytest.mark.usefixtures("one_thread")
def test_a_config_that_was_not_set_up_asks_for_enable_parallelism():
    model = with_config(wan(), ulysses_degree=2)
    with pytest.raises(ValueError, match=r"enable_parallelism\(config=...\) before"):
        apply(model, "block-topk+uta")
