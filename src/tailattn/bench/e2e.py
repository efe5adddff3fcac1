"""End-to-end speed: one transformer step of a diffusers video model, dense and sparse.

The transformers are built from their published configurations with **random bf16 weights**
(the speed of a step does not depend on the weights; no checkpoint is loaded): Wan2.1-T2V-1.3B
at 480p (32,760 video tokens), Wan2.1-T2V-14B at 720p (75,600) and a HunyuanVideo-sized model
(``HunyuanVideoTransformer3DModel()`` defaults, 33 frames of 544 x 960: 18,360 video tokens and
256 text tokens). One step is one forward at batch 1 (one guidance branch), timed with CUDA
events after warm-up calls, median of ``reps``; each call gets a new, smaller timestep so that
stateful methods see consecutive diffusion steps (warm).

Per model: dense with the stock processors (diffusers' default SDPA backend, and cuDNN), then
every (method, keep) through ``apply(model, method, keep=keep)`` with every layer sparse, eager
and with ``compile_repeated_blocks()``. Beside each speedup: the attention-limited ceiling,

    ceiling = dense step - L t_attn + L t_attn d,

with t_attn the dense SDPA time of one layer's self-attention at the model's shape, L the number
of layers and d the method's measured density (video-video pairs; text pairs stay dense for
joint attention), i.e. the step time if only attention got cheaper, in proportion to its density.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .calls import parse_methods

WAN_COMMON = {
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}


@dataclass(frozen=True)
class ModelSpec:
    """A transformer to time: its class, configuration, latent shape (C, F, H, W) and text."""

    family: str
    config: dict[str, Any]
    latents: tuple[int, int, int, int]
    text_tokens: int
    description: str

    def build(self, device: str, dtype: torch.dtype) -> torch.nn.Module:
        """The transformer with random weights, built directly on ``device`` in ``dtype``."""
        import diffusers

        cls = {
            "wan": diffusers.WanTransformer3DModel,
            "hunyuan": diffusers.HunyuanVideoTransformer3DModel,
        }[self.family]
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = cls(**self.config)
        finally:
            torch.set_default_dtype(previous)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        # as from_pretrained(torch_dtype=dtype) does: the modules the class keeps in float32
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        for module_name, module in model.named_modules():
            if any(part in keep for part in module_name.split(".")):
                module.float()
        return model

    def inputs(self, device: str, dtype: torch.dtype, timestep: float) -> dict[str, Any]:
        gen = torch.Generator(device=device).manual_seed(0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

        step = torch.tensor([timestep], device=device)
        text = randn(1, self.text_tokens, 4096)
        if self.family == "wan":
            return {"hidden_states": randn(1, *self.latents), "timestep": step,
                    "encoder_hidden_states": text, "return_dict": False}  # fmt: skip
        return {
            "hidden_states": randn(1, *self.latents),
            "timestep": step,
            "encoder_hidden_states": text,
            "encoder_attention_mask": torch.ones(1, self.text_tokens, device=device),
            "pooled_projections": randn(1, 768),
            "guidance": torch.tensor([6000.0], device=device, dtype=dtype),
            "return_dict": False,
        }

    @property
    def heads(self) -> int:
        return self.config.get("num_attention_heads", 24)

    @property
    def head_dim(self) -> int:
        return self.config.get("attention_head_dim", 128)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Both families patch (1, 2, 2): frames stay, height and width halve."""
        _, f, h, w = self.latents
        return f, h // 2, w // 2

    @property
    def video_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def joint_text(self) -> int:
        """Text tokens inside self-attention (joint attention); Wan attends to text in attn2."""
        return self.text_tokens if self.family == "hunyuan" else 0


MODELS: dict[str, ModelSpec] = {
    "wan-1.3b-480p": ModelSpec(
        "wan",
        {**WAN_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
        (16, 21, 60, 104),
        512,
        "Wan2.1-T2V-1.3B, 480p, 81 frames (32,760 video tokens)",
    ),
    "wan-14b-720p": ModelSpec(
        "wan",
        {**WAN_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
        (16, 21, 90, 160),
        512,
        "Wan2.1-T2V-14B, 720p, 81 frames (75,600 video tokens)",
    ),
    "hunyuan-544p": ModelSpec(
        "hunyuan",
        {},
        (16, 9, 68, 120),
        256,
        "HunyuanVideo-sized (13B defaults), 33 frames of 544 x 960 (18,360 video + 256 text)",
    ),
    "wan-tiny": ModelSpec(
        "wan",
        {
            **WAN_COMMON,
            "num_attention_heads": 2,
            "attention_head_dim": 32,
            "ffn_dim": 64,
            "num_layers": 2,
            "text_dim": 4096,
        },
        (16, 2, 32, 32),
        8,
        "a two-layer Wan for checking this benchmark on a CPU",
    ),
}

E2E_METHODS: tuple[tuple[str, float | None], ...] = (
    ("block-topk+drop", 0.1),
    ("block-topk+uta", 0.1),
    ("block-topk+uta", 0.2),
    ("radial+uta", 0.1),
    ("radial+uta", 0.2),
    ("dfs(warmup=0)+uta", 0.1),
    ("svg2+uta", 0.1),
    ("svg2+uta", 0.2),
    ("rectified", None),
    ("blasst+uta", None),
    ("recall+uta", None),
)


@dataclass
class StepRow:
    """One timed configuration of one model."""

    model: str
    mode: str
    method: str
    keep: float | None
    seconds: float
    density: float = 1.0
    speedup: float = 1.0
    ceiling: float = 1.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    def timed(fn: Callable[[], object]) -> float:
        if device != "cuda":
            import time

            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1000

    return timed


def time_steps(
    model: torch.nn.Module, spec: ModelSpec, device: str, warmup: int, reps: int
) -> float:
    """Median seconds of one forward; timesteps decrease call by call (consecutive steps)."""
    timed, dtype = _timer(device), next(model.parameters()).dtype
    times = []
    for i in range(warmup + reps):
        kwargs = spec.inputs(device, dtype, 999.0 - i)
        with torch.no_grad():
            seconds = timed(lambda kwargs=kwargs: model(**kwargs))
        if i >= warmup:
            times.append(seconds)
    return statistics.median(times)


def attention_seconds(spec: ModelSpec, device: str, dtype: torch.dtype, reps: int = 20) -> float:
    """Dense SDPA time of one self-attention layer at the model's shape (default backend)."""
    n = spec.video_tokens + spec.joint_text
    q, k, v = (
        torch.randn(1, spec.heads, n, spec.head_dim, device=device, dtype=dtype) for _ in range(3)
    )
    timed = _timer(device)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sdpa(q, k, v)
    return statistics.median(timed(lambda: sdpa(q, k, v)) for _ in range(reps))


def measured_density(spec: ModelSpec, method: str, keep: float | None, device: str) -> float:
    """The method's density on one random layer-shaped call (video-video pairs), then with the
    dense text pairs of joint attention folded in."""
    import tailattn

    nv, nt = spec.video_tokens, spec.joint_text
    q, k, v = (
        torch.randn(1, nv, spec.heads, spec.head_dim, device=device, dtype=torch.bfloat16)
        for _ in range(3)
    )
    _, info = tailattn.attention(
        q, k, v, method, keep=keep, grid=spec.grid, layout="bnhd", return_info=True
    )
    d = float(info["density"])
    return (d * nv * nv + 2 * nv * nt + nt * nt) / (nv + nt) ** 2


def _raise_recompile_limits() -> None:
    """Every method patches processors of the compiled blocks: allow the recompiles."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))


def run(
    name: str,
    methods: Sequence[tuple[str, float | None]] = E2E_METHODS,
    *,
    modes: Sequence[str] = ("eager", "compiled"),
    device: str = "cuda",
    warmup: int = 2,
    reps: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[StepRow]:
    """Time one step of model ``name`` dense and with every method, in every mode."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..integrations.diffusers import apply
    from ..integrations.diffusers.models import kind_of

    say = progress or (lambda _: None)
    spec = MODELS[name]
    dtype = torch.bfloat16
    say(f"{name}: building {spec.description} with random {dtype} weights")
    model = spec.build(device, dtype)
    layers = len(kind_of(model).attention_modules(model))
    t_attn = attention_seconds(spec, device, dtype)
    rows: list[StepRow] = []
    densities = {(m, k): measured_density(spec, m, k, device) for m, k in methods}
    for mode in modes:
        if mode == "compiled":
            _raise_recompile_limits()
            model.compile_repeated_blocks()
        dense = time_steps(model, spec, device, warmup, reps)
        rows.append(StepRow(name, mode, "dense (default SDPA)", None, dense))
        say(f"{name} {mode} dense: {dense:.3f} s (attention {layers} x {t_attn * 1e3:.2f} ms)")
        backend = sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if device == "cuda" else None
        with backend or contextlib.nullcontext():
            cudnn = time_steps(model, spec, device, warmup, reps)
        rows.append(StepRow(name, mode, "dense (cuDNN SDPA)", None, cudnn, speedup=dense / cudnn))
        for method, keep in methods:
            d = densities[(method, keep)]
            ceiling = dense - layers * t_attn + layers * t_attn * d
            with apply(model, method, keep=keep):
                seconds = time_steps(model, spec, device, warmup, reps)
            row = StepRow(name, mode, method, keep, seconds, d, dense / seconds, dense / ceiling)
            rows.append(row)
            say(
                f"{name} {mode} {method} keep={keep}: {seconds:.3f} s, {row.speedup:.2f}x "
                f"(ceiling {row.ceiling:.2f}x, {row.speedup / row.ceiling:.0%} of it)"
            )
    del model
    return rows


def to_markdown(rows: Sequence[StepRow], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| model | mode | method | keep | density | s / step | speedup | ceiling | of ceiling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        keep = "-" if r.keep is None else f"{r.keep:g}"
        share = f"{r.speedup / r.ceiling:.0%}" if r.ceiling != 1.0 else "-"
        lines.append(
            f"| {r.model} | {r.mode} | {r.method} | {keep} | {r.density:.3f} | {r.seconds:.3f} | "
            f"{r.speedup:.2f}x | {r.ceiling:.2f}x | {share} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:  # pragma: no cover - a GPU benchmark entry point
    parser = argparse.ArgumentParser(description="one transformer step, dense and sparse")
    parser.add_argument("--models", default="wan-1.3b-480p", help="comma list of MODELS")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--methods", default=None, help="spec@keep list, ';'-separated")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compiles first)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    methods = parse_methods(args.methods) if args.methods else E2E_METHODS
    rows: list[StepRow] = []
    for name in args.models.split(","):
        rows += run(
            name,
            methods,
            modes=args.modes.split(","),
            warmup=args.warmup,
            reps=args.reps,
            progress=print,
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump([r.as_dict() for r in rows], f, indent=1)
    print(to_markdown(rows, f"one transformer step on {torch.cuda.get_device_name()}"))


if __name__ == "__main__":  # pragma: no cover
    main()
