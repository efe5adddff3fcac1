"""Run a study: source -> units -> one pass per unit -> experiments -> report (atomically)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import StudyConfig
from .engine import UnitResult, evaluate_unit, sample_rows
from .experiments import Needs, Selected, needs, select_experiments
from .sources import Source, Unit, open_source


@dataclass
class StudyResult:
    """What a run measured, ready for the report."""

    config: StudyConfig
    source: Source
    selected: Selected
    needs: Needs
    units: list[UnitResult]
    rows_per_unit: int
    seconds: float

    @property
    def sampled(self) -> bool:
        return self.rows_per_unit < self.source.tokens


Progress = Callable[[str, int, int], None]
"""progress(description, advance, total): called as rows are evaluated."""


def evaluate(
    unit: Unit, source: Source, config: StudyConfig, plan: Needs, rows, on_chunk
) -> UnitResult:
    grid = source.grid
    stats, acc, hists, outs, skipped = evaluate_unit(
        unit.load(),
        plan.pairs,
        plan.methods,
        rows=rows,
        grid=grid,
        watch=plan.watch,
        anatomy=plan.anatomy,
        dtype=config.torch_dtype,
        on_chunk=on_chunk,
    )
    result = UnitResult(
        unit.label,
        unit.head,
        unit.layer,
        unit.step,
        unit.timestep,
        rows.numel(),
        source.tokens,
        {pair: s.means() for pair, s in stats.items()},
        histograms=hists,
        outputs=outs,
        skipped=skipped,
    )
    if acc is not None:
        result.anatomy = acc.means()
        result.recall_curve = acc.mean_curve()
        result.samples = [s.tolist() for s in acc.samples]
        result.histograms.setdefault("full", acc.histogram.tolist())
    return result


def run_study(config: StudyConfig, progress: Progress | None = None) -> StudyResult:
    """Evaluate every unit of the source for the selected experiments."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tailattn-study-") as work:
        source = open_source(
            config.source, seed=config.seed, heads=config.heads, workdir=Path(work)
        )
        selected = select_experiments(config, source.steps, source.name)
        plan = needs(config, selected.run)
        rows = sample_rows(source.tokens, config.queries, config.seed)
        total = rows.numel() * len(source.units)
        units = []
        for unit in source.units:

            def on_chunk(n: int, label: str = unit.label) -> None:
                if progress is not None:
                    progress(label, n, total)

            units.append(evaluate(unit, source, config, plan, rows, on_chunk))
    return StudyResult(
        config, source, selected, plan, units, rows.numel(), time.perf_counter() - start
    )
