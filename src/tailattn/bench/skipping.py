"""In-loop skipping on structured attention: BLASST and the fixed-recall threshold against dense
attention and block-topk+uta, with time, density, error and achieved recall in one run.

Data: the synthetic video attention of a preset (``tailattn.data.synthetic``, every head of
the preset, bf16 on the GPU), or one entry of a capture file (``--source FILE``, e.g. one
written by ``tailattn capture --model toy``; ``--layer`` and ``--step`` pick the entry, default the
first). Per method: the median time of one call through
``tailattn.attention``, the measured density (keys whose P.V ran; for ``recall`` also those whose
QK ran), the MSE against exact attention (our dense kernel in float32 accumulation), and for the
``drop`` runs the smallest achieved recall over all query rows, ``exp(lse_kept - lse_full)``.
Beside them, the bounds of issue 15: BLASST's time against ``(0.55 + 0.45 density)`` times our
dense kernel, recall's against ``1.3 density`` times it plus the scoring time.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

SKIP_METHODS: tuple[tuple[str, dict], ...] = (
    ("blasst", {"lam": 1e-2}),
    ("blasst", {"lam": 1e-3}),
    ("blasst", {"lam": 1e-4}),
    ("recall", {"recall": 0.9}),
    ("recall", {"recall": 0.95}),
    ("recall", {"recall": 0.99}),
    ("recall+uta", {"recall": 0.95}),
    ("blasst+uta", {"lam": 1e-3}),
    ("recall+blocks", {"recall": 0.95}),
    ("blasst+blocks", {"lam": 1e-3}),
)


@dataclass(frozen=True)
class SkipRow:
    """One method on the data: time, densities, error, achieved recall."""

    method: str
    ms: float
    density: float
    qk_density: float
    mse: float
    min_recall: float | None
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def load(
    source: str,
    heads: Sequence[int] | None,
    device: str,
    *,
    layer: int | None = None,
    step: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """q, k, v (1, H, N, D) bf16 on ``device`` from ``synthetic:PRESET`` or a capture file (its
    first entry with the given ``layer`` and ``step``, either left out: any)."""
    if source.startswith("synthetic"):
        if layer is not None or step is not None:
            raise SystemExit(
                "--layer and --step pick an entry of a capture file, not synthetic data"
            )
        from ..data.synthetic import SyntheticSource

        preset = source.partition(":")[2] or "wan-1.3b-480p"
        data = SyntheticSource(preset=preset, seed=0)
        chosen = range(data.heads) if heads is None else heads
        parts = [data.head(h) for h in chosen]
        return tuple(
            torch.cat([p[i] for p in parts], 1).to(device, torch.bfloat16) for i in range(3)
        )
    from ..capture_file import load_capture

    entries = [
        e
        for e in load_capture(source).entries
        if (layer is None or e.layer == layer) and (step is None or e.step == step)
    ]
    if not entries:
        raise SystemExit(f"{source} has no entry with layer {layer} and step {step}")
    entry = entries[0]
    q, k, v = (entry.tensor(name) for name in ("q", "k", "v"))
    if heads is not None:
        q, k, v = (x[:, list(heads)] for x in (q, k, v))
    return tuple(x.to(device, torch.bfloat16) for x in (q, k, v))


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    methods: Sequence[tuple[str, dict]] = SKIP_METHODS,
    *,
    progress: Callable[[str], None] | None = None,
) -> list[SkipRow]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import tailattn

    from ..kernels import block_sparse_attention
    from ..layout import BlockLayout, num_blocks
    from .calls import median_ms

    say = progress or (lambda _: None)
    b, h, n, d = q.shape
    scale = d**-0.5
    m = num_blocks(n, 128)
    dense_layout = BlockLayout(
        torch.arange(m, device=q.device, dtype=torch.int32).expand(b, h, m, m),
        torch.full((b, h, m), m, device=q.device, dtype=torch.int32),
        n, n, check=False,
    )  # fmt: skip
    exact, exact_lse = block_sparse_attention(q, k, v, dense_layout, scale=scale)
    exact = exact.float()

    def mse(out: torch.Tensor) -> float:
        return float(((out.float() - exact) ** 2).mean())

    rows: list[SkipRow] = []
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    rows.append(SkipRow("dense SDPA (cuDNN)", cudnn, 1.0, 1.0, 0.0, 1.0))
    ours = median_ms(lambda: block_sparse_attention(q, k, v, dense_layout, scale=scale))
    rows.append(SkipRow("dense, our kernel", ours, 1.0, 1.0, 0.0, 1.0))
    say(f"dense: cuDNN {cudnn:.3f} ms, ours {ours:.3f} ms")
    scoring = median_ms(
        lambda: tailattn.registry.bind("block-topk", keep=0.1).selection(q, k, scale=scale)
    )
    rows.append(SkipRow("pooled scoring + argsort", scoring, 0.0, 0.0, float("nan"), None))

    def measure(spec: str, params: dict, note: str = "") -> SkipRow:
        bound = tailattn.registry.bind(spec, **params)
        call = lambda: tailattn.attention(q, k, v, bound)  # noqa: E731
        call()
        ms = median_ms(call)
        out, info = tailattn.attention(q, k, v, bound, return_info=True)
        recall = None
        if spec in ("blasst", "recall", "block-topk"):  # drop tail: lse is the kept mass
            recall = float(torch.exp(info["lse"] - exact_lse).min())
        label = spec + "(" + ", ".join(f"{key}={val:g}" for key, val in params.items()) + ")"
        row = SkipRow(label, ms, info["density"], info.get("qk_density", info["density"]),
                      mse(out), recall, note)  # fmt: skip
        say(f"{label}: {ms:.3f} ms, density {row.density:.3f} (QK {row.qk_density:.3f}), "
            f"MSE {row.mse:.3e}, min recall {recall}")  # fmt: skip
        return row

    for spec, params in methods:
        row = measure(spec, params)
        if spec.startswith("blasst"):
            limit = (0.55 + 0.45 * row.density) * ours
            row = SkipRow(**{**row.as_dict(), "note": f"limit {limit:.3f} ms"})
        elif spec.startswith("recall"):
            limit = 1.3 * row.density * ours + scoring
            row = SkipRow(**{**row.as_dict(), "note": f"limit {limit:.3f} ms"})
        rows.append(row)
        if spec == "recall" and params.get("recall") == 0.95:
            keep = max(row.density, 1.0 / m)
            rows.append(measure("block-topk+uta", {"keep": round(keep, 4)}, "same density"))
            rows.append(measure("block-topk", {"keep": round(keep, 4)}, "same density"))
    rows.append(measure("block-topk+uta", {"keep": 0.1}))
    return rows


def to_markdown(rows: Sequence[SkipRow], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| method | ms | density (P.V) | density (QK) | MSE vs exact | min recall | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        recall = "-" if r.min_recall is None else f"{r.min_recall:.4f}"
        err = "-" if math.isnan(r.mse) else f"{r.mse:.2e}"
        lines.append(
            f"| {r.method} | {r.ms:.3f} | {r.density:.3f} | {r.qk_density:.3f} | {err} | "
            f"{recall} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:  # pragma: no cover - a GPU benchmark entry point
    parser = argparse.ArgumentParser(description="in-loop skipping on structured attention")
    parser.add_argument("--source", default="synthetic:wan-1.3b-480p")
    parser.add_argument("--heads", default=None, help="comma list (default all)")
    parser.add_argument("--layer", type=int, default=None, help="capture entry's layer")
    parser.add_argument("--step", type=int, default=None, help="capture entry's step")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    heads = None if args.heads is None else [int(x) for x in args.heads.split(",")]
    q, k, v = load(args.source, heads, "cuda", layer=args.layer, step=args.step)
    rows = run(q, k, v, progress=print)
    print(to_markdown(rows, f"{args.source} {tuple(q.shape)} on {torch.cuda.get_device_name()}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=1)


if __name__ == "__main__":  # pragma: no cover
    main()
