"""Shared by the study tests: evaluate specs with the study engine and with tailattn.attention."""

from collections.abc import Iterator

import torch

import tailattn
from tailattn.study.engine import evaluate_unit, sample_rows
from tailattn.study.plan import pairs_for, parse_methods


def study_and_library(
    qkv: tuple[torch.Tensor, ...],
    specs: list[str],
    queries: int | None,
    grid: tuple[int, int, int],
    **attention_kwargs,
) -> Iterator[tuple]:
    """Yield (pair, study means, library info, library output on the rows, exact output on the
    rows) for every (spec, keep 0.25) pair, after checking the study skipped none."""
    q, k, v = qkv
    methods = {m.spec: m for m in parse_methods(specs)}
    pairs = pairs_for(methods.values(), [0.25])
    rows = sample_rows(q.shape[2], queries, seed=5)
    stats, *_, skipped = evaluate_unit(
        qkv, pairs, methods, rows=rows, grid=grid, dtype=torch.float64
    )
    assert not skipped and len(stats) == len(specs)
    ref = tailattn.full_attention(q, k, v)[:, :, rows]
    for pair, s in stats.items():
        keep = {} if pair.keep is None else {"keep": pair.keep}
        out, info = tailattn.attention(
            q, k, v, pair.spec, grid=grid, return_info=True, **attention_kwargs, **keep
        )
        yield pair, s.means(), info, out[:, :, rows], ref
