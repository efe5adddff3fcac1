"""End-to-end report of the toy model: sparse methods against dense sampling, and model quality.

For each selection x keep x tail, the toy model samples a batch of clips (``--clips-per-label``
per shape, at the clip size the model was trained on) densely and sparsely from the same noise
(``tailattn.toy.sample.dense_and_sparse``, first quarter of the steps dense; bf16 autocast on
CUDA, float32 on the CPU) and records PSNR and SSIM of the sparse clips against the dense
ones, the attention-output MSE per step (against exact attention of the same q, k, v, and
against the dense run), and the shape-classifier accuracy of the sparse clips. Selections
``dfs``, ``rectified`` and ``recall`` join when registered. The model's own quality: classifier
accuracy on fresh real clips (calibration) and on dense samples at each ``--guidances`` scale
(the first listed is the default of the model's samples, ``DEFAULT_GUIDANCE``), and the mean
frame-to-frame change of samples against real clips.

Writes into ``--out``: ``toy_report.md`` (tables), ``toy_report.json`` (everything, per step),
``toy_fig8b.png`` (MSE per step, drop against uta, at the smallest keep), ``toy_data.png`` and
``toy_samples_g*.png`` (frame strips of real clips and of dense samples, one per shape).

    python scripts/toy_report.py --device cuda --out reports/toy            # GPU: about 5 minutes
    python scripts/toy_report.py --preset cpu --out reports/toy-cpu         # CPU: fewer settings

The dense run is recorded once and every sparse run is compared with the recording
(``tailattn.toy.sample.dense_run``; tested to give the numbers of running both in lockstep, with
one transformer call per step fewer; its outputs take 1.3 GB in bf16 at the toy's 16,384
tokens, 4 clips and 20 steps; ``--fresh-dense`` runs the dense model beside each method again).
On the H200 at the toy's 16,384 tokens a method took 26 % less time, not counting the one dense
recording (``block-topk`` at keep 0.1 with ``drop`` and ``uta``, 4 clips, 20 steps: 5.85 -> 4.30 s
and 5.02 -> 3.69 s; one run each), on the 2-core
CPU at 8 x 32 x 32 (2,048 tokens, 8 steps) 32-40 % less (three methods) after one 4.2 s dense
run, both with the same MSE to the last digit.
``--probe-rows R`` computes the exact attention behind the per-step MSE for R sampled query
rows per layer instead of all (``tailattn.toy.probe``: an unbiased estimate; the videos do not
change). With ``dense_and_sparse`` at 8 x 32 x 32 (2,048 tokens) on the 2-core CPU a run took
12-18 % less time with R = 256 and its mean MSE moved by 0.1-0.9 % (three methods); on the H200
with R = 1,024 14-18 % less than the recorded run (4.30 -> 3.68 s, 3.69 -> 3.02 s), MSE +0.7 %
and -0.3 %, PSNR unchanged (2026-11-30).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from tailattn.cli.common import split_methods
from tailattn.methods import Method, registry
from tailattn.toy import data, quality, weights
from tailattn.toy.pipeline import DEFAULT_GUIDANCE, DEFAULT_SHIFT
from tailattn.toy.sample import (
    Comparison,
    DenseRun,
    clip_of,
    dense_and_sparse,
    dense_run,
    noise,
    sample_batches,
)
from tailattn.toy.strip import save_strip

PRESETS = {
    "gpu": {
        "selections": "block-topk,svg2,radial,dfs,rectified,recall",
        "keeps": "0.1,0.2,0.3",
        "tails": "drop,uta,blocks,moment",
        "clips_per_label": 1,
        "steps": 20,
        "quality_clips": 48,
        "guidances": f"{DEFAULT_GUIDANCE:g},1",
        "classifier_steps": 1500,
    },
    "cpu": {
        "selections": "block-topk,radial",
        "keeps": "0.1",
        "tails": "drop,uta",
        "clips_per_label": 1,
        "steps": 10,
        "quality_clips": 8,
        "guidances": f"{DEFAULT_GUIDANCE:g}",
        "classifier_steps": 150,
    },
}


def selection_name(spec: str) -> str:
    """The selection of a ``--selections`` entry (a name, or a name with parameters).

    Raises:
        ValueError: a spec that does not parse, or one with a tail (the report adds the tails).
    """
    method = Method.parse(spec)
    if "+" in spec:
        raise ValueError(f"{spec!r}: --selections takes selections; --tails gives the tails")
    return method.selection


def runs(
    selections: list[str], keeps: list[float], tails: list[str]
) -> list[tuple[str, float | None]]:
    """The (spec, keep) pairs to measure: registered selections only (a name, or a name with
    parameters such as ``block-err(for_tail=drop)``), each with the tails of its granularity;
    selections without a keep ratio run once with their default parameters. Sorted by keep,
    then tail, then selection, so the smallest keep with drop and uta comes first; the
    selections without a keep ratio come last (a run cut short by ``--max-minutes`` keeps the
    keep-ratio table whole as far as it got)."""
    known = registry.selections()
    chosen = []
    for name in selections:
        entry = known.get(selection_name(name))
        if entry is None:
            print(f"skipping {name}: not registered", file=sys.stderr)
            continue
        # fused methods (rectified, blasst, recall) take the block tails where they take one
        granularity = {"dense": "token", "fused": "block"}.get(entry.granularity, entry.granularity)
        usable = [t for t in tails if t in registry.tails(granularity)]
        budgets: list[float | None] = list(keeps) if "keep" in entry.params else [None]
        chosen += [(name, tail, keep) for keep in budgets for tail in usable]
    chosen.sort(
        key=lambda c: (
            math.inf if c[2] is None else c[2],
            tails.index(c[1]),
            selections.index(c[0]),
        )
    )
    return [(f"{name}+{tail}", keep) for name, tail, keep in chosen]


def measure(
    model: torch.nn.Module,
    classifier: quality.ShapeClassifier,
    spec: str,
    keep: float | None,
    labels: torch.Tensor,
    args: argparse.Namespace,
    dense: DenseRun | None = None,
) -> dict[str, object]:
    """One (spec, keep): PSNR, SSIM, MSE per step, classifier accuracy of the sparse clips;
    against ``dense``, the dense run recorded once, when given."""
    start = time.perf_counter()
    result: Comparison = dense_and_sparse(
        model,
        spec,
        keep,
        seed=args.seed,
        labels=labels,
        steps=args.steps,
        shift=args.shift,
        guidance=args.guidance,
        warmup_steps=args.steps // 4,
        probe_rows=args.probe_rows,
        dense=dense,
    )
    sparse_steps = sorted({c.step for c in result.calls if not c.dense})
    local = [result.mse_local[i] for i in sparse_steps] or [0.0]
    trajectory = [result.mse_vs_dense[i] for i in sparse_steps] or [0.0]
    kept = [c.keep for c in result.calls if not c.dense and c.keep is not None]
    return {
        "method": spec,
        "keep": keep,
        "psnr": quality.psnr(result.sparse, result.dense),
        "ssim": quality.ssim(result.sparse, result.dense),
        "mse_local_mean": sum(local) / len(local),
        "mse_vs_dense_mean": sum(trajectory) / len(trajectory),
        "mse_local": result.mse_local,
        "mse_vs_dense": result.mse_vs_dense,
        "accuracy_sparse": quality.label_accuracy(classifier, result.sparse, labels),
        "accuracy_dense": quality.label_accuracy(classifier, result.dense, labels),
        "sparse_steps": sparse_steps,
        "keep_used": kept[0] if kept else None,
        "seconds": time.perf_counter() - start,
    }


def model_quality(
    model: torch.nn.Module,
    classifier: quality.ShapeClassifier,
    args: argparse.Namespace,
    device: str,
) -> dict[str, object]:
    """Classifier accuracy on real clips and on dense samples; motion of both. Writes frame
    strips of real clips (``toy_data.png``) and of samples per guidance scale
    (``toy_samples_g*.png``), one clip per shape."""
    n = args.quality_clips
    names = list(data.SHAPES)
    frames, size, _ = clip_of(model)
    real, real_labels = data.clips(987_654, max(n, 64), device, frames=frames, size=size)
    labels = torch.arange(n, device=device) % len(data.SHAPES)
    x = noise(args.seed + 1, n, (data.CHANNELS, frames, size, size), device)
    out: dict[str, object] = {
        "classifier_accuracy_real": quality.label_accuracy(classifier, real, real_labels),
        "motion_real": quality.motion(real),
        "clips": n,
    }
    for guidance in [float(g) for g in args.guidances.split(",")]:
        clips = sample_batches(
            model, x, labels, batch=16, steps=args.steps, shift=args.shift, guidance=guidance
        )
        out[f"accuracy_samples_g{guidance:g}"] = quality.label_accuracy(classifier, clips, labels)
        out[f"motion_samples_g{guidance:g}"] = quality.motion(clips)
        shown = min(n, len(data.SHAPES))
        strip = args.out / f"toy_samples_g{guidance:g}.png"
        save_strip(clips[:shown].float(), strip, names[:shown], scale=max(1, 128 // size))
    kinds = torch.arange(len(data.SHAPES))
    real, _ = data.clips(987_654, len(kinds), device, labels=kinds, frames=frames, size=size)
    save_strip(real, args.out / "toy_data.png", names, scale=max(1, 128 // size))
    return out


def _number(value: float, digits: int = 2) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def markdown(rows: list[dict], info: dict, model_q: dict, skipped: list[str]) -> str:
    lines = [
        "# Toy model: sparse attention end to end",
        "",
        f"Device: {info['device']}; torch {info['torch']}; {info['dtype']}; "
        f"model: {info['model']}; "
        f"{info['steps']} steps (first {info['steps'] // 4} dense), shift {info['shift']}, "
        f"guidance {info['guidance']}, {info['clips']} clips (seed {info['seed']}); "
        + (
            "MSE vs exact over every query row."
            if info.get("probe_rows") is None
            else f"MSE vs exact over {info['probe_rows']} sampled query rows per layer "
            "(every row where there are fewer)."
        ),
        "",
        "| method | keep | PSNR (dB) | SSIM | MSE vs exact (mean of sparse steps) "
        "| MSE vs dense run | shape acc. sparse |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        keep = "-" if r["keep"] is None else f"{r['keep']:g}"
        lines.append(
            f"| {r['method']} | {keep} | {_number(r['psnr'])} | {r['ssim']:.4f} | "
            f"{r['mse_local_mean']:.3e} | {r['mse_vs_dense_mean']:.3e} | "
            f"{r['accuracy_sparse']:.2f} |"
        )
    if skipped:
        lines += ["", *(f"- skipped: {line}" for line in skipped)]
    lines += ["", "## Model quality", "", "| measure | value |", "| --- | --- |"]
    lines += [
        f"| {key} | {value if isinstance(value, int) else f'{value:.4f}'} |"
        for key, value in model_q.items()
    ]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path) -> None:
    """MSE per step, drop against uta, per selection at the smallest keep (Fig. 8b style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keeps = sorted({r["keep"] for r in rows if r["keep"] is not None})
    chosen = [r for r in rows if r["keep"] in (keeps[:1] or [None])]
    selections = sorted({r["method"].split("+")[0] for r in chosen})
    fig, axes = plt.subplots(2, len(selections), figsize=(4 * len(selections), 6), squeeze=False)
    for col, selection in enumerate(selections):
        for tail, colour in (("drop", "tab:red"), ("uta", "tab:blue")):
            found = [r for r in chosen if r["method"] == f"{selection}+{tail}"]
            for row, key in enumerate(("mse_local", "mse_vs_dense")):
                ax = axes[row][col]
                if found:
                    values = [max(v, 1e-12) for v in found[0][key]]
                    ax.plot(range(len(values)), values, color=colour, label=tail, marker=".")
                ax.set_yscale("log")
                ax.set_xlabel("diffusion step")
                ax.grid(alpha=0.3)
        keep = chosen[0]["keep"]
        axes[0][col].set_title(f"{selection}, keep {keep}")
        axes[0][col].legend()
    axes[0][0].set_ylabel("attention MSE vs exact")
    axes[1][0].set_ylabel("attention MSE vs dense run")
    fig.suptitle("toy Wan: attention-output MSE per step (mean over layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, info: dict, model_q: dict, rows: list[dict], skipped: list[str]) -> None:
    """The report files so far (rewritten after every measured method)."""
    (out / "toy_report.md").write_text(markdown(rows, info, model_q, skipped))
    (out / "toy_report.json").write_text(
        json.dumps({"info": info, "quality": model_q, "rows": rows, "skipped": skipped}, indent=1)
        + "\n"
    )
    if rows:
        figure(rows, out / "toy_fig8b.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="gpu")
    parser.add_argument("--selections")
    parser.add_argument("--keeps")
    parser.add_argument("--tails")
    parser.add_argument("--clips-per-label", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--quality-clips", type=int)
    parser.add_argument("--guidances", help="guidance scales of the quality samples, e.g. 3,1")
    parser.add_argument("--classifier-steps", type=int)
    parser.add_argument("--shift", type=float, default=DEFAULT_SHIFT)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fresh-dense",
        action="store_true",
        help="run the dense model again beside every sparse run (default: record it once)",
    )
    parser.add_argument(
        "--probe-rows",
        type=int,
        help="exact attention of the per-step MSE on this many sampled query rows (default all)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        help="autocast dtype of the sampling (default bfloat16 on CUDA, float32 on the CPU)",
    )
    parser.add_argument("--weights", type=Path)
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new method after this many minutes (default: run every method)",
    )
    parser.add_argument("--out", type=Path, default=Path("reports/toy"))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}, but CUDA is not available here")
    if args.probe_rows is not None and args.probe_rows < 1:
        parser.error(f"--probe-rows must be at least 1, got {args.probe_rows}")
    try:  # before any work: a typo should not cost the classifier's training
        for spec in split_methods(args.selections) or ():
            selection_name(spec)
    except ValueError as err:
        parser.error(str(err))
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = weights.load(args.weights, args.device)
    card = weights.read_card(args.weights)
    frames, size, _ = clip_of(model)
    classifier = quality.train_classifier(
        args.classifier_steps, device=args.device, frames=frames, size=size
    )
    print(f"classifier trained at {time.perf_counter() - start:.0f} s", file=sys.stderr)
    autocast = (
        torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
        if args.dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    with autocast:
        model_q = model_quality(model, classifier, args, args.device)
    print(f"model quality at {time.perf_counter() - start:.0f} s: {model_q}", file=sys.stderr)
    labels = torch.arange(len(data.SHAPES), device=args.device).repeat(args.clips_per_label)
    plan = runs(
        list(split_methods(args.selections) or ()),
        [float(k) for k in args.keeps.split(",")],
        args.tails.split(","),
    )
    info = {
        "device": torch.cuda.get_device_name(args.device) if cuda else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "model": f"{card['config']}, {card['training']['steps']} training steps",
        "steps": args.steps,
        "shift": args.shift,
        "guidance": args.guidance,
        "clips": int(labels.numel()),
        "seed": args.seed,
        "probe_rows": args.probe_rows,
    }
    dense = None
    if not args.fresh_dense and plan:  # one dense run for every method (toy.sample.DenseRun)
        with autocast:
            dense = dense_run(
                model, seed=args.seed, labels=labels, steps=args.steps, shift=args.shift,
                guidance=args.guidance,
            )  # fmt: skip
    rows: list[dict] = []
    skipped: list[str] = []
    for index, (spec, keep) in enumerate(plan):
        limit = args.max_minutes
        if index and limit is not None and time.perf_counter() - start > 60 * limit:
            skipped += [f"{s} keep={k}: out of time" for s, k in plan[index:]]
            break
        try:
            with autocast:
                row = measure(model, classifier, spec, keep, labels, args, dense)
        except (TypeError, ValueError, RuntimeError) as err:
            skipped.append(f"{spec} keep={keep}: {type(err).__name__}: {err}")
            print(f"[{index + 1}/{len(plan)}] {skipped[-1]}", file=sys.stderr)
            continue
        rows.append(row)
        print(
            f"[{index + 1}/{len(plan)}] {spec} keep={keep}: PSNR {_number(row['psnr'])} "
            f"SSIM {row['ssim']:.4f} MSE {row['mse_local_mean']:.3e} "
            f"({row['seconds']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        info["seconds"] = round(time.perf_counter() - start, 1)
        write(args.out, info, model_q, rows, skipped)
    info["seconds"] = round(time.perf_counter() - start, 1)
    write(args.out, info, model_q, rows, skipped)
    print(markdown(rows, info, model_q, skipped))
    if not rows:
        sys.exit(f"no method was measured ({len(skipped)} skipped); see {args.out}/toy_report.md")


if __name__ == "__main__":
    main()
