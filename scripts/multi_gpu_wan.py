"""One Wan transformer step on one GPU and on P GPUs of one host (diffusers' Ulysses), dense and
sparse (issue 18).

    torchrun --nproc_per_node=2 scripts/multi_gpu_wan.py --json multi_gpu_wan.json

Every rank builds the model of ``tailattn.bench.e2e.MODELS[--model]`` (default Wan2.1-T2V-14B at
720p: 40 heads, 75,600 video tokens) with random bf16 weights, made equal on all ranks by a
broadcast from rank 0, and times one transformer step (one forward at batch 1, median of
``--reps`` after ``--warmup`` calls, timesteps decreasing call by call) four ways:

1. 1 GPU dense: the stock processors (every rank on its own GPU at once; rank 0's time);
2. 1 GPU sparse: ``apply(model, --method, keep=--keep)``, every layer sparse;
3. P GPUs dense: ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))``;
4. P GPUs sparse: the same model, then ``apply`` (tailattn's Ulysses path).

Check: on one input at timestep 999, the relative L2 distance ``||a - b|| / ||b||`` of the P-GPU
sparse output a to the 1-GPU sparse output b must stay within ``2 g + --tolerance``, g being the
same distance between the P-GPU and 1-GPU dense outputs (the bf16 rounding that the sharded
linear layers add, which the sparse path inherits). Rank 0 prints a markdown table and writes
the JSON report to ``--json``; the exit status is 1 when the check fails. NVLink multicast
stays off (``NCCL_NVLS_ENABLE=0``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tailattn._files import check_writable, write_text_atomic
from tailattn.bench.e2e import MODELS, ModelSpec, time_steps

Enable = Callable[[torch.nn.Module, int], None]
"""Turns on Ulysses context parallelism of degree P on a transformer."""


@dataclass(frozen=True)
class Row:
    """One timed configuration: its GPU count, method and median seconds per step."""

    setup: str
    gpus: int
    method: str
    keep: float | None
    seconds: float


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    wan = sorted(name for name, spec in MODELS.items() if spec.family == "wan")
    parser.add_argument("--model", default="wan-14b-720p", choices=wan)
    parser.add_argument("--method", default="block-topk+uta", help="tailattn method spec")
    parser.add_argument("--keep", type=float, default=0.1, help="keep ratio of the method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--reps", type=int, default=3, help="timed calls (median)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-2,
        help="the check's limit: 2 x the dense gap + this (relative L2)",
    )
    parser.add_argument("--json", type=Path, required=True, help="report file (rank 0 writes)")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.reps < 1:
        parser.error("--warmup must be >= 0 and --reps >= 1")
    try:
        check_writable(args.json, "the report")  # before the long run, not after it
    except ValueError as err:
        parser.error(str(err))
    return args


def enable_ulysses(model: torch.nn.Module, degree: int) -> None:
    """diffusers' own Ulysses context parallelism over all ranks."""
    from diffusers import ContextParallelConfig

    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))


def build(spec: ModelSpec, device: str) -> torch.nn.Module:
    """The model with random bf16 weights, the same on every rank (rank 0's)."""
    model = spec.build(device, torch.bfloat16)
    for tensor in (*model.parameters(), *model.buffers()):
        dist.broadcast(tensor.data, src=0)
    return model


def forward(model: torch.nn.Module, spec: ModelSpec, device: str) -> torch.Tensor:
    """The output of one step at timestep 999 on the seeded inputs (the same on every rank)."""
    with torch.no_grad():
        return model(**spec.inputs(device, torch.bfloat16, 999.0))[0].float()


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` over the whole tensor."""
    return float((a - b).norm() / b.norm())


def _slowest(seconds: float, device: str) -> float:
    """The largest of every rank's ``seconds`` (a parallel step takes as long as its slowest
    rank)."""
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def measure(args: argparse.Namespace, device: str, enable: Enable = enable_ulysses) -> dict:
    """The four timings and the check on every rank (module docstring); the report."""
    from tailattn.integrations.diffusers import apply

    spec, world = MODELS[args.model], dist.get_world_size()
    if world < 2:
        raise ValueError(f"run on two or more processes (torchrun --nproc_per_node=2), got {world}")
    model = build(spec, device)
    rows, outputs = [], {}

    def step(setup: str, gpus: int, method: str, keep: float | None) -> None:
        seconds = time_steps(model, spec, device, args.warmup, args.reps)
        if gpus > 1:
            seconds = _slowest(seconds, device)
        rows.append(Row(setup, gpus, method, keep, seconds))
        outputs[setup] = forward(model, spec, device)  # timestep 999 again: a new run

    for gpus, label in ((1, "1 GPU"), (world, f"{world} GPUs")):
        if gpus > 1:
            enable(model, world)
        step(f"{label} dense", gpus, "dense", None)
        with apply(model, args.method, keep=args.keep) as handle:
            step(f"{label} sparse", gpus, handle.method, args.keep)
    return report(args, rows, outputs, world)


def report(
    args: argparse.Namespace, rows: list[Row], outputs: dict[str, torch.Tensor], world: int
) -> dict[str, Any]:
    """Timings, speedups against the issue's targets, and the check of the sparse output."""
    import diffusers

    seconds = {row.setup: row.seconds for row in rows}
    one, many = "1 GPU", f"{world} GPUs"
    dense_gap = distance(outputs[f"{many} dense"], outputs[f"{one} dense"])
    sparse_gap = distance(outputs[f"{many} sparse"], outputs[f"{one} sparse"])
    limit = 2 * dense_gap + args.tolerance
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "date": datetime.date.today().isoformat(),
        "device": f"{world} x {device}",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "model": args.model,
        "description": MODELS[args.model].description,
        "method": args.method,
        "keep": args.keep,
        "rows": [asdict(row) for row in rows],
        "speedups": {
            f"{many} sparse vs {one} sparse (target >= 1.8)": seconds[f"{one} sparse"]
            / seconds[f"{many} sparse"],
            f"{many} sparse vs {many} dense (target >= 2.2)": seconds[f"{many} dense"]
            / seconds[f"{many} sparse"],
            f"{many} dense vs {one} dense": seconds[f"{one} dense"] / seconds[f"{many} dense"],
            f"{one} sparse vs {one} dense": seconds[f"{one} dense"] / seconds[f"{one} sparse"],
        },
        "check": {
            "sparse_vs_one_gpu": sparse_gap,
            "dense_vs_one_gpu": dense_gap,
            "sparse_vs_dense_one_gpu": distance(outputs[f"{one} sparse"], outputs[f"{one} dense"]),
            "limit": limit,
            "passed": sparse_gap <= limit,
        },
    }


def to_markdown(result: dict[str, Any]) -> str:
    """The report as a markdown table with its speedups and check."""
    dense = {row["gpus"]: row["seconds"] for row in result["rows"] if row["method"] == "dense"}
    lines = [
        f"### {result['description']}: one step, {result['device']}, {result['date']}",
        "",
        "| setup | method | keep | s / step | vs 1 GPU dense | vs dense, same GPUs |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        keep = "-" if row["method"] == "dense" else f"{row['keep']:g}"
        lines.append(
            f"| {row['setup']} | {row['method']} | {keep} | {row['seconds']:.3f} | "
            f"{dense[1] / row['seconds']:.2f}x | {dense[row['gpus']] / row['seconds']:.2f}x |"
        )
    lines.append("")
    lines += [f"- {name}: {value:.2f}x" for name, value in result["speedups"].items()]
    check = result["check"]
    verdict = "passed" if check["passed"] else "FAILED"
    lines.append(
        f"- check {verdict}: sparse output vs 1 GPU {check['sparse_vs_one_gpu']:.2e} (limit "
        f"{check['limit']:.2e} = 2 x dense {check['dense_vs_one_gpu']:.2e} + tolerance); sparse "
        f"vs dense on 1 GPU {check['sparse_vs_dense_one_gpu']:.2e}"
    )
    return "\n".join(lines) + "\n"


def publish(result: dict[str, Any], path: Path) -> str:
    """Write the JSON report (temporary name, then rename); the markdown table."""
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    return to_markdown(result)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - needs two GPUs
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ or not torch.cuda.is_available():
        sys.exit("needs CUDA GPUs and torchrun: torchrun --nproc_per_node=2 " + " ".join(sys.argv))
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    try:
        result = measure(args, "cuda")
        if dist.get_rank() == 0:
            print(publish(result, args.json), flush=True)
    finally:
        dist.destroy_process_group()
    return 0 if result["check"]["passed"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
