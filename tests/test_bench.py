"""The benchmark code itself, on a CPU with a two-layer Wan (its GPU numbers are in
BENCHMARKS.md): every row it reports is there and consistent."""

import pytest

pytest.importorskip("diffusers")

from diffusers_tiny import one_thread  # noqa: F401
from tailattn.bench import e2e

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_transformer_step_dense_and_sparse_with_its_ceiling():
    rows = e2e.run(
        "wan-tiny", [("block-topk+uta", 0.5)], modes=("eager",), device="cpu", warmup=0, reps=1
    )
    assert [(r.mode, r.method) for r in rows] == [
        ("eager", "dense (default SDPA)"),
        ("eager", "dense (cuDNN SDPA)"),
        ("eager", "block-topk+uta"),
    ]
    sparse = rows[-1]
    assert sparse.density == pytest.approx(0.5)
    assert sparse.seconds > 0 and sparse.speedup == pytest.approx(rows[0].seconds / sparse.seconds)
    # the ceiling: only attention gets cheaper, in proportion to the density
    assert 1.0 < sparse.ceiling < 2.0
    assert "| wan-tiny | eager | block-topk+uta | 0.5 |" in e2e.to_markdown(rows, "t")
