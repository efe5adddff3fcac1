"""The per-call benchmark (``python -m tailattn.bench.calls``) on a CPU: the rows it reports,
the selection timed alone for block methods, and the scoring share of ``block-err``."""

import re

import pytest

from tailattn.bench import calls


def test_the_default_calls_include_block_err_plain_and_adaptive_at_keep_01():
    timed = set(calls.CALL_METHODS)
    for spec in ("block-err(for_tail=drop)", "block-err+uta"):
        assert (spec, 0.1) in timed
    assert ("block-err(for_tail=drop, budget=adaptive)", 0.1) in timed
    assert ("block-err(budget=adaptive)+uta", 0.1) in timed
    assert calls.SCORING_REFERENCE in timed


def test_block_rows_time_their_selection_and_block_err_reports_its_share():
    methods = [("block-topk+uta", 0.1), ("block-err+uta", 0.1), ("topk+uta", 0.5)]
    methods.append(("block-err(for_tail=drop, budget=adaptive)", 0.1))
    rows = calls.run((1, 2, 512, 32), (2, 16, 16), methods, cold_reps=0, device="cpu")
    assert [r.method for r in rows] == [
        "dense SDPA (default backend)",  # no cuDNN or flash rows off CUDA
        *(m for m, _ in methods),
        "block-topk+uta",  # the spec-string call
    ]
    by_method = {r.method: r for r in rows[1:-1]}
    reference = by_method["block-topk+uta"]
    assert reference.select_ms is not None and reference.select_ms > 0
    assert by_method["topk+uta"].select_ms is None  # a token method has no block layout
    for spec in ("block-err+uta", "block-err(for_tail=drop, budget=adaptive)"):
        row = by_method[spec]
        assert row.density == pytest.approx(0.25)  # ceil(0.1 * 4) = 1 of 4 key blocks
        share = re.fullmatch(r"selection (\d+) % of block-topk\+uta 0\.1", row.note)
        assert share is not None, row.note
        assert int(share.group(1)) == round(100 * row.select_ms / reference.ms)
    table = calls.to_markdown(rows, "cpu")
    assert "| call | keep | density | ms | x dense SDPA | selection ms | note |" in table
    assert "| topk+uta | 0.5 | 0.500 |" in table and "| - |" in table


def test_method_lists_of_the_command_line():
    text = "block-err(for_tail=drop, budget=adaptive)@0.1; rectified ;block-topk+uta@0.2"
    assert calls.parse_methods(text) == (
        ("block-err(for_tail=drop, budget=adaptive)", 0.1),
        ("rectified", None),
        ("block-topk+uta", 0.2),
    )
