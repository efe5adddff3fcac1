"""Publish a toy model's GPU results into the repository: weights, result tables and figures.

``OUT=DIR bash scripts/toy_gpu.sh report GPU RUN`` leaves in DIR the weight shards,
``card.json`` and ``toy_results.tar.gz`` (``train/``, ``report/``, ``anatomy/``, ``study-toy/``,
...). This script puts each where the package and the docs read it, so that a new model replaces
every file of the old one in one step:

    python scripts/toy_publish.py --out-dir DIR [--report EXTRA_REPORT_DIR ...]

- ``src/tailattn/toy/weights/``: the shards and ``card.json`` (the model is loaded first through
  ``tailattn.toy.weights.load``, which checks every shard against the card's SHA-256; nothing
  is replaced if that fails; the old shards are removed) and ``train/loss.json``;
- ``docs/results/toy_report.md`` and ``.json``: the rows of ``report/`` followed by those of
  each ``--report`` directory (another ``scripts/toy_report.py`` run on the same weights, e.g.
  the selections a second GPU measured), each (method, keep) once; the info and the model
  quality of ``report/``, and in the JSON ``runs``: each report's settings, seconds, model
  quality and selections;
- ``docs/figures/``: ``toy_loss.png`` (``train/loss.png``), ``toy_samples.png`` (the samples at
  the default guidance, ``report/toy_samples_g3.png``), ``toy_anatomy.png``
  (``anatomy/anatomy.png``) and ``toy_fig8b.png`` (redrawn from the joined rows);
- ``docs/results/toy_anatomy.md`` (its figure link pointed at ``docs/figures``) and
  ``toy_study.md`` (the study's report without its figures, which are not kept).

The prose that quotes these numbers (``docs/results/toy.md``, ``docs/toy.md``, the README) is
updated by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import toy_report  # scripts/ is on the path when this runs as a script

from tailattn.toy import weights
from tailattn.toy.pipeline import DEFAULT_GUIDANCE

ROOT = Path(__file__).resolve().parent.parent
IMAGE_LINE = re.compile(r"^!\[[^\]]*\]\([^)]*\)\s*$")


def _run(report: dict) -> dict:
    """What ``runs`` records of one report: its settings, time, model quality and methods."""
    return {**report["info"], "quality": report["quality"],
            "methods": sorted({r["method"].split("+")[0] for r in report["rows"]})}  # fmt: skip


def joined_report(main: Path, extra: list[Path]) -> dict:
    """``main``'s report with the rows of each ``extra`` report after its own and ``runs``, one
    entry per report; a (method, keep) measured twice is an error, not a silent choice."""
    report = json.loads((main / "toy_report.json").read_text())
    report["runs"] = [_run(report)]
    seen = {(r["method"], r["keep"]) for r in report["rows"]}
    for directory in extra:
        other = json.loads((directory / "toy_report.json").read_text())
        report["runs"].append(_run(other))
        for row in other["rows"]:
            key = (row["method"], row["keep"])
            if key in seen:
                raise ValueError(f"{directory}: {key[0]} keep={key[1]} is in an earlier report too")
            seen.add(key)
            report["rows"].append(row)
        report["skipped"] += [s for s in other["skipped"] if s not in report["skipped"]]
    return report


def publish(out_dir: Path, extra: list[Path], root: Path) -> list[Path]:
    """Copy the results in ``out_dir`` into the repository at ``root``; the files written."""
    card = weights.read_card(out_dir)
    weights.load(out_dir)  # every shard checked against the card before anything is replaced
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp)
        with tarfile.open(out_dir / "toy_results.tar.gz") as archive:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(results, **safe)  # no absolute paths or links out of it
        needed = [
            "train/loss.json",
            "train/loss.png",
            "report/toy_report.json",
            f"report/toy_samples_g{DEFAULT_GUIDANCE:g}.png",
            "anatomy/anatomy.md",
            "anatomy/anatomy.png",
            "study-toy/report.md",
        ]
        missing = [name for name in needed if not (results / name).is_file()]
        if missing:
            raise FileNotFoundError(f"toy_results.tar.gz lacks {', '.join(missing)}")
        report = joined_report(results / "report", extra)

        target = root / "src" / "tailattn" / "toy" / "weights"
        for old in target.glob("toy-*.safetensors"):
            old.unlink()
        written = []
        for name in [f["name"] for f in card["files"]] + [weights.CARD]:
            written.append(Path(shutil.copy(out_dir / name, target / name)))
        written.append(Path(shutil.copy(results / "train/loss.json", target / "loss.json")))

        docs, figures = root / "docs" / "results", root / "docs" / "figures"
        info, quality = report["info"], report["quality"]
        toy_report.write(results, info, quality, report["rows"], report["skipped"])
        written.append(Path(shutil.copy(results / "toy_report.md", docs / "toy_report.md")))
        (docs / "toy_report.json").write_text(json.dumps(report, indent=1) + "\n")
        written.append(docs / "toy_report.json")
        for source, name in (
            ("train/loss.png", "toy_loss.png"),
            (f"report/toy_samples_g{DEFAULT_GUIDANCE:g}.png", "toy_samples.png"),
            ("anatomy/anatomy.png", "toy_anatomy.png"),
            ("toy_fig8b.png", "toy_fig8b.png"),
        ):
            written.append(Path(shutil.copy(results / source, figures / name)))
        anatomy = (results / "anatomy/anatomy.md").read_text()
        (docs / "toy_anatomy.md").write_text(
            anatomy.replace("(anatomy.png)", "(../figures/toy_anatomy.png)")
        )
        study = (results / "study-toy/report.md").read_text().splitlines()
        (docs / "toy_study.md").write_text(
            "\n".join(line for line in study if not IMAGE_LINE.match(line)).rstrip() + "\n"
        )
        written += [docs / "toy_anatomy.md", docs / "toy_study.md"]
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="$OUT of toy_gpu.sh report")
    parser.add_argument(
        "--report", type=Path, action="append", default=[], help="another toy_report.py output"
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root to write into")
    args = parser.parse_args(argv)
    for directory in args.report:
        if not (directory / "toy_report.json").is_file():
            parser.error(f"--report {directory}: no toy_report.json there")
    if not (args.out_dir / "toy_results.tar.gz").is_file():
        parser.error(f"--out-dir {args.out_dir}: no toy_results.tar.gz there")
    try:
        written = publish(args.out_dir, args.report, args.root)
    except (weights.WeightsError, ValueError, FileNotFoundError) as err:
        sys.exit(f"toy_publish.py: {err}")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
