"""Publish a toy model's GPU results into the repository: weights, result tables and figures.

``OUT=DIR bash scripts/toy_gpu.sh report GPU RUN`` leaves in DIR the weight shards,
``card.json`` and ``toy_results.tar.gz`` (``train/``, ``report/``, ``anatomy/``, ``study-toy/``,
...). This script puts each where the package and the docs read it, so that every file the
report stage produces replaces the old model's in one step:

    python scripts/toy_publish.py --out-dir DIR [--report EXTRA_REPORT_DIR ...]

- ``src/tailattn/toy/weights/``: the shards, ``card.json`` and ``train/loss.json`` (the old
  shards removed);
- ``docs/results/toy_report.md`` and ``.json``: the rows of ``report/`` and of each
  ``--report`` directory (another ``scripts/toy_report.py`` run on the same weights and
  settings, e.g. the selections a second GPU measured), each (method, keep) once, ordered by
  keep (methods without one last); the info and model quality of ``report/``; a method that a
  later run measured is no longer listed as skipped; in the JSON, ``runs``: per report its
  settings, seconds, model quality and the selections, keeps and tails it measured;
- ``docs/figures/``: ``toy_loss.png`` (``train/loss.png``), ``toy_samples.png`` (the samples at
  the default guidance, ``report/toy_samples_g3.png``), ``toy_anatomy.png``
  (``anatomy/anatomy.png``) and ``toy_fig8b.png`` (redrawn from the joined rows);
- ``docs/results/toy_anatomy.md`` (its figure link pointed at ``docs/figures``) and
  ``toy_study.md`` (the study's report without its figures, which are not kept).

Everything is read, checked (every shard against the card's SHA-256 by loading the model; the
reports' settings against each other) and built in a temporary directory before the first file
in the repository is replaced. Updated by hand, since they quote these numbers or come from
other runs: ``docs/results/toy.md``, ``docs/toy.md``, the README, and other results of the old
model (``toy_sampler_sweep_h200.json``, ``skipping_toy_h200.json``).
"""

from __future__ import annotations

import argparse
import json
import math
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
COPIED = {
    "src/tailattn/toy/weights/loss.json": "train/loss.json",
    "docs/figures/toy_loss.png": "train/loss.png",
    "docs/figures/toy_samples.png": f"report/toy_samples_g{DEFAULT_GUIDANCE:g}.png",
    "docs/figures/toy_anatomy.png": "anatomy/anatomy.png",
}
"""Files of the results archive published as they are: {path in the repository: in the archive}."""
NEEDED = (*COPIED.values(), "report/toy_report.json", "anatomy/anatomy.md", "study-toy/report.md")
SAME = ("model", "steps", "shift", "guidance", "clips", "seed", "dtype", "probe_rows")
"""Settings of a report that another report joined with it must share."""


def read_report(path: Path) -> dict:
    """A ``toy_report.json``, checked for the keys the join reads."""
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: {err}") from None
    if not isinstance(report, dict) or not {"info", "quality", "rows", "skipped"} <= report.keys():
        raise ValueError(f"{path}: not a toy_report.json (info, quality, rows, skipped)")
    return report


def _run(report: dict) -> dict:
    """What ``runs`` records of one report: settings, time, model quality, what it measured."""
    methods = [r["method"].split("+") for r in report["rows"]]
    return {
        **report["info"],
        "quality": report["quality"],
        "selections": sorted({m[0] for m in methods}),
        "tails": sorted({m[1] for m in methods if len(m) > 1}),
        "keeps": sorted({r["keep"] for r in report["rows"] if r["keep"] is not None}),
    }


def joined_report(main: Path, extra: list[Path]) -> dict:
    """``main``'s report joined by the rows of each ``extra`` (module docstring); a (method, keep)
    measured twice or a report of other settings is an error, not a silent choice."""
    report = read_report(main)
    report["runs"] = [_run(report)]
    seen = {(r["method"], r["keep"]) for r in report["rows"]}
    for path in extra:
        other = read_report(path)
        differ = [k for k in SAME if other["info"].get(k) != report["info"].get(k)]
        if differ:
            raise ValueError(f"{path}: other settings than {main} ({', '.join(differ)})")
        for row in other["rows"]:
            if (row["method"], row["keep"]) in seen:
                raise ValueError(f"{path}: {row['method']} keep={row['keep']} is in another report")
            seen.add((row["method"], row["keep"]))
        report["rows"] += other["rows"]
        report["skipped"] += [s for s in other["skipped"] if s not in report["skipped"]]
        report["runs"].append(_run(other))
    if not report["rows"]:
        raise ValueError(f"{main}: no method was measured")
    report["rows"].sort(key=lambda r: math.inf if r["keep"] is None else r["keep"])
    measured = tuple(f"{m} keep={k}:" for m, k in seen)  # toy_report.py's skipped lines
    report["skipped"] = [s for s in report["skipped"] if not s.startswith(measured)]
    return report


def build(out_dir: Path, extra: list[Path], stage: Path) -> dict[str, Path]:
    """Every published file, checked and written under ``stage``: {path in the repository:
    file under ``stage``}."""
    card = weights.read_card(out_dir)
    weights.load(out_dir)  # every shard checked against the card
    results = stage / "results"
    try:
        with tarfile.open(out_dir / "toy_results.tar.gz") as archive:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(results, **safe)  # with the filter: nothing outside results
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{out_dir / 'toy_results.tar.gz'}: {err}") from None
    missing = [name for name in NEEDED if not (results / name).is_file()]
    if missing:
        raise ValueError(f"toy_results.tar.gz lacks {', '.join(missing)}")
    report = joined_report(results / "report/toy_report.json", extra)

    built = stage / "built"
    built.mkdir()
    (built / "toy_report.md").write_text(
        toy_report.markdown(report["rows"], report["info"], report["quality"], report["skipped"])
    )
    (built / "toy_report.json").write_text(json.dumps(report, indent=1) + "\n")
    toy_report.figure(report["rows"], built / "toy_fig8b.png")
    anatomy = (results / "anatomy/anatomy.md").read_text()
    (built / "toy_anatomy.md").write_text(
        anatomy.replace("(anatomy.png)", "(../figures/toy_anatomy.png)")
    )
    study = (results / "study-toy/report.md").read_text().splitlines()
    (built / "toy_study.md").write_text(
        "\n".join(line for line in study if not IMAGE_LINE.match(line)).rstrip() + "\n"
    )
    files = {f"src/tailattn/toy/weights/{f['name']}": out_dir / f["name"] for f in card["files"]}
    return files | {
        "src/tailattn/toy/weights/card.json": out_dir / weights.CARD,
        **{target: results / source for target, source in COPIED.items()},
        "docs/figures/toy_fig8b.png": built / "toy_fig8b.png",
        **{
            f"docs/results/{name}": built / name
            for name in ("toy_report.md", "toy_report.json", "toy_anatomy.md", "toy_study.md")
        },
    }


def publish(out_dir: Path, extra: list[Path], root: Path) -> list[Path]:
    """Build everything (:func:`build`), then replace the repository's files at ``root``: the
    old shards removed, each file written anew (without the source's mode). Returns the files
    written."""
    with tempfile.TemporaryDirectory() as stage:
        files = build(out_dir, extra, Path(stage))
        for old in (root / "src/tailattn/toy/weights").glob("toy-*.safetensors"):
            old.unlink()
        for target, source in files.items():
            (root / target).unlink(missing_ok=True)  # a read-only old file is replaced too
            shutil.copyfile(source, root / target)
    return [root / target for target in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="$OUT of toy_gpu.sh report")
    parser.add_argument(
        "--report", type=Path, action="append", default=[], help="another toy_report.py output"
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root to write into")
    args = parser.parse_args()
    for directory in args.report:
        if not (directory / "toy_report.json").is_file():
            parser.error(f"--report {directory}: no toy_report.json there")
    if not (args.out_dir / "toy_results.tar.gz").is_file():
        parser.error(f"--out-dir {args.out_dir}: no toy_results.tar.gz there")
    try:
        written = publish(args.out_dir, [d / "toy_report.json" for d in args.report], args.root)
    except ValueError as err:  # tailattn.toy.weights.WeightsError is one
        sys.exit(f"toy_publish.py: {err}")
    print("\n".join(str(path) for path in written))


if __name__ == "__main__":
    main()
