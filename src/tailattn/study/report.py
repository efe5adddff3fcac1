"""The study's outputs: a markdown report with PNG figures and a JSON file, written atomically.

The report directory is assembled under a temporary name and renamed into place; the JSON file
(inside it by default, or anywhere with ``--json``) likewise. An interrupted run leaves neither
half-written.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

from .._files import atomic_directory, write_text_atomic
from . import figures
from .anatomy import STAT_NAMES
from .experiments import lookup, pair_rows, steps_table, table1
from .plan import Pair, parse_methods
from .run import StudyResult

REPORT = "report.md"
JSON = "study.json"


def fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


def table1_rows(result: StudyResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the Table-1-style table (also printed to the terminal). A method
    without a keep ratio (``topp``, ``threshold``) appears once, in the column nearest its
    measured density."""
    config = result.config
    methods = parse_methods(config.methods)
    rows = pair_rows(result.units, [Pair(m.spec, k) for m in methods for k in config.keeps])
    rows += pair_rows(result.units, [Pair(m.spec, None) for m in methods if not m.budgeted])
    table = table1(rows, methods, config.keeps)
    header = ["method", *[f"keep {k:g}" for k in config.keeps]]
    body = []
    for info in methods:
        cells = table[info.spec]
        line = [info.spec]
        own = cells.get("None")
        nearest = (
            min(config.keeps, key=lambda k: abs(k - own["density"])) if own is not None else None
        )
        for keep in config.keeps:
            # a method without a keep ratio sits in the column nearest its measured density
            cell = cells.get(str(keep)) if info.budgeted else (own if keep == nearest else None)
            if cell is None:
                line.append("-")
                continue
            text = fmt(cell["mse"])
            if cell["change_pct"] is not None:
                text += f" ({cell['change_pct']:+.1f}%)"
            line.append(text)
        body.append(line)
    return header, body


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _density_table(result: StudyResult, specs: list[str]) -> str:
    header = ["method", *[f"keep {k:g}" for k in result.config.keeps]]
    rows = []
    all_rows = pair_rows(result.units, result.needs.pairs)
    for spec in specs:
        line = [spec]
        for keep in result.config.keeps:
            row = lookup(all_rows, spec, keep)
            line.append("-" if row is None else f"{row['density']:.3f}")
        rows.append(line)
    return markdown_table(header, rows)


def _recall_table(result: StudyResult, specs: list[str]) -> str:
    all_rows = pair_rows(result.units, result.needs.pairs)
    header = ["method", *[f"keep {k:g}" for k in result.config.keeps]]
    rows = []
    for spec in specs:
        line = [spec]
        for keep in result.config.keeps:
            row = lookup(all_rows, spec, keep)
            line.append(
                "-" if row is None else f"{row['recall']:.3f} / {row['recall_implied']:.3f}"
            )
        rows.append(line)
    return markdown_table(header, rows)


def _per_head_bins(result: StudyResult, pairs: list[Pair]) -> str:
    header = ["head", *[p.spec.replace("topk+", "") for p in pairs]]
    rows = [
        [u.label, *[fmt(u.pairs[p]["mse"]) if p in u.pairs else "-" for p in pairs]]
        for u in result.units
    ]
    return markdown_table(header, rows)


def _anatomy_table(result: StudyResult) -> str:
    rows = [
        [u.label, *[f"{u.anatomy[s]:.3f}" for s in STAT_NAMES]] for u in result.units if u.anatomy
    ]
    return markdown_table(["head", *STAT_NAMES], rows)


def anatomy_summary(result: StudyResult) -> dict[str, dict[str, float]]:
    """Min, median and max over units of each anatomy statistic."""
    summary = {}
    for name in STAT_NAMES:
        values = sorted(u.anatomy[name] for u in result.units if u.anatomy)
        if values:
            summary[name] = {
                "min": values[0],
                "median": values[len(values) // 2],
                "max": values[-1],
            }
    return summary


def build_json(result: StudyResult) -> dict[str, Any]:
    config = result.config
    units = result.units
    data: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"name": result.source.name, "description": result.source.description},
        "config": {
            "methods": list(config.methods),
            "keeps": list(config.keeps),
            "experiments": list(result.selected.run),
            "heads": [u.label for u in units],
            "queries": config.queries,
            "seed": config.seed,
            "focus_keep": config.focus_keep,
            "dtype": config.dtype,
        },
        "sampled": result.sampled,
        "rows_per_head": result.rows_per_unit,
        "tokens": result.source.tokens,
        "seconds": result.seconds,
        "rows": pair_rows(units, result.needs.pairs),
        "skipped_experiments": result.selected.skipped,
        "skipped_pairs": {
            u.label: {p.label: why for p, why in u.skipped.items()} for u in units if u.skipped
        },
    }
    run = result.selected.run
    if "anatomy" in run:
        data["anatomy"] = {
            "per_head": {u.label: u.anatomy for u in units},
            "summary": anatomy_summary(result),
        }
    if "recall" in run:
        data["recall_curves"] = {
            "keeps": list(figures.CURVE_KEEPS),
            "per_head": {u.label: u.recall_curve for u in units},
        }
    if "steps" in run:
        data["steps"] = steps_table(units, result.needs.watch)
    return data


def write_report(result: StudyResult, out: Path, json_path: Path | None = None) -> Path:
    """Write report.md, the figures and the JSON (default ``out/study.json``) atomically."""
    data = build_json(result)
    text = json.dumps(data, indent=1, default=str)
    with atomic_directory(out) as tmp:
        markdown = render(result, data, tmp)
        (tmp / REPORT).write_text(markdown, encoding="utf-8")
        if json_path is None:
            (tmp / JSON).write_text(text, encoding="utf-8")
    if json_path is not None:
        write_text_atomic(json_path, text)
    return out / REPORT


def render(result: StudyResult, data: dict, out: Path) -> str:
    """The markdown report; figures are written into ``out``."""
    config, units, run = result.config, result.units, result.selected.run
    rows = data["rows"]
    specs = [m.spec for m in parse_methods(config.methods)]
    sampled = (
        f"{result.rows_per_unit:,} of {result.source.tokens:,} query rows per head, sampled "
        f"uniformly without replacement (seed {config.seed}): every mean is an unbiased estimate "
        f"of the mean over all rows"
        if result.sampled
        else f"all {result.source.tokens:,} query rows of every head"
    )
    parts = [
        "# tailattn oracle study",
        "",
        f"- source: {result.source.description}",
        f"- heads: {len(units)} ({', '.join(u.label for u in units)})",
        f"- rows: {sampled}",
        f"- exact reference: dense softmax attention in {config.dtype}; every method evaluated "
        f"on the same exact logits",
        f"- experiments: {', '.join(run)}; run time {result.seconds:.1f} s",
    ]
    for name, why in result.selected.skipped.items():
        parts.append(f"- {name}: {why}")
    for u in units:
        for pair, why in u.skipped.items():
            parts.append(f"- {pair.label} skipped on {u.label}: {why}")
    if "table1" in run:
        header, body = table1_rows(result)
        fig = figures.mse_vs_keep(rows, specs, out)
        parts += [
            "",
            "## Table 1: MSE of the attention output vs exact attention",
            "",
            "Mean over heads and rows of mean((o - o*)^2); in parentheses the change of a "
            "`+tail` method over the same selection without a tail.",
            "",
            markdown_table(header, body),
            "",
            "Measured density (kept fraction of keys) per method and keep:",
            "",
            _density_table(result, specs),
        ]
        if fig:
            parts += ["", f"![MSE vs keep]({fig})"]
    if "recall" in run:
        fig = figures.recall(units, rows, specs, out)
        parts += [
            "",
            "## Recall (Fig. 1a, Fig. 6)",
            "",
            "Per method and keep: exact kept mass / 1 - TV(exact, implied distribution). The "
            "second number counts the mass a tail restores (for `drop` both are equal).",
            "",
            _recall_table(result, specs),
            "",
            f"![recall]({fig})",
        ]
    if "bins" in run:
        pairs = [
            Pair(m.spec, config.keeps[0])
            for m in parse_methods([f"topk+bins{n}" for n in config.bins])
        ]
        fig = figures.bins(units, pairs, out)
        parts += [
            "",
            f"## Bins (Fig. 4): MSE per head vs number of tail bins, keep {config.keeps[0]:g}",
            "",
            _per_head_bins(result, pairs),
            "",
            f"![bins]({fig})",
        ]
    if "ablation" in run:
        fig = figures.ablation(rows, out)
        header = ["method", *[f"keep {k:g}" for k in config.keeps]]
        body = [
            [spec, *[fmt((lookup(rows, spec, k) or {}).get("mse")) for k in config.keeps]]
            for spec in ("topk", "topk+uta-norm", "topk+uta")
        ]
        parts += [
            "",
            "## Ablation (Fig. 7): normalization only (uta-norm) vs normalization and value (uta)",
            "",
            markdown_table(header, body),
            "",
            f"![ablation]({fig})",
        ]
    if "distributions" in run:
        fig = figures.distributions(units, result.needs.watch, out)
        parts += [
            "",
            f"## Post-softmax distributions (Fig. 5), keep {config.focus_keep:g}",
            "",
            "Density of log10 p over all (row, key) pairs per head: exact, Top-K (the kept "
            "weights renormalized: shifted right) and Top-K+UTA (each dropped key at its implied "
            "weight).",
            "",
            f"![distributions]({fig})" if fig else "(no data)",
        ]
    if "outputs" in run:
        fig = figures.outputs(units, result.needs.watch, out)
        parts += [
            "",
            f"## Output values (Fig. 8a), keep {config.focus_keep:g}",
            "",
            f"![outputs]({fig})" if fig else "(no data)",
        ]
    if "anatomy" in run:
        fig = figures.anatomy(units, out)
        summary = data["anatomy"]["summary"]
        parts += [
            "",
            "## Anatomy (Sec. 3.4.1, Fig. 3)",
            "",
            "Means over rows per head (definitions in `tailattn/study/anatomy.py`): mass of the "
            "top 1 % and 10 % of keys, mass of the lower 90 %, the largest probability of the "
            "lower 90 % times N, the logit spread of the lower 90 %, the share of adjacent "
            "sorted-probability differences below 1 % of the largest one, the mass of the keys "
            "within 1 frame and 3 tokens of the query (local; the rest is long-range) and the "
            "mass in the query's own frame.",
            "",
            _anatomy_table(result),
            "",
            "Across heads (min / median / max): "
            + "; ".join(
                f"{k} {v['min']:.3f} / {v['median']:.3f} / {v['max']:.3f}"
                for k, v in summary.items()
            ),
            "",
            f"![anatomy]({fig})" if fig else "",
        ]
    if "steps" in run:
        table = data["steps"]
        fig = figures.steps(table, result.needs.watch, out)
        header = ["step", "timestep", *[p.label for p in result.needs.watch]]
        body = [
            [str(t["step"]), fmt(t["timestep"]), *[fmt(t[p.spec]) for p in result.needs.watch]]
            for t in table
        ]
        parts += [
            "",
            f"## MSE per diffusion step (Fig. 8b), keep {config.focus_keep:g}",
            "",
            markdown_table(header, body),
            "",
            f"![steps]({fig})" if fig else "",
        ]
    return "\n".join(parts) + "\n"
