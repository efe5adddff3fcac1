"""Tiny Wan runs for test_diffusers_parallel.py: on one process, and on two gloo processes under
diffusers' Ulysses context parallelism (``ulysses_degree=2``) on the CPU.

diffusers 0.42's ``enable_parallelism`` places each rank on ``rank % torch.accelerator.
device_count()``, which divides by zero on a machine without an accelerator. A worker reads
the device count as 1, so diffusers builds a CPU device mesh over the gloo group; everything
else is diffusers' own: the config it hands the processors, the hooks that split the sequence
and gather the output, its Ulysses attention on the dense path. Import after
``pytest.importorskip("diffusers")``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, WanTransformer3DModel

import diffusers_tiny
from tailattn.integrations.diffusers import apply
from tailattn.integrations.diffusers.parallel import Ulysses

HEADS, HEAD_DIM, LAYERS = 4, 32, 3
STEPS, BRANCHES = 3, 2
SCHEDULE = {"warmup_steps": 1, "dense_layers": (0,)}
"""Step 0 dense, layer 0 dense: the dense path under Ulysses runs too."""

METHODS: dict[str, tuple[str, float | None]] = {
    "block-topk+uta": ("block-topk(block_q=16, block_k=16)+uta", 0.25),
    "svg2+uta": (
        "svg2(q_clusters=8, k_clusters=8, iterations=5, block_q=16, block_k=16)+uta",
        0.25,
    ),
    "dfs+uta": ("dfs(warmup=1, rebuild=1, keeps=0.5, tile=4, block_q=16, block_k=16)+uta", None),
    "full": ("full", None),
}
"""Name -> (spec, keep): two stateless, two stateful (SVG2's centroids, DFSAttn's mask cache)."""

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "multi_gpu_wan.py"


def wan(heads: int = HEADS, seed: int = 0) -> WanTransformer3DModel:
    """A three-layer Wan with ``heads`` heads of dimension 32."""
    return diffusers_tiny.wan(num_layers=LAYERS, seed=seed, heads=heads, head_dim=HEAD_DIM)


def inputs(timestep: float, branch: int = 0) -> dict[str, Any]:
    """Latents of grid (3, 8, 8): 192 video tokens; the branch scales the text."""
    gen = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 3, 16, 16, generator=gen),
        "timestep": torch.full((1,), timestep),
        "encoder_hidden_states": torch.randn(1, 7, 32, generator=gen) * (1 + branch),
        "return_dict": False,  # diffusers' output gather hook takes tensors only
    }


def forward(model: torch.nn.Module, timestep: float = 700.0, branch: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(timestep, branch))[0]


def generate(model: torch.nn.Module, name: str) -> dict[str, Any]:
    """A run of STEPS steps of BRANCHES calls with method ``name``: the outputs, the call log,
    the keys of the per-layer states and the head count of SVG2's centroids."""
    spec, keep = METHODS[name]
    outputs = []
    with apply(model, spec, keep=keep, **SCHEDULE) as handle:
        for step in range(STEPS):
            for branch in range(BRANCHES):
                outputs.append(forward(model, 1000.0 - 100 * step, branch))
    return {
        "outputs": outputs,
        "calls": [dataclasses.astuple(call) for call in handle.calls],
        "states": sorted(dataclasses.astuple(key) for key in handle.states),
        "centroid_heads": {
            state.q_centroids.shape[1]
            for state in handle.states.values()
            if getattr(state, "q_centroids", None) is not None
        },
    }


def error_of(action: Callable[[], object]) -> str:
    """The message of the ValueError that ``action`` raises ('' when it raises none)."""
    try:
        action()
    except ValueError as err:
        return str(err)
    return ""


def enable(model: torch.nn.Module, degree: int) -> None:
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))


def exchange(rank: int, world: int) -> dict[str, bool]:
    """Ulysses.to_heads / to_tokens on a known (B, N, H, D) tensor cut as diffusers cuts it."""
    x = torch.randn(2, 6 * world, HEADS, 3, generator=torch.Generator().manual_seed(0))
    mine = x.chunk(world, dim=1)[rank]
    ulysses = Ulysses(None, dist.group.WORLD, world)
    q, v = ulysses.to_heads(mine, 2 * mine)
    heads = slice(rank * HEADS // world, (rank + 1) * HEADS // world)
    return {
        "to_heads": torch.equal(q, x[:, :, heads]) and torch.equal(v, 2 * x[:, :, heads]),
        "to_tokens": torch.equal(ulysses.to_tokens(q), mine),
    }


def late_enable(world: int) -> dict[str, Any]:
    """apply() first, enable_parallelism() after: the error, then the stock model's output
    after handle.remove()."""
    model = wan()
    handle = apply(model, "block-topk(block_q=16, block_k=16)+uta", keep=0.25)
    enable(model, world)
    error = error_of(lambda: forward(model))
    handle.remove()
    return {"error": error, "after_remove": forward(model)}


def load_script() -> ModuleType:
    """scripts/multi_gpu_wan.py as a module."""
    module_spec = importlib.util.spec_from_file_location("multi_gpu_wan", SCRIPT)
    assert module_spec is not None and module_spec.loader is not None
    module = sys.modules["multi_gpu_wan"] = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def script(world: int, out: Path) -> dict[str, Any]:
    """scripts/multi_gpu_wan.py on the CPU with its two-layer Wan."""
    module = load_script()
    args = module.parse_args(
        ["--model", "wan-tiny", "--warmup", "0", "--reps", "1", "--json", str(out)]
    )
    result = module.measure(args, "cpu", enable)
    if dist.get_rank() != 0:
        return {"result": result}
    return {"result": result, "table": module.publish(result, out), "json": out.read_text()}


def rank_results(rank: int, world: int, out: Path) -> dict[str, Any]:
    """Everything a rank computes (the tests compare it with one process)."""
    results: dict[str, Any] = {"exchange": exchange(rank, world)}
    model = wan()
    enable(model, world)
    for name in METHODS:
        results[name] = generate(model, name)
    with apply(model, "full") as handle:
        results["capture"] = error_of(lambda: handle.add_observer(None))  # type: ignore[arg-type]
    results["late_enable"] = late_enable(world)
    results["script"] = script(world, out / "multi_gpu_wan.json")
    return results


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank: a gloo process group (collectives time out after 60 s instead of hanging),
    the device count read as 1 (module docstring), :func:`rank_results` saved to ``out``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    torch.accelerator.device_count = lambda: 1
    try:
        torch.save(rank_results(rank, world, Path(out)), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, out: Path) -> list[dict[str, Any]]:
    """:func:`worker` on ``world`` spawned processes; their results, by rank."""
    init_file = str(out / "rendezvous")  # a new file: the gloo store of this run
    torch.multiprocessing.spawn(worker, args=(world, init_file, str(out)), nprocs=world)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
