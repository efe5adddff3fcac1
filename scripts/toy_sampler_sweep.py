"""How well toy models sample: frame-classifier accuracy of dense samples over sampler settings.

For every weights directory and every (steps, shift, guidance) of the grid, ``--clips`` dense
samples (labels cycling through the shapes, the same noise for every setting) are drawn with
``tailattn.toy.sample.sample`` (bf16 autocast on CUDA) and the share whose predicted shape is
their label is recorded, the ``accuracy_samples_g*`` of ``toy_report.py`` over a grid. One frame
classifier (``quality.train_classifier``, at the first model's clip) serves every model, so
models with the same clip are compared on equal terms. Each row also has the accuracy per shape
and, since every setting starts from the same noise, a paired comparison with the first row:
the samples only the first row recognises, those only this row recognises, and the exact
McNemar p-value of the difference (``quality.mcnemar_p``). It looks only at the samples the two
settings disagree on, so it separates them with fewer samples than their accuracies do when
their outcomes are correlated (the same noise often succeeds or fails under both). Prints a
table; ``--json`` writes it with each sample's outcome (``recognised``, 0 or 1).

    python scripts/toy_sampler_sweep.py --weights src/tailattn/toy/weights /tmp/toy-run \\
        --steps 20,50 --shifts 1,2,3 --guidances 3 --device cuda --json sweep.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

from tailattn.toy import data, quality, weights
from tailattn.toy.sample import clip_of, noise, sample_batches

BATCH = 16
"""Clips per sampling batch."""


def numbers(text: str, kind: type) -> list:
    """``"20,50"`` -> [20, 50]; a usage error for anything else."""
    try:
        values = [kind(part) for part in text.split(",")]
    except ValueError:
        message = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not all(0 < value < math.inf for value in values):
        raise argparse.ArgumentTypeError(f"expected positive finite numbers, got {text!r}")
    return values


def recognised(
    model: torch.nn.Module,
    classifier: quality.ShapeClassifier,
    x: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    shift: float,
    guidance: float,
) -> list[int]:
    """Per sample from noise ``x``: 1 if the classifier gives it its label, else 0."""
    clips = sample_batches(
        model, x, labels, batch=BATCH, steps=steps, shift=shift, guidance=guidance
    )
    return quality.recognised(classifier, clips, labels).int().tolist()


def score(outcomes: list[int], labels: list[int], first: list[int] | None) -> dict:
    """Accuracy, accuracy per shape (None for a shape without samples) and, given the first
    row's outcomes, the paired comparison."""
    per_shape: dict[str, float | None] = {}
    for index, shape in enumerate(data.SHAPES):
        mine = [o for o, label in zip(outcomes, labels, strict=True) if label == index]
        per_shape[shape] = sum(mine) / len(mine) if mine else None
    row = {"accuracy": sum(outcomes) / len(outcomes), "per_shape": per_shape}
    if first is not None:
        only_first = sum(a and not b for a, b in zip(first, outcomes, strict=True))
        only_this = sum(b and not a for a, b in zip(first, outcomes, strict=True))
        p = quality.mcnemar_p(only_first, only_this)
        row["vs_first"] = {"only_first": only_first, "only_this": only_this, "p": p}
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, nargs="+", required=True)
    parser.add_argument("--steps", type=lambda s: numbers(s, int), default=[20])
    parser.add_argument("--shifts", type=lambda s: numbers(s, float), default=[2.0])
    parser.add_argument("--guidances", type=lambda s: numbers(s, float), default=[3.0])
    parser.add_argument("--clips", type=int, default=48, help="samples per setting")
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}, but CUDA is not available here")
    if args.clips < 1 or args.classifier_steps < 1:
        parser.error("--clips and --classifier-steps must be at least 1")
    if len(set(args.weights)) < len(args.weights):
        parser.error("a weights directory is given twice")
    try:
        models = {str(path): weights.load(path, args.device) for path in args.weights}
    except weights.WeightsError as err:
        parser.error(str(err))
    clips = {clip_of(model) for model in models.values()}
    if len(clips) > 1:
        parser.error(f"the models were trained on different clips {sorted(clips)}")
    frames, size, _ = clips.pop()
    start = time.perf_counter()
    classifier = quality.train_classifier(
        args.classifier_steps, device=args.device, frames=frames, size=size
    )
    real, real_labels = data.clips(987_654, 64, args.device, frames=frames, size=size)
    result = {
        "device": torch.cuda.get_device_name(args.device) if args.device != "cpu" else "cpu",
        "clips": args.clips,
        "classifier_accuracy_real": quality.label_accuracy(classifier, real, real_labels),
        "rows": [],
    }
    print(f"classifier: {result['classifier_accuracy_real']:.3f} on real clips", file=sys.stderr)
    labels = torch.arange(args.clips, device=args.device) % len(data.SHAPES)
    x = noise(args.seed + 1, args.clips, (data.CHANNELS, frames, size, size), args.device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if args.device.startswith("cuda")
        else contextlib.nullcontext()
    )
    grid = list(itertools.product(models, args.steps, args.shifts, args.guidances))
    shapes = " / ".join(data.SHAPES)
    print(f"| weights | steps | shift | guidance | accuracy | {shapes} | vs row 1: only row 1,"
          " only this (p) |\n|---|---|---|---|---|---|---|")  # fmt: skip
    first = None
    for name, steps, shift, guidance in grid:
        with autocast:
            outcomes = recognised(models[name], classifier, x, labels, steps, shift, guidance)
        row = {"weights": name, "steps": steps, "shift": shift, "guidance": guidance,
               **score(outcomes, labels.tolist(), first), "recognised": outcomes}  # fmt: skip
        if first is None:
            first = outcomes
        result["rows"].append(row)
        paired = row.get("vs_first")
        versus = (
            f"{paired['only_first']}, {paired['only_this']} ({paired['p']:.2g})" if paired else "-"
        )
        per_shape = " / ".join("-" if v is None else f"{v:.2f}" for v in row["per_shape"].values())
        print(f"| {name} | {steps} | {shift:g} | {guidance:g} | {row['accuracy']:.3f} | "
              f"{per_shape} | {versus} |", flush=True)  # fmt: skip
    result["seconds"] = time.perf_counter() - start
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
