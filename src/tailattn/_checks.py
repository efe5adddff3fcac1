"""Input validation shared by every entry point.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong value or
shape) with a message that names the argument and the expected form. Nothing here copies data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from importlib.util import find_spec

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("bhnd", "bnhd")


@functools.cache
def triton_installed() -> bool:
    """The ``triton`` package is importable (asked once per process)."""
    return find_spec("triton") is not None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs are computed in float64, everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(x: object, name: str, ndim: int | None = None) -> torch.Tensor:
    """A floating tensor of the given rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    """Reject NaN and Inf: a sparse method would otherwise spread them silently."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout  # type: ignore[return-value]


def to_bhnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a (B, N, H, D) tensor as (B, H, N, D); no copy."""
    return x.transpose(1, 2) if layout == "bnhd" else x


def check_qkv(
    q: object, k: object, v: object, layout: str = "bhnd", *, finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate q, k, v and return them as (B, H, N, D) views.

    Shapes (``layout="bhnd"``): q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv).
    With ``layout="bnhd"`` the second and third axes are swapped, as diffusers passes them.
    """
    layout = check_layout(layout)
    form = "(B, H, N, D)" if layout == "bhnd" else "(B, N, H, D)"
    tensors = {}
    for name, x in (("q", q), ("k", k), ("v", v)):
        x = check_tensor(x, name)
        if x.ndim != 4:
            raise ValueError(
                f"{name} must be 4-D {form} for layout={layout!r}, got shape {tuple(x.shape)}"
            )
        if 0 in x.shape:
            raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
        tensors[name] = to_bhnd(x, layout)
    q4, k4, v4 = tensors["q"], tensors["k"], tensors["v"]
    for name, x in (("k", k4), ("v", v4)):
        if x.dtype != q4.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q4.dtype}; they must match")
        if x.device != q4.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q4.device}; they must match")
        if x.shape[:2] != q4.shape[:2]:
            raise ValueError(
                f"{name} has (batch, heads) = {tuple(x.shape[:2])} but q has "
                f"{tuple(q4.shape[:2])}; they must match"
            )
    if q4.is_meta:
        raise ValueError("q is on the meta device (shapes without data); attention needs data")
    if k4.shape[3] != q4.shape[3]:
        raise ValueError(f"k has head dim {k4.shape[3]} but q has {q4.shape[3]}; they must match")
    if v4.shape[2] != k4.shape[2]:
        raise ValueError(
            f"v has {v4.shape[2]} tokens but k has {k4.shape[2]}; keys and values must pair up"
        )
    if finite:
        for name, x in (("q", q4), ("k", k4), ("v", v4)):
            check_finite(x, name)
    return q4, k4, v4


def check_scale(scale: object, head_dim: int) -> float:
    """Default 1/sqrt(d); otherwise a finite positive number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return float(scale)


def check_fraction(value: object, name: str) -> float:
    """A number in (0, 1]: keep ratios, target recalls, top-p masses."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}")
    if not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def check_positive(value: object, name: str, *, integer: bool = False) -> float | int:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "a positive integer" if integer else "a positive number"
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if not value > 0 or (not integer and not math.isfinite(value)):
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_grid(grid: object, n_tokens: int, text_tokens: int = 0) -> tuple[int, int, int]:
    """A latent grid (T, H, W) whose product plus the trailing text tokens equals N."""
    if (
        not isinstance(grid, Sequence)
        or len(grid) != 3
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise ValueError(f"grid must be three positive integers (T, H, W), got {grid!r}")
    t, h, w = (int(g) for g in grid)
    if t * h * w + text_tokens != n_tokens:
        extra = f" + {text_tokens} text tokens" if text_tokens else ""
        raise ValueError(
            f"grid {(t, h, w)} holds {t * h * w} tokens{extra} but the sequence has "
            f"{n_tokens}; T * H * W{' + text' if text_tokens else ''} must equal N"
        )
    return t, h, w
