"""Where the study's attention comes from: ``synthetic[:PRESET]``, ``toy`` or a capture FILE.

A source is a list of units, one (entry, head) each: the q, k, v of one attention head at one
layer and diffusion step, loaded only when the unit is evaluated.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..capture_file import load_capture
from ..data.synthetic import PRESETS, SyntheticSource

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Unit:
    """One head of one entry; ``load()`` returns its q, k, v, each (1, 1, N, D)."""

    label: str
    head: int
    layer: int | None
    step: int | None
    timestep: float | None
    load: Callable[[], QKV] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Source:
    """A parsed source: what it is, its grid and its units."""

    name: str
    description: str
    grid: tuple[int, int, int]
    text_tokens: int
    heads: int
    units: list[Unit]

    @property
    def steps(self) -> list[int]:
        return sorted({u.step for u in self.units if u.step is not None})

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w + self.text_tokens


def _check_heads(heads: Sequence[int] | None, available: int) -> list[int]:
    if heads is None:
        return list(range(available))
    bad = [h for h in heads if not 0 <= h < available]
    if bad:
        raise ValueError(f"heads {bad} do not exist: the source has heads 0..{available - 1}")
    return sorted(set(heads))


def synthetic_source(preset: str, seed: int, heads: Sequence[int] | None) -> Source:
    data = SyntheticSource(preset, seed)
    units = [
        Unit(f"h{h} {data.archetype(h)}", h, None, 0, None, lambda h=h: data.head(h))
        for h in _check_heads(heads, data.heads)
    ]
    spec = data.spec
    return Source(
        f"synthetic:{preset}",
        f"synthetic video-DiT attention, preset {preset} ({spec.description}), "
        f"grid {spec.grid}, {spec.heads} heads, head dim {spec.head_dim}, seed {seed}",
        spec.grid,
        0,
        spec.heads,
        units,
    )


def capture_source(path: Path, heads: Sequence[int] | None, name: str | None = None) -> Source:
    capture = load_capture(path)
    b, h = capture.meta["shape"][:2]
    chosen = _check_heads(heads, b * h)
    units = []
    for entry in capture.entries:
        for index in chosen:
            batch, head = divmod(index, h)
            label = f"L{entry.layer} s{entry.step} h{head}" + (f" b{batch}" if b > 1 else "")
            units.append(
                Unit(
                    label,
                    index,
                    entry.layer,
                    entry.step,
                    entry.timestep,
                    lambda e=entry, bb=batch, hh=head: e.head(bb, hh),
                )
            )
    meta = capture.meta
    return Source(
        name or str(path),
        f"capture {path.name} of {meta['model']}: {len(capture.entries)} entries "
        f"(layers {sorted({e.layer for e in capture.entries})}, steps {capture.steps}), "
        f"grid {tuple(meta['grid'])} + {meta['text_tokens']} text tokens, {b * h} heads",
        capture.grid,
        meta["text_tokens"],
        b * h,
        units,
    )


def toy_capture(workdir: Path, seed: int) -> Path:
    """Write the toy model's capture (``tailattn.toy``, on CUDA when available) into
    ``workdir`` and return its path."""
    try:
        from ..toy.capture import write_toy_capture
    except ImportError as err:
        raise ValueError(
            f"--source toy needs the toy model (tailattn.toy), which is not available here "
            f"({err}); use synthetic[:PRESET] or a capture file"
        ) from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return write_toy_capture(workdir / "toy.safetensors", seed=seed, device=device)


def open_source(
    text: str, *, seed: int, heads: Sequence[int] | None, workdir: Path | None = None
) -> Source:
    """Parse ``synthetic[:PRESET]``, ``toy`` or a capture file path (ValueError otherwise)."""
    text = text.strip()
    kind, _, arg = text.partition(":")
    if kind == "synthetic":
        preset = arg or "small"
        if preset not in PRESETS:
            raise ValueError(f"unknown synthetic preset {preset!r}; known: {', '.join(PRESETS)}")
        return synthetic_source(preset, seed, heads)
    if text == "toy":
        where = workdir or Path(tempfile.mkdtemp(prefix="tailattn-toy-"))
        return capture_source(toy_capture(where, seed), heads, name="toy")
    path = Path(text)
    if not path.is_file():
        raise ValueError(
            f"unknown source {text!r}: expected synthetic[:PRESET] (presets: "
            f"{', '.join(PRESETS)}), toy, or an existing capture file"
        )
    return capture_source(path, heads)
