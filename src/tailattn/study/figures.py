"""PNG figures of a study: one function per figure, each returning the file name it wrote or None
when it had nothing to draw. Figures are plain ``matplotlib.figure.Figure`` objects rendered by
the Agg canvas: no pyplot, no global backend state."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from .anatomy import CURVE_KEEPS, LOG_P_BINS, LOG_P_RANGE
from .engine import UnitResult
from .plan import Pair

DPI = 110


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=DPI)
    return name


def _style(spec: str) -> dict:
    return {"linestyle": "-" if "+" in spec else "--", "marker": "o", "markersize": 3}


def mse_vs_keep(rows: Sequence[dict], specs: Sequence[str], out: Path) -> str | None:
    """Log-scale MSE vs keep ratio for each method (Table 1 as a plot)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    drawn = False
    for spec in specs:
        pts = sorted((r["keep"], r["mse"]) for r in rows if r["method"] == spec and r["keep"])
        if pts:
            ax.plot(*zip(*pts, strict=True), label=spec, **_style(spec))
            drawn = True
    if not drawn:
        return None
    ax.set(yscale="log", xlabel="keep ratio", ylabel="MSE vs exact attention")
    ax.set_title("Attention output MSE (Table 1)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out, "mse_vs_keep.png")


def recall(units: Sequence[UnitResult], rows: Sequence[dict], specs: Sequence[str], out: Path):
    """(a) Top-K recall vs keep per head (Fig. 1a); (b) recall vs keep per method (Fig. 6)."""
    fig = Figure(figsize=(11, 4))
    (a, b) = fig.subplots(1, 2)
    for u in units:
        if u.recall_curve:
            a.plot(CURVE_KEEPS, u.recall_curve, label=u.label, lw=1)
    a.set(xlabel="keep ratio", ylabel="exact kept mass (recall)", title="Top-K recall per head")
    a.grid(alpha=0.3)
    if len(units) <= 12:
        a.legend(fontsize=7)
    for spec in specs:
        pts = sorted(
            (r["keep"], r["recall_implied"]) for r in rows if r["method"] == spec and r["keep"]
        )
        if pts:
            b.plot(*zip(*pts, strict=True), label=spec, **_style(spec))
    b.set(xlabel="keep ratio", ylabel="1 - TV(exact, implied)", title="Recall of each method")
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    return _save(fig, out, "recall.png")


def bins(units: Sequence[UnitResult], pairs: Sequence[Pair], out: Path) -> str | None:
    """MSE per head vs number of bins (Fig. 4)."""
    counts = [int(p.spec.split("n=")[1].rstrip(")")) for p in pairs]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for u in units:
        ys = [u.pairs[p]["mse"] for p in pairs if p in u.pairs]
        if len(ys) == len(pairs):
            ax.plot(counts, ys, marker="o", markersize=3, label=u.label, lw=1)
    ax.set(xscale="log", yscale="log", xlabel="bins", ylabel="MSE")
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_title(f"MSE vs number of tail bins (keep {pairs[0].keep:g})")
    ax.grid(alpha=0.3, which="both")
    if len(units) <= 12:
        ax.legend(fontsize=7)
    return _save(fig, out, "bins.png")


def ablation(rows: Sequence[dict], out: Path) -> str | None:
    """uta-norm (denominator only) vs uta (denominator and value), Fig. 7."""
    return _lines(rows, ["topk", "topk+uta-norm", "topk+uta"], out, "ablation.png", "UTA ablation")


def _lines(rows, specs, out: Path, name: str, title: str) -> str | None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for spec in specs:
        pts = sorted((r["keep"], r["mse"]) for r in rows if r["method"] == spec and r["keep"])
        if pts:
            ax.plot(*zip(*pts, strict=True), label=spec, **_style(spec))
    ax.set(yscale="log", xlabel="keep ratio", ylabel="MSE", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out, name)


def distributions(units: Sequence[UnitResult], watch: Sequence[Pair], out: Path) -> str | None:
    """Density of log10 post-softmax values per head: full vs topk vs topk+uta (Fig. 5)."""
    shown = [u for u in units if "full" in u.histograms][:12]
    if not shown:
        return None
    cols = min(4, len(shown))
    rows_n = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows_n))
    axes = fig.subplots(rows_n, cols, squeeze=False)
    lo, hi = LOG_P_RANGE
    width = (hi - lo) / LOG_P_BINS
    centers = [lo + width * (i + 0.5) for i in range(LOG_P_BINS)]
    for ax, u in zip(axes.flat, shown, strict=False):
        for name, color in [("full", "tab:blue")] + [
            (p.label, c) for p, c in zip(watch, ("tab:orange", "tab:green"), strict=False)
        ]:
            counts = u.histograms.get(name)
            if counts:
                total = sum(counts) * width
                ax.plot(centers, [c / total for c in counts], color=color, lw=1, label=name)
        ax.set_title(u.label, fontsize=9)
        ax.set_xlim(-9, 0)
        ax.set_xlabel("log10 p", fontsize=8)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return _save(fig, out, "distributions.png")


def anatomy(units: Sequence[UnitResult], out: Path) -> str | None:
    """Fig. 3 for the first sampled row of the first heads: (a) sorted softmax values,
    (b) histogram of the lower 90 %, (c) its CDF, (d) adjacent differences of sorted values."""
    shown = [u for u in units if u.samples][:4]
    if not shown:
        return None
    fig = Figure(figsize=(15, 3.4))
    axes = fig.subplots(1, 4)
    for u in shown:
        p = u.samples[0]
        n = len(p)
        low = p[math.ceil(0.1 * n) :]
        axes[0].plot(range(n), p, lw=1, label=u.label)
        axes[1].hist(low, bins=60, histtype="step", label=u.label)
        srt = sorted(low)
        axes[2].plot(srt, [(i + 1) / len(srt) for i in range(len(srt))], lw=1, label=u.label)
        deltas = [a - b for a, b in itertools.pairwise(p)]
        axes[3].hist(deltas, bins=60, histtype="step", log=True, label=u.label)
    axes[0].set(yscale="log", xlabel="rank", ylabel="softmax value", title="(a) all tokens")
    axes[1].set(xlabel="softmax value", ylabel="count", title="(b) lower 90 %")
    axes[2].set(xlabel="softmax value", ylabel="CDF", title="(c) CDF of the lower 90 %")
    axes[3].set(xlabel="difference of adjacent sorted values", title="(d) deltas")
    axes[0].legend(fontsize=7)
    return _save(fig, out, "anatomy.png")


def outputs(units: Sequence[UnitResult], watch: Sequence[Pair], out: Path) -> str | None:
    """Histogram of attention output values: full vs topk vs topk+uta (Fig. 8a)."""
    names = ["full"] + [p.label for p in watch]
    values = {n: [x for u in units for x in u.outputs.get(n, [])] for n in names}
    if not values["full"]:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    lo, hi = min(values["full"]), max(values["full"])
    for name in names:
        if values[name]:
            ax.hist(
                values[name], bins=80, range=(lo, hi), histtype="step", density=True, label=name
            )
    ax.set(xlabel="output value", ylabel="density", title="Attention output distribution")
    ax.legend(fontsize=8)
    return _save(fig, out, "outputs.png")


def steps(table: Sequence[dict], watch: Sequence[Pair], out: Path) -> str | None:
    """MSE per diffusion step at the focus keep (Fig. 8b)."""
    if not table:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for pair in watch:
        ax.plot(
            [t["step"] for t in table],
            [t[pair.spec] for t in table],
            marker="o",
            markersize=3,
            label=pair.label,
        )
    ax.set(yscale="log", xlabel="diffusion step", ylabel="MSE", title="MSE per diffusion step")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out, "steps.png")
