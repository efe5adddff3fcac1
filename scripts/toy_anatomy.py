"""The toy model's attention anatomy next to the synthetic presets', from ``tailattn study`` runs.

Reads the ``study.json`` of a study of a toy capture and of each synthetic preset (experiments
``anatomy`` and ``recall``, methods including ``block-topk`` at keep 0.1; ``table1`` adds the
tail comparison) and writes into ``--out``:

- ``anatomy.md``: per source the min / median / max over heads of the top-1 % and top-10 % mass,
  the logit spread of the lower 90 %, the local and same-frame mass (definitions in
  ``tailattn/study/anatomy.py``) and the kept mass of ``block-topk`` at keep 0.1; the toy per
  layer (means over heads and steps) and per layer and head (means over steps); and per keep the
  MSE change of each ``block-topk+TAIL`` over ``block-topk`` (do block tails help?);
- ``anatomy.png``: each statistic per head, one column per source.

    python scripts/toy_anatomy.py --toy reports/study-toy/study.json \\
        --preset wan-1.3b-480p=reports/study-wan13/study.json --out reports/anatomy
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

STATS = {
    "top1_mass": "top-1 % mass",
    "top10_mass": "top-10 % mass",
    "lower90_logit_std": "tail logit spread",
    "local_mass": "local mass",
    "frame_mass": "same-frame mass",
    "kept_block_topk": "block-topk kept mass (keep 0.1)",
}
LAYER = re.compile(r"^L(?P<layer>\d+) s(?P<step>\d+) h(?P<head>\d+)")


def per_head(study: dict) -> dict[str, dict[str, float]]:
    """Statistics of :data:`STATS` per head label."""
    heads = {label: dict(values) for label, values in study["anatomy"]["per_head"].items()}
    for row in study["rows"]:
        if row["method"] == "block-topk" and row["keep"] == 0.1:
            for label, values in row["per_head"].items():
                heads[label]["kept_block_topk"] = values["recall"]
    return heads


def spread(values: list[float]) -> str:
    """``min / median / max`` of values."""
    if not values:
        return "-"
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def summary_table(sources: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["| statistic | " + " | ".join(sources) + " |", "|---" * (len(sources) + 1) + "|"]
    for key, name in STATS.items():
        cells = [spread([h[key] for h in heads.values() if key in h]) for heads in sources.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def toy_tables(heads: dict[str, dict[str, float]]) -> list[str]:
    """Per layer, and per layer and head, means over the captured steps."""
    groups: dict[tuple[int, int], list[dict[str, float]]] = {}
    for label, values in heads.items():
        match = LAYER.match(label)
        if match:
            key = (int(match["layer"]), int(match["head"]))
            groups.setdefault(key, []).append(values)
    header = "| layer | head | " + " | ".join(STATS.values()) + " |"
    rule = "|---" * (len(STATS) + 2) + "|"

    def row(layer: int, head: str, rows: list[dict[str, float]]) -> str:
        means = [statistics.fmean(r[k] for r in rows if k in r) for k in STATS]
        return f"| {layer} | {head} | " + " | ".join(f"{m:.3f}" for m in means) + " |"

    layers = sorted({layer for layer, _ in groups})
    per_layer = [
        row(layer, "all", [r for (lay, _), rows in groups.items() if lay == layer for r in rows])
        for layer in layers
    ]
    per_head_rows = [row(layer, str(head), groups[(layer, head)]) for layer, head in sorted(groups)]
    return [header, rule, *per_layer, "", header, rule, *per_head_rows]


def tails_table(studies: dict[str, dict]) -> list[str]:
    """% MSE change of each block-topk+TAIL over block-topk, per source and keep."""
    lines = ["| source | method | keep | MSE | change over block-topk |", "|---|---|---|---|---|"]
    for name, study in studies.items():
        base = {r["keep"]: r["mse"] for r in study["rows"] if r["method"] == "block-topk"}
        for r in study["rows"]:
            if r["method"].startswith("block-topk+") and r["keep"] in base:
                change = 100 * (r["mse"] / base[r["keep"]] - 1)
                lines.append(
                    f"| {name} | {r['method']} | {r['keep']:g} | {r['mse']:.3e} | {change:+.1f} % |"
                )
    return lines


def figure(sources: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """Each statistic per head, one column of points per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STATS), figsize=(3.2 * len(STATS), 3.6))
    for ax, (key, name) in zip(axes, STATS.items(), strict=True):
        for x, heads in enumerate(sources.values()):
            values = [h[key] for h in heads.values() if key in h]
            jitter = [x + 0.25 * ((i * 0.618) % 1 - 0.5) for i in range(len(values))]
            ax.scatter(jitter, values, s=8, alpha=0.6)
        ax.set_xticks(range(len(sources)), list(sources), rotation=30, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("attention anatomy per head: toy model vs synthetic presets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", type=Path, required=True, help="study.json of a toy capture")
    parser.add_argument(
        "--preset", action="append", default=[], help="NAME=study.json of a synthetic preset"
    )
    parser.add_argument("--out", type=Path, default=Path("reports/anatomy"))
    args = parser.parse_args()
    studies = {"toy": json.loads(args.toy.read_text())}
    for item in args.preset:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"--preset {item!r} is not NAME=PATH")
        studies[name] = json.loads(Path(path).read_text())
    missing = [name for name, study in studies.items() if "anatomy" not in study]
    if missing:
        parser.error(f"no anatomy in the study of {', '.join(missing)} (--experiments anatomy)")
    sources = {name: per_head(study) for name, study in studies.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    text = [
        "# Attention anatomy: toy model and synthetic presets",
        "",
        "Min / median / max over heads (toy: every captured layer, step and head).",
        "",
        *summary_table(sources),
        "",
        "## The toy model per layer (means over heads and steps) and per head (over steps)",
        "",
        *toy_tables(sources["toy"]),
        "",
        "## Block tails against dropping (MSE vs exact attention, mean over heads)",
        "",
        *tails_table(studies),
        "",
        "![anatomy](anatomy.png)",
    ]
    (args.out / "anatomy.md").write_text("\n".join(text) + "\n")
    figure(sources, args.out / "anatomy.png")
    print("\n".join(text))


if __name__ == "__main__":
    main()
