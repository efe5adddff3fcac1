"""The experiments: which pairs each needs, and their tables from the units' results.

``table1`` MSE per method and keep with the % change of every ``+tail`` over its base selection
(Table 1); ``recall`` Top-K recall curves per head (Fig. 1a) and the methods' recall vs keep
(Fig. 6); ``bins`` MSE per head vs number of bins (Fig. 4); ``ablation`` uta-norm vs uta
(Fig. 7); ``distributions`` post-softmax densities full vs topk vs topk+uta per head (Fig. 3, 5);
``outputs`` the distribution of output values (Fig. 8a); ``anatomy`` the statistics of
:mod:`.anatomy`; ``steps`` MSE per diffusion step at the focus keep (Fig. 8b).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from .config import EXPERIMENTS, StudyConfig
from .engine import METRICS, UnitResult
from .plan import MethodInfo, Pair, pairs_for, parse_methods


@dataclass(frozen=True)
class Selected:
    """Experiments to run and those skipped with the reason."""

    run: tuple[str, ...]
    skipped: dict[str, str]


def select_experiments(config: StudyConfig, steps: Sequence[int], source: str) -> Selected:
    """The requested experiments (default: all) minus those that do not apply to the source."""
    wanted = config.experiments or EXPERIMENTS
    skipped = {}
    if "steps" in wanted and len(steps) < 2:
        skipped["steps"] = (
            f"skipped: source {source} has {len(steps)} diffusion step(s); the per-step "
            f"experiment needs several (e.g. --source toy or a capture of several steps)"
        )
    return Selected(tuple(e for e in wanted if e not in skipped), skipped)


@dataclass(frozen=True)
class Needs:
    """The methods and pairs the selected experiments need, and what to watch."""

    methods: dict[str, MethodInfo]
    pairs: list[Pair]
    watch: list[Pair]
    anatomy: bool


def needs(config: StudyConfig, experiments: Sequence[str]) -> Needs:
    keeps, focus, low = config.keeps, config.focus_keep, config.keeps[0]
    methods: list[MethodInfo] = []
    pairs: list[Pair] = []
    if {"table1", "recall"} & set(experiments):
        chosen = parse_methods(config.methods)
        methods += chosen
        pairs += pairs_for(chosen, keeps)
    if "bins" in experiments:
        binned = parse_methods([f"topk+bins{n}" for n in config.bins])
        methods += binned
        pairs += [Pair(m.spec, low) for m in binned]
    if "ablation" in experiments:
        ablated = parse_methods(["topk+uta", "topk+uta-norm"])
        methods += ablated
        pairs += pairs_for(ablated, keeps)
    watch: list[Pair] = []
    if {"distributions", "outputs", "steps"} & set(experiments):
        focused = parse_methods(["topk", "topk+uta"])
        methods += focused
        watch = [Pair(m.spec, focus) for m in focused]
        pairs += watch
    unique = list(dict.fromkeys(pairs))
    by_spec = {m.spec: m for m in methods}
    return Needs(by_spec, unique, watch, "anatomy" in experiments or "recall" in experiments)


# ---------------------------------------------------------------------- aggregation
def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def pair_rows(units: Sequence[UnitResult], pairs: Sequence[Pair]) -> list[dict]:
    """JSON rows: per pair the mean over units of each metric, and per-head values."""
    rows = []
    for pair in pairs:
        done = [u for u in units if pair in u.pairs]
        if not done:
            continue
        row: dict = {"method": pair.spec, "keep": pair.keep}
        for name in METRICS:
            row[name] = mean([u.pairs[pair][name] for u in done])
        row["per_head"] = {u.label: {name: u.pairs[pair][name] for name in METRICS} for u in done}
        rows.append(row)
    return rows


def lookup(rows: Sequence[dict], spec: str, keep: float | None) -> dict | None:
    for row in rows:
        if row["method"] == spec and row["keep"] == keep:
            return row
    return None


def reduction(rows: Sequence[dict], info: MethodInfo, keep: float | None) -> float | None:
    """% change of a ``+tail`` method's MSE over its base selection (None without a base)."""
    if info.tail == "drop" and not info.tail_params:
        return None
    row, base = lookup(rows, info.spec, keep), lookup(rows, info.base, keep)
    if row is None or base is None or base["mse"] == 0:
        return None
    return 100.0 * (row["mse"] / base["mse"] - 1.0)


def table1(rows: Sequence[dict], methods: Sequence[MethodInfo], keeps: Sequence[float]) -> dict:
    """Table 1: MSE per method (rows) and keep (columns), with % change over the base."""
    table = {}
    for info in methods:
        cells = {}
        for keep in keeps if info.budgeted else [None]:
            row = lookup(rows, info.spec, keep)
            if row is not None:
                cells[str(keep)] = {
                    "mse": row["mse"],
                    "density": row["density"],
                    "change_pct": reduction(rows, info, keep),
                }
        table[info.spec] = cells
    return table


def steps_table(units: Sequence[UnitResult], watch: Sequence[Pair]) -> list[dict]:
    """MSE per diffusion step (mean over the step's layers and heads) of the watched pairs."""
    out = []
    for step in sorted({u.step for u in units if u.step is not None}):
        here = [u for u in units if u.step == step]
        entry: dict = {"step": step, "timestep": here[0].timestep}
        for pair in watch:
            entry[pair.spec] = mean([u.pairs[pair]["mse"] for u in here if pair in u.pairs])
        out.append(entry)
    return out
