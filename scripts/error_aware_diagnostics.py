"""What block-err's estimator gets wrong: its kept blocks against exact errors (issue 16).

For one head at a time of a study source (``synthetic:PRESET``, ``toy`` or a capture file), per
query block and key block j, from the exact float64 logits of every query i of the block:

    P_ij = sum_{t in j} p_it,   S_ij = sum_{t in j} p_it v_t,   Z_ij = sum_{t in j} z_it,

so the exact output of any kept set T is a closed form: ``drop`` sum_T S / sum_T P, ``uta`` the
same plus one token of the dropped keys' mean logit and mean value (Eq. 13-14 of the UTA paper).
At the same budget, ceil(keep * Mk) key blocks per query block, it compares the exact MSE of

    block-topk     pooled scores
    block-err      the selection as it runs (for_tail=drop for drop, for_tail=uta for uta)
    value-aware    (drop) block-err's greedy J with the probe's exact mean values in place of
                   its sketched mean keys: what the keys-for-values proxy costs
    exact greedy   one block at a time, the exact MSE of all the block's queries (it sees v and
                   every query, so no selection can run it): a bound for greedy block sets
    top-C          (drop, with ``--candidates``) block-err's greedy over only the C key blocks
                   of largest probe mass, the rest dropped (their |d|^2 still in J's kappa term):
                   what a greedy over fewer blocks, cheaper on the GPU, would lose

and reports per head the R^2 of a linear fit of v on k (the drop proxy assumes v ~ W k) and, for
``uta``, how block-err's per-block score ``(p - a)^2 + p^2`` ranks against the exact mean
|e_j|^2 of the block's queries (docs/methods.md, "The error of a tail, exactly"): Spearman
correlation and the share of its kept blocks among the exact top ceil(keep * Mk).

    python scripts/error_aware_diagnostics.py --source FILE --keep 0.1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from tailattn import registry
from tailattn.select.blocks import block_budget, pool_blocks
from tailattn.select.error_aware import (
    Probe,
    block_scores,
    greedy_drop_torch,
    key_imbalance,
    probe_stats_torch,
    sketch_matrix,
    tail_log_mass,
)
from tailattn.study.sources import open_source

BLOCK = 128
SELECTIONS = {"drop": "block-err(for_tail=drop)", "uta": "block-err"}


def by_block(x: torch.Tensor) -> torch.Tensor:
    """(..., N, C) -> (..., Mk, BLOCK, C), zero-padded along N."""
    return torch.nn.functional.pad(x, (0, 0, 0, -x.shape[-2] % BLOCK)).unflatten(-2, (-1, BLOCK))


class QueryBlock:
    """Exact per-(query, key block) sums of one query block, and exact outputs of kept sets."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        z = scale * q @ k.T  # (bq, N)
        self.lse = torch.logsumexp(z, -1)
        p = torch.exp(z - self.lse[:, None])
        self.exact = p @ v
        self.count = by_block(torch.ones(k.shape[0], 1, dtype=k.dtype)).sum((-2, -1))
        self.n = k.shape[0]
        self.mass = by_block(p.unsqueeze(-1)).sum((-2, -1))  # P (bq, Mk)
        self.num = torch.einsum("ijt,jtd->ijd", by_block(p.unsqueeze(-1))[..., 0], by_block(v))
        self.logit_sum = by_block(z.unsqueeze(-1)).sum((-2, -1))  # Z (bq, Mk)
        self.value_sum = by_block(v).sum(-2)  # (Mk, D)
        self.zbar = z.mean(-1)

    def kept_sums(self, kept: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Sums over the kept blocks of masks (..., Mk): numerator (..., bq, D), mass (..., bq),
        key count (...), logit sum (..., bq), value sum (..., D)."""
        w = kept.to(self.mass.dtype)
        return (
            torch.einsum("...j,ijd->...id", w, self.num),
            torch.einsum("...j,ij->...i", w, self.mass),
            w @ self.count,
            torch.einsum("...j,ij->...i", w, self.logit_sum),
            w @ self.value_sum,
        )

    def error(self, sums: tuple[torch.Tensor, ...], tail: str) -> torch.Tensor:
        """Exact MSE of the block's queries from :meth:`kept_sums`, (...)."""
        num, den, kept_count, kept_logits, kept_values = sums
        if tail == "uta":
            dropped = (self.n - kept_count).unsqueeze(-1)  # (..., 1)
            safe = dropped.clamp_min(1)
            zbar = (self.logit_sum.sum(-1) - kept_logits) / safe
            token = torch.where(dropped > 0, torch.exp(zbar + torch.log(safe) - self.lse), 0.0)
            vbar = (self.value_sum.sum(0) - kept_values) / safe
            num = num + token.unsqueeze(-1) * vbar.unsqueeze(-2)
            den = den + token
        return ((num / den.unsqueeze(-1) - self.exact) ** 2).mean((-2, -1))

    def mse(self, kept: torch.Tensor, tail: str) -> torch.Tensor:
        """Exact MSE of the block's queries for kept masks (..., Mk) -> (...)."""
        return self.error(self.kept_sums(kept), tail)

    def exact_greedy(self, steps: int, tail: str) -> torch.Tensor:
        """Greedy kept mask (Mk,) minimising the exact MSE one block at a time."""
        mk = self.mass.shape[1]
        kept = torch.zeros(mk, dtype=torch.bool)
        per_block = (self.num.transpose(0, 1), self.mass.T, self.count, self.logit_sum.T)
        per_block += (self.value_sum,)
        for _ in range(steps):
            sums = self.kept_sums(kept)
            candidates = tuple(a.unsqueeze(0) + b for a, b in zip(sums, per_block, strict=True))
            err = self.error(candidates, tail).masked_fill(kept, math.inf)
            kept[int(err.argmin())] = True
        return kept

    def block_errors(self) -> torch.Tensor:
        """Exact mean |e_j|^2 over the queries, each block dropped under the uta model's
        implied logit (every key's mean logit): e_j = (a - p)(vbar_j - O) - p (mu_j - vbar_j)."""
        vbar = self.value_sum / self.count[:, None]
        p = self.mass
        a = self.count * torch.exp(self.zbar - self.lse)[:, None]
        mu = self.num / p.clamp_min(1e-300).unsqueeze(-1)
        e = (a - p).unsqueeze(-1) * (vbar - self.exact.unsqueeze(1)) - p.unsqueeze(-1) * (mu - vbar)
        return (e * e).sum(-1).mean(0)


def value_aware_greedy(qhat, k, v, scale, steps, kappa) -> torch.Tensor:
    """block-err's greedy with the probe's exact mean values in place of its mean keys."""
    z = by_block(scale * (k @ qhat).unsqueeze(-1))[..., 0]  # (Mk, BLOCK)
    real = by_block(torch.ones(k.shape[0], 1, dtype=torch.bool))[..., 0]
    z = z.masked_fill(~real, -math.inf)
    log_mass = torch.logsumexp(z, -1)
    means = (torch.softmax(z, -1).unsqueeze(1) @ by_block(v)).squeeze(1)  # (Mk, D)
    probe = Probe(log_mass.view(1, 1, 1, -1), means.view(1, 1, 1, *means.shape))
    picks, _ = greedy_drop_torch(*key_imbalance(probe), steps, kappa)
    kept = torch.zeros(log_mass.shape[0], dtype=torch.bool)
    kept[picks.flatten()] = True
    return kept


def candidate_greedy(
    p: torch.Tensor, d: torch.Tensor, steps: int, kappa: float, count: int
) -> torch.Tensor:
    """Kept mask (Mk,) of block-err's drop greedy over the ``count`` blocks of largest mass p
    (Mk,) only; d (Mk, r) are the block imbalances of the whole row."""
    allowed = torch.zeros_like(p, dtype=torch.bool)
    allowed[p.topk(min(count, p.shape[0])).indices] = True
    picks, _ = greedy_drop_torch(p, d, min(steps, int(allowed.sum())), kappa, allowed)
    kept = torch.zeros_like(allowed)
    kept[picks] = True
    return kept


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def r_squared(k: torch.Tensor, v: torch.Tensor) -> float:
    """R^2 of the least-squares fit v ~ W k + c over the head's tokens."""
    x = torch.cat([k, torch.ones(k.shape[0], 1, dtype=k.dtype)], 1)
    resid = v - x @ torch.linalg.solve(x.T @ x, x.T @ v)
    return float(1 - resid.square().sum() / (v - v.mean(0)).square().sum())


def head_report(
    q, k, v, keep: float, blocks: list[int] | None, kappa: float, candidates: tuple[int, ...] = ()
) -> dict:
    """Exact MSE of every kept-set kind, the v ~ k fit and the uta ranking, one head."""
    q4, k4 = q.view(1, 1, *q.shape), k.view(1, 1, *k.shape)
    scale = q.shape[-1] ** -0.5
    masks = {
        name: registry.bind(spec, keep=keep).selection(q4, k4, scale=scale).to_dense()[0, 0]
        for name, spec in {"block-topk": "block-topk", **SELECTIONS}.items()
    }
    mq, mk = masks["block-topk"].shape
    steps = block_budget(keep, mk)
    qhat = pool_blocks(q4, BLOCK)  # (1, 1, Mq, D): block-err's probes
    # with candidates, block-err(for_tail=drop)'s probe: its default 32-dim key sketch too
    sketch = sketch_matrix(k.shape[-1], 32, k.dtype, k.device) if candidates else None
    probe = probe_stats_torch(qhat, k4, scale, BLOCK, sketch)
    scores = block_scores(probe, tail_log_mass(qhat, k4, scale, BLOCK, "uta"))[0, 0]
    if candidates:
        mass, imbalance = (x[0, 0] for x in key_imbalance(probe))
    sums: dict[str, float] = {}
    rank, overlap = [], []
    chosen = range(mq) if blocks is None else blocks
    for m in chosen:
        rows = slice(m * BLOCK, (m + 1) * BLOCK)
        qb = QueryBlock(q[rows], k, v, scale)
        for tail in ("drop", "uta"):
            sets = {
                "block-topk": masks["block-topk"][m],
                "block-err": masks[tail][m],
                "exact greedy": qb.exact_greedy(steps, tail),
            }
            if tail == "drop":
                sets["value-aware"] = value_aware_greedy(qhat[0, 0, m], k, v, scale, steps, kappa)
                for count in candidates:
                    sets[f"top-{count}"] = candidate_greedy(
                        mass[m], imbalance[m], steps, kappa, count
                    )
            for name, kept in sets.items():
                key = f"{tail}: {name}"
                sums[key] = sums.get(key, 0.0) + float(qb.mse(kept, tail)) / len(chosen)
        exact = qb.block_errors()
        rank.append(spearman(scores[m], exact))
        top = set(exact.topk(steps).indices.tolist())
        kept_ids = masks["uta"][m].nonzero().flatten().tolist()
        overlap.append(len(top.intersection(kept_ids)) / steps)
    return {
        "mse": sums,
        "r2_v_on_k": r_squared(k, v),
        "uta_score_spearman": sum(rank) / len(rank),
        "uta_top_overlap": sum(overlap) / len(overlap),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="synthetic:wan-1.3b-480p")
    parser.add_argument("--heads", default=None, help="head indices, e.g. 0,1 (default all)")
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--blocks", type=int, default=None, help="query blocks sampled per head")
    parser.add_argument("--kappa", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--candidates", default="", help="drop greedy over the top-C blocks by mass, e.g. 64,128"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        candidates = tuple(int(c) for c in args.candidates.split(",") if c)
    except ValueError:
        parser.error(
            f"--candidates must be positive integers, e.g. 64,128; got {args.candidates!r}"
        )
    if any(c < 1 for c in candidates):
        parser.error(f"--candidates must be positive integers, got {args.candidates!r}")
    heads = None if args.heads is None else [int(h) for h in args.heads.split(",")]
    try:
        source = open_source(args.source, seed=args.seed, heads=heads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    start, units = time.perf_counter(), []
    for unit in source.units:
        q, k, v = (x[0, 0].double() for x in unit.load())
        mq = -(-q.shape[0] // BLOCK)
        blocks = None
        if args.blocks is not None and args.blocks < mq:
            blocks = sorted(torch.randperm(mq, generator=gen)[: args.blocks].tolist())
        units.append(
            {"unit": unit.label, **head_report(q, k, v, args.keep, blocks, args.kappa, candidates)}
        )
        print(unit.label, json.dumps(units[-1]["mse"]), flush=True)
    keys = list(units[0]["mse"])
    mean = {key: sum(u["mse"][key] for u in units) / len(units) for key in keys}
    summary = {
        "mse": mean,
        "mse_vs_block_topk_drop": {key: mean[key] / mean["drop: block-topk"] for key in keys},
        **{
            name: sum(u[name] for u in units) / len(units)
            for name in ("r2_v_on_k", "uta_score_spearman", "uta_top_overlap")
        },
    }
    report = {
        "source": source.name,
        "keep": args.keep,
        "block": BLOCK,
        "query_blocks_per_head": args.blocks,
        "kappa": args.kappa,
        "candidates": list(candidates),
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summary,
        "units": units,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
