"""The study's configuration: what to evaluate, on which source, how many rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import check_keeps

EXPERIMENTS = (
    "table1",
    "recall",
    "bins",
    "ablation",
    "distributions",
    "outputs",
    "anatomy",
    "steps",
)
"""Experiment names, after the UTA paper's Sec. 4 (docs/methods.md)."""

DEFAULT_METHODS = ("topk", "topk+uta", "svg2", "svg2+uta", "topk+moment", "svg2+blocks")
"""Table 1 of the paper (Top-K, Top-K+UTA, SVG2, SVG2+UTA) plus two tails of ours."""

PEER_METHODS = (
    "dfs",
    "dfs+uta",
    "block-topp+uta",
    "block-topp+blocks",
    "rectified",
    "blasst",
    "blasst+uta",
    "recall",
    "recall+uta",
)
"""The peer methods (DFSAttn, Rectified SpaAttn, BLASST, fixed recall) and the block top-p
baselines Rectified is compared with; ``--methods peers``."""

ERROR_AWARE_METHODS = (
    "block-topk",
    "block-topk+uta",
    "block-topk+blocks",
    "block-topk+moment",
    "block-err(for_tail=drop)",
    "block-err+uta",
    "block-err(for_tail=blocks)+blocks",
    "block-err+moment",
    "block-err(for_tail=drop, budget=adaptive)",
    "block-err(budget=adaptive)+uta",
)
"""The error-aware selection (issue 16) with each tail next to block-topk with the same tail,
and its adaptive budget; ``--methods errors``."""

METHOD_SETS = {"paper": DEFAULT_METHODS, "peers": PEER_METHODS, "errors": ERROR_AWARE_METHODS}
"""Named method lists: a ``--methods`` entry with one of these names stands for the list."""


def expand_methods(specs: tuple[str, ...]) -> tuple[str, ...]:
    """Replace every name of :data:`METHOD_SETS` by its methods, keeping the order."""
    return tuple(m for spec in specs for m in METHOD_SETS.get(spec, (spec,)))


DEFAULT_KEEPS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_BINS = (1, 2, 4, 8, 16, 32)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study run depends on.

    Attributes:
        source: ``synthetic[:PRESET]``, ``toy`` or a capture file path.
        methods: method specs for ``table1`` and ``recall``.
        keeps: keep ratios in (0, 1].
        experiments: names from :data:`EXPERIMENTS`; ``None``: all that apply to the source.
        heads: head indices to evaluate (``None``: all).
        queries: query rows sampled per head (``None``: all rows).
        seed: seeds the synthetic data and the row sampling.
        focus_keep: keep of the distribution, output and per-step experiments (Fig. 5, 8).
        bins: bin counts of the ``bins`` experiment, run at the smallest keep.
        dtype: ``float32`` or ``float64`` for the exact logits and every method.
    """

    source: str = "synthetic"
    methods: tuple[str, ...] = DEFAULT_METHODS
    keeps: tuple[float, ...] = DEFAULT_KEEPS
    experiments: tuple[str, ...] | None = None
    heads: tuple[int, ...] | None = None
    queries: int | None = None
    seed: int = 0
    focus_keep: float = 0.25
    bins: tuple[int, ...] = DEFAULT_BINS
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "keeps", check_keeps(self.keeps))
        if self.experiments is not None:
            unknown = [e for e in self.experiments if e not in EXPERIMENTS]
            if unknown:
                raise ValueError(
                    f"unknown experiment(s) {', '.join(map(repr, unknown))}; "
                    f"known: {', '.join(EXPERIMENTS)}"
                )
            if not self.experiments:
                raise ValueError("the experiment list is empty")
        if self.queries is not None and (isinstance(self.queries, bool) or self.queries < 1):
            raise ValueError(f"queries must be a positive integer, got {self.queries!r}")
        if self.heads is not None and not self.heads:
            raise ValueError("the head list is empty")
        check_keeps((self.focus_keep,))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.bins or any(not 1 <= b <= 64 for b in self.bins):
            raise ValueError(f"bins must be bin counts in 1..64, got {self.bins}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
