"""Per-call speed: one call through ``tailattn.attention`` (selection, layout, kernel and tail:
what a user pays), against dense attention in the same run.

Every method runs on the same random bf16 q, k, v of a shape preset in the (B, N, H, D) layout
diffusers passes, with the latent grid of the preset. Stateful methods are timed warm (the
state of the previous call reused, as over diffusion steps); SVG2's cold first call (50 Lloyd
steps) is timed separately on fresh states. Times are CUDA-event medians
(``triton.testing.do_bench``); the method is bound once (``registry.bind``), and the spec-string
call that binds every time is timed beside it for one method. DFSAttn is timed warm too: on the
steps between its rebuilds it reuses its mask.

Uses only the public API (``import tailattn``), so the same file can time an older checkout:
``PYTHONPATH=old/src python src/tailattn/bench/calls.py --json old.json``.

Block methods also have their selection timed alone (``select_ms``: q, k -> layout, as
``tailattn.attention`` calls it): for ``block-err`` that is its scoring (the probe product, the
ranking or the greedy search, the layout), which issue 16 bounds at 15 % of the keep-0.1 call of
``block-topk+uta``; the note of each ``block-err`` row gives that share.

On a CPU (``device="cpu"``, the tests) the times are medians of wall-clock calls and the cuDNN
and flash SDPA rows are left out.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

CALL_METHODS: tuple[tuple[str, float | None], ...] = (
    ("block-topk+drop", 0.1),
    ("block-topk+uta", 0.1),
    ("block-topk+blocks", 0.1),
    ("block-topk+moment", 0.1),
    ("block-topk+uta", 0.2),
    ("radial+uta", 0.1),
    ("window+uta", 0.1),
    ("dfs(warmup=0)+uta", 0.1),
    ("svg2+uta", 0.1),
    ("svg2+uta", 0.2),
    ("rectified", None),
    ("block-topk+drop", 0.32),  # about rectified's density
    ("blasst+uta", None),
    ("recall+uta", None),
    ("block-err(for_tail=drop)", 0.1),
    ("block-err(for_tail=drop, budget=adaptive)", 0.1),
    ("block-err+uta", 0.1),
    ("block-err(budget=adaptive)+uta", 0.1),
)
"""(spec, keep) timed by default; keep None: the method's own budget."""


SCORING_REFERENCE = ("block-topk+uta", 0.1)
"""The call whose time bounds ``block-err``'s scoring (issue 16: at most 15 % of it)."""


@dataclass(frozen=True)
class CallRow:
    """One timed call: method, keep, measured density, median ms, speedup over dense SDPA, and
    for block methods the median ms of the selection alone."""

    method: str
    keep: float | None
    density: float
    ms: float
    vs_dense: float
    note: str = ""
    select_ms: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def median_ms(fn: Callable[[], object], rep_ms: int = 200, device: str = "cuda") -> float:
    """Median ms of ``fn``: ``triton.testing.do_bench`` on CUDA, else of 3 wall-clock calls."""
    if device != "cuda":
        return sorted(event_ms(fn, device) for _ in range(3))[1]
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def event_ms(fn: Callable[[], object], device: str = "cuda") -> float:
    """One call timed with CUDA events (for calls that change state, such as a cold start);
    wall clock off CUDA."""
    if device != "cuda":
        start_s = time.perf_counter()
        fn()
        return (time.perf_counter() - start_s) * 1000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _density(method: str, keep: float | None, qkv: Sequence[torch.Tensor], grid, state) -> float:
    import tailattn

    kw: dict[str, Any] = {"grid": grid, "layout": "bnhd", "return_info": True}
    if state is not None:
        kw["state"] = state
    _, info = tailattn.attention(*qkv, method, keep=keep, **kw)
    return float(info["density"])


def _select_ms(bound: Any, qk: Sequence[torch.Tensor], grid, state, device: str) -> float | None:
    """Median ms of a block method's selection alone, called as ``tailattn.attention`` calls
    it ((B, H, N, D) views, the default scale); ``None`` for other kinds (and older checkouts)."""
    if str(getattr(getattr(bound, "granularity", None), "value", "")) != "block":
        return None
    q, k = qk
    scale = q.shape[-1] ** -0.5

    def select() -> object:
        return bound.selection(q, k, scale=scale, grid=grid, state=state)

    return median_ms(select, device=device)


def _with_scoring_share(rows: list[CallRow]) -> list[CallRow]:
    """Notes on the ``block-err`` rows: their selection time as a share of the call of
    :data:`SCORING_REFERENCE` (when both were timed)."""
    ref = next((r for r in rows if (r.method, r.keep) == SCORING_REFERENCE), None)
    if ref is None:
        return rows
    name = f"{ref.method} {ref.keep:g}"
    return [
        replace(r, note=f"selection {100 * r.select_ms / ref.ms:.0f} % of {name}")
        if r.method.startswith("block-err") and r.select_ms is not None
        else r
        for r in rows
    ]


def run(
    shape: tuple[int, int, int, int],
    grid: tuple[int, int, int],
    methods: Sequence[tuple[str, float | None]] = CALL_METHODS,
    *,
    cold_reps: int = 3,
    device: str = "cuda",
    progress: Callable[[str], None] | None = None,
) -> list[CallRow]:
    """Time dense SDPA (default; on CUDA also cuDNN and flash) and every (method, keep) per
    call, block selections also alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import tailattn

    say = progress or (lambda _: None)
    b, h, n, d = shape
    if math.prod(grid) != n:
        raise ValueError(f"grid {grid} holds {math.prod(grid)} tokens, the shape has N = {n}")
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(b, n, h, d, device=device, dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    rows: list[CallRow] = []

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)

    dense = median_ms(sdpa, device=device)
    rows.append(CallRow("dense SDPA (default backend)", None, 1.0, dense, 1.0))
    backends = (("cuDNN", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION))
    for name, backend in backends if device == "cuda" else ():
        with sdpa_kernel(backend):
            ms = median_ms(sdpa)
        rows.append(CallRow(f"dense SDPA ({name})", None, 1.0, ms, dense / ms))
    say(f"dense {dense:.3f} ms")
    bound_api = hasattr(tailattn, "BoundMethod")  # older checkouts take spec strings only
    for method, keep in methods:
        bound = tailattn.registry.bind(method, keep=keep)
        stateful = callable(getattr(bound.selection, "new_state", None))
        kw: dict[str, Any] = {"grid": grid, "layout": "bnhd"}
        if stateful:
            kw["state"] = bound.selection.new_state()
        target = bound if bound_api else method
        extra = {} if bound_api else {"keep": keep}

        def call(target=target, kw=kw, extra=extra) -> object:
            return tailattn.attention(q, k, v, target, **kw, **extra)

        call()  # compiles and autotunes the kernels, warms the state
        ms = median_ms(call, device=device)
        density = _density(method, keep, (q, k, v), grid, kw.get("state"))
        select = _select_ms(bound, (qh, kh), grid, kw.get("state"), device)
        note = "warm" if stateful else ""
        rows.append(CallRow(method, keep, density, ms, dense / ms, note, select))
        say(f"{method} keep={keep}: {ms:.3f} ms, density {density:.3f}")
        if method.startswith("svg2") and cold_reps:
            fresh = [{**kw, "state": bound.selection.new_state()} for _ in range(cold_reps)]
            cold = sorted(event_ms(functools.partial(call, kw=f), device) for f in fresh)[
                cold_reps // 2
            ]
            rows.append(CallRow(method, keep, density, cold, dense / cold, "cold: 50 Lloyd steps"))
            say(f"{method} keep={keep} cold: {cold:.3f} ms")
    first, keep = methods[0]
    ms = median_ms(
        lambda: tailattn.attention(q, k, v, first, keep=keep, grid=grid, layout="bnhd"),
        device=device,
    )
    density = _density(first, keep, (q, k, v), grid, None)
    rows.append(CallRow(first, keep, density, ms, dense / ms, "spec string, bound per call"))
    return _with_scoring_share(rows)


def parse_methods(text: str) -> tuple[tuple[str, float | None], ...]:
    """``"spec@keep;spec"`` -> ``((spec, keep), (spec, None))``: no keep, the method's own."""
    pairs = (item.strip().partition("@") for item in text.split(";") if item.strip())
    return tuple((spec.strip(), float(keep) if sep else None) for spec, sep, keep in pairs)


def to_markdown(rows: Sequence[CallRow], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| call | keep | density | ms | x dense SDPA | selection ms | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        keep = "-" if r.keep is None else f"{r.keep:g}"
        select = "-" if r.select_ms is None else f"{r.select_ms:.3f}"
        lines.append(
            f"| {r.method} | {keep} | {r.density:.3f} | {r.ms:.3f} | {r.vs_dense:.2f} | {select} "
            f"| {r.note} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:  # pragma: no cover - a GPU benchmark entry point
    parser = argparse.ArgumentParser(description="per-call speed of tailattn.attention")
    parser.add_argument("--shape", default="1,12,32760,128", help="B,H,N,D")
    parser.add_argument("--grid", default="21,30,52", help="T,H,W with T*H*W = N")
    parser.add_argument("--methods", default=None, help="spec@keep list, ';'-separated")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    grid = tuple(int(x) for x in args.grid.split(","))
    methods = parse_methods(args.methods) if args.methods else CALL_METHODS
    rows = run(shape, grid, methods, progress=print)  # type: ignore[arg-type]
    print(to_markdown(rows, f"one call, {shape} on {torch.cuda.get_device_name()}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=1)


if __name__ == "__main__":  # pragma: no cover
    main()
