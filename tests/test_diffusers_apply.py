"""apply()/remove() on tiny random-weight Wan, HunyuanVideo and CogVideoX transformers."""

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_tiny import (
    CASES,
    TinyPipeline,
    one_thread,  # noqa: F401
    run,
    wan,
    wan_i2v_inputs,
    wan_inputs,
)
from tailattn.integrations.diffusers import apply
from tailattn.integrations.diffusers.processors import TailProcessor

IDS = [case.name for case in CASES]

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_change(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the whole model output."""
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize(("method", "keep"), [("full", None), ("topk+uta", 1.0), ("topk", 1.0)])
def test_keep_one_equals_the_stock_model(case, method, keep):
    model = case.make()
    inputs = case.inputs(700.0)
    stock = run(model, inputs)
    with apply(model, method, keep=keep) as handle:
        patched = run(model, inputs)
    assert len(handle.calls) == case.n_layers
    assert all(call.dense == (method == "full") for call in handle.calls)
    torch.testing.assert_close(patched, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sparse_changes_the_output_a_bounded_amount_and_remove_restores_it(case):
    model = case.make()
    inputs = case.inputs(700.0)
    stock = run(model, inputs)
    handle = apply(model, "topk+uta", keep=0.25)
    sparse = run(model, inputs)
    handle.remove()
    restored = run(model, inputs)
    change = rel_change(sparse, stock)
    assert torch.isfinite(sparse).all()
    assert 1e-4 < change < 0.1
    assert torch.equal(restored, stock)
    assert not handle.active


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_uta_changes_the_output_less_than_dropping_the_tail(case):
    # Dropping the tail renormalizes the kept keys; UTA puts the dropped mass back (Eq. 13-14)
    model = case.make()
    inputs = case.inputs(700.0)
    stock = run(model, inputs)
    errors = {}
    for method in ("topk", "topk+uta"):
        with apply(model, method, keep=0.25):
            errors[method] = rel_change(run(model, inputs), stock)
    assert errors["topk+uta"] < errors["topk"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_remove_puts_the_original_processor_objects_back(case):
    model = case.make()
    from tailattn.integrations.diffusers.models import kind_of

    modules = kind_of(model).attention_modules(model)
    before = [attn.processor for attn in modules]
    handle = apply(model, "topk+uta", keep=0.5, layers=[1])
    assert modules[0].processor is before[0]
    assert isinstance(modules[1].processor, TailProcessor)
    assert modules[1].processor.stock is before[1]
    handle.remove()
    handle.remove()
    assert all(attn.processor is p for attn, p in zip(modules, before, strict=True))
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_wan_i2v_keep_one_equals_stock_and_sparse_differs():
    model = wan(i2v=True)
    inputs = wan_i2v_inputs(700.0)
    stock = run(model, inputs)
    with apply(model, "topk+uta", keep=1.0):
        torch.testing.assert_close(run(model, inputs), stock, rtol=1e-5, atol=1e-5)
    with apply(model, "topk+uta", keep=0.25):
        assert rel_change(run(model, inputs), stock) > 1e-4


def test_wan_cross_attention_stays_stock():
    model = wan()
    cross = [block.attn2.processor for block in model.blocks]
    with apply(model, "topk+uta", keep=0.5):
        assert all(b.attn2.processor is p for b, p in zip(model.blocks, cross, strict=True))
        assert all(isinstance(b.attn1.processor, TailProcessor) for b in model.blocks)


def test_unpatched_layers_run_stock_and_are_not_logged():
    model = wan()
    inputs = wan_inputs(700.0)
    with apply(model, "topk+uta", keep=0.25, layers=[1]) as handle:
        run(model, inputs)
    assert [call.layer for call in handle.calls] == [1]


def test_fused_wan_projections_give_the_same_output():
    model = wan()
    inputs = wan_inputs(700.0)
    stock = run(model, inputs)
    for block in model.blocks:
        block.attn1.fuse_projections()
    with apply(model, "topk+uta", keep=1.0):
        fused = run(model, inputs)
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5)


def test_pipeline_with_two_transformers_patches_both_and_shares_the_step_count():
    high, low = wan(seed=0), wan(seed=1)
    pipe = TinyPipeline(high, low, boundary=500.0)
    with apply(pipe, "topk+uta", keep=0.5, warmup_steps=1) as handle:
        pipe(num_inference_steps=4, branches=1)
    assert handle.models == (high, low)
    steps = {(call.model, call.step) for call in handle.calls}
    # t = 1000, 750, 500 run on the high-noise model; t = 250 on the low-noise one
    assert steps == {(0, 0), (0, 1), (0, 2), (1, 3)}


def test_handle_as_context_manager_removes_on_error():
    model = wan()
    stock = run(model, wan_inputs(700.0))
    with pytest.raises(RuntimeError, match="boom"), apply(model, "topk+uta", keep=0.25):
        raise RuntimeError("boom")
    assert torch.equal(run(model, wan_inputs(700.0)), stock)


# --- bad input -------------------------------------------------------------------------------


def test_unsupported_model_class_is_named():
    with pytest.raises(TypeError, match=r"does not support Linear.*WanTransformer3DModel"):
        apply(torch.nn.Linear(2, 2), "topk+uta", keep=0.5)


def test_not_a_model_or_pipeline():
    with pytest.raises(TypeError, match="expected a diffusers transformer"):
        apply("wan", "topk+uta", keep=0.5)


def test_pipeline_without_a_transformer():
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8,),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
    )
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match=r"DDPMPipeline has no transformer.*unet"):
        apply(pipe, "topk+uta", keep=0.5)


def test_pipeline_whose_transformer_is_none():
    with pytest.raises(ValueError, match="transformer=None"):
        apply(TinyPipeline(None), "topk+uta", keep=0.5)


@pytest.mark.parametrize("argument", ["layers", "dense_layers"])
def test_layer_index_out_of_range(argument):
    with pytest.raises(ValueError, match=rf"{argument} has layer indices \[2\] out of range"):
        apply(wan(num_layers=2), "topk+uta", keep=0.5, **{argument: [0, 2]})


@pytest.mark.parametrize("value", [1, "0", None])
def test_dense_layers_must_be_a_collection(value):
    with pytest.raises(TypeError, match="dense_layers must be a collection of layer indices"):
        apply(wan(), "topk+uta", keep=0.5, dense_layers=value)


def test_negative_layer_index():
    with pytest.raises(ValueError, match="layers: expected a non-negative integer"):
        apply(wan(), "topk+uta", keep=0.5, layers=[-1])


def test_applying_twice_without_removing():
    model = wan()
    handle = apply(model, "topk+uta", keep=0.5)
    with pytest.raises(ValueError, match=r"already applied.*handle.remove\(\)"):
        apply(model, "topk", keep=0.5)
    handle.remove()
    apply(model, "topk", keep=0.5).remove()


def test_foreign_processor_is_refused_where_it_would_be_replaced():
    model = wan()
    model.blocks[1].attn1.set_processor(object())
    with pytest.raises(ValueError, match="layer 1 of WanTransformer3DModel uses object"):
        apply(model, "topk+uta", keep=0.5)
    apply(model, "topk+uta", keep=0.5, layers=[0]).remove()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "nope"}, ValueError, "unknown selection 'nope'"),
        ({"method": "topk", "keep": 1.5}, ValueError, r"keep must be in \(0, 1\]"),
        ({"method": "topp", "keep": 0.5}, ValueError, "takes no parameter 'keep'"),
        ({"method": "topk", "keep": 0.5, "warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"method": "topk", "keep": 0.5, "keep_schedule": {3: 2.0}}, ValueError, "keep_sched"),
        ({"method": "topk", "keep": 0.5, "keep_schedule": [0.3]}, TypeError, "keep_schedule"),
    ],
)
def test_bad_method_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        apply(wan(), **kwargs)


def test_a_failed_apply_leaves_the_model_untouched():
    model = wan()
    before = [block.attn1.processor for block in model.blocks]
    with pytest.raises(ValueError):
        apply(model, "topk", keep=0.5, dense_layers=[5])
    assert [block.attn1.processor for block in model.blocks] == before
    assert not model._forward_pre_hooks


def test_calling_a_block_outside_the_transformer_forward():
    model = wan()
    with apply(model, "topk+uta", keep=0.5):
        attn = model.blocks[0].attn1
        with pytest.raises(ValueError, match="called outside its transformer's forward"):
            attn(torch.randn(1, 48, 128))


def test_context_parallel_attention_is_refused():
    model = wan()
    model.blocks[0].attn1.processor._parallel_config = object()
    with pytest.raises(ValueError, match="context-parallel attention"):
        apply(model, "topk+uta", keep=0.5)


def test_transformer_called_without_a_timestep():
    model = wan()
    inputs = wan_inputs(700.0)
    inputs["timestep"] = None
    with apply(model, "topk+uta", keep=0.5), pytest.raises(ValueError, match="usable timestep"):
        run(model, inputs)


@pytest.mark.parametrize(
    "method", ["full", "topp+uta", "threshold", "rectified", "blasst", "recall"]
)
def test_methods_without_a_budget_apply_with_the_default_keep(method):
    model = wan(num_layers=1)
    with apply(model, method) as handle:  # keep="default": nothing for these methods
        run(model, wan_inputs(700.0))
    assert handle.calls[0].keep is None
    with pytest.raises(ValueError, match="takes no parameter 'keep'"):
        apply(model, method, keep=0.1)


def test_budgeted_methods_get_the_default_keep_and_explicit_none_means_none():
    model = wan(num_layers=1)
    with apply(model, "block-topk+uta") as handle:
        run(model, wan_inputs(700.0))
    assert handle.calls[0].keep == 0.1
    with apply(model, "dfs(warmup=0)+uta", keep=None) as handle:  # DFSAttn's own keeps
        run(model, wan_inputs(700.0))
    assert handle.calls[0].keep is None
    with pytest.raises(ValueError, match="keep must be a number"):
        apply(model, "block-topk+uta", keep="lots")


def test_the_default_method_is_block_topk_uta_at_keep_0_1():
    model = wan(num_layers=1)
    with apply(model) as handle:
        run(model, wan_inputs(700.0))
    assert handle.method == "block-topk+uta"
    assert [(c.dense, c.keep) for c in handle.calls] == [(False, 0.1)]


def test_svg2_treats_each_batch_item_alone_inside_a_model():
    # guidance as a batch of 2 with the same input twice: both items must come out the same
    model = wan(num_layers=2)
    one = wan_inputs(700.0, frames=3, height=16, width=16)
    two = {key: torch.cat([value, value]) for key, value in one.items()}
    with apply(model, "svg2(block_q=16, block_k=16)+uta", keep=0.3):
        out = run(model, two)
    assert torch.equal(out[0], out[1])
