"""Kernel speed on the GPU: dense baselines, FlexAttention with the same mask, tailattn kernels.

All timings are CUDA-event medians from ``triton.testing.do_bench`` on random non-zero inputs,
forward only. Effective TFLOP/s counts the computed (query, key) pairs only:
``4 * d * sum over query blocks of (query rows * kept key tokens)`` per (batch, head), which for
dense attention is ``4 B H N^2 d``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..data.presets import PRESETS
from ..layout import BlockLayout


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """A preset name (:data:`tailattn.data.presets.PRESETS`) or ``B,H,N,D``."""
    if text in PRESETS:
        return PRESETS[text].bhnd
    if not re.fullmatch(r"\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*", text):
        raise ValueError(f"shape must be one of {sorted(PRESETS)} or B,H,N,D; got {text!r}")
    b, h, n, d = (int(x) for x in text.split(","))
    if min(b, h, n, d) < 1:
        raise ValueError(f"shape entries must be positive, got {text!r}")
    return b, h, n, d


@dataclass(frozen=True)
class BenchRow:
    """One timed configuration."""

    name: str
    keep: float
    tail: str
    ms: float
    tflops: float
    density: float
    vs_cudnn: float
    vs_flex: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def pair_flops(layout: BlockLayout, head_dim: int) -> float:
    """4 * d * (computed query-key pairs), summed over batch and heads."""
    b, h = layout.batch_heads
    return 4.0 * head_dim * layout.density() * b * h * layout.n_q * layout.n_k


def time_ms(fn: Callable[[], object], rep_ms: int = 200) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def run(
    shape: tuple[int, int, int, int],
    keeps: Sequence[float] = (1.0, 0.5, 0.2, 0.1),
    tails: Sequence[str] = ("drop", "uta", "blocks"),
    *,
    dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Time dense SDPA (cuDNN, flash), FlexAttention and tailattn at each keep and tail."""
    if not torch.cuda.is_available():
        raise RuntimeError("tailattn bench needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from ..kernels import block_sparse_attention
    from ..methods import registry

    say = progress or (lambda _: None)

    def add(row: BenchRow) -> None:
        rows.append(row)
        say(to_markdown([row], "").splitlines()[-1])

    b, h, n, d = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    scale = 1.0 / math.sqrt(d)
    dense_flops = 4.0 * b * h * n * n * d
    rows: list[BenchRow] = []

    def sdpa(backend: SDPBackend) -> float:
        with sdpa_kernel(backend):
            return time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))

    say("dense cuDNN")
    cudnn = sdpa(SDPBackend.CUDNN_ATTENTION)
    add(BenchRow("sdpa-cudnn", 1.0, "-", cudnn, dense_flops / cudnn / 1e9, 1.0, 1.0))
    say("dense flash")
    flash = sdpa(SDPBackend.FLASH_ATTENTION)
    add(BenchRow("sdpa-flash", 1.0, "-", flash, dense_flops / flash / 1e9, 1.0, cudnn / flash))

    flex = torch.compile(flex_attention, dynamic=False)
    for keep in keeps:
        say(f"scoring keep={keep}")
        select = registry.bind("block-topk", keep=keep, block_q=block, block_k=block).selection
        layout = select(q, k, scale=scale)
        score_ms = time_ms(lambda select=select: select(q, k, scale=scale))
        density = layout.density()
        flops = pair_flops(layout, d)
        add(BenchRow("scoring+topk", keep, "-", score_ms, 0.0, density, cudnn / score_ms))
        say(f"flex keep={keep}")
        mask = layout.to_block_mask()
        flex(q, k, v, block_mask=mask)
        flex_ms = time_ms(lambda mask=mask: flex(q, k, v, block_mask=mask))
        add(
            BenchRow("flex", keep, "drop", flex_ms, flops / flex_ms / 1e9, density, cudnn / flex_ms)
        )
        for tail in tails:
            say(f"tailattn keep={keep} tail={tail}")
            block_tail = registry.bind(f"block-topk+{tail}", keep=keep).tail

            def kernel(layout: BlockLayout = layout, block_tail: object = block_tail) -> object:
                out, lse = block_sparse_attention(q, k, v, layout, block_tail.kernel, scale)
                return block_tail.epilogue(q, k, v, layout, out, lse, scale)

            ms = time_ms(kernel)
            say(f"  kernel config: {tuned_config()}")
            add(
                BenchRow(
                    "tailattn", keep, tail, ms, flops / ms / 1e9, density, cudnn / ms, flex_ms / ms
                )
            )
    return rows


def tuned_config() -> str:
    """The autotuner's last choice for the fused kernel (for the benchmark log)."""
    from ..kernels.attention import _block_sparse_fwd_tuned

    return str(getattr(_block_sparse_fwd_tuned, "best_config", None))


def to_markdown(rows: Sequence[BenchRow], title: str) -> str:
    """A markdown table of the rows."""
    lines = [
        f"### {title}",
        "",
        "| kernel | keep | tail | density | ms | TFLOP/s | x cuDNN | x Flex |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tflops = f"{r.tflops:.0f}" if r.tflops else "-"
        flex = f"{r.vs_flex:.2f}" if r.vs_flex is not None else "-"
        cudnn = f"{r.vs_cudnn:.2f}" if r.tflops else "-"
        lines.append(
            f"| {r.name} | {r.keep:g} | {r.tail} | {r.density:.3f} | {r.ms:.3f} | {tflops} | "
            f"{cudnn} | {flex} |"
        )
    return "\n".join(lines) + "\n"
