"""Capture files: q, k, v of attention layers at diffusion steps, with JSON metadata.

A capture is one safetensors file. Entry i (one attention layer at one diffusion step) holds the
tensors ``"{i}.q"``, ``"{i}.k"``, ``"{i}.v"``, each (B, H, N, D) (v: (B, H, N, Dv)), with the N
tokens in the latent grid's (t, h, w) row-major order followed by ``text_tokens`` text tokens,
so ``N = T * H * W + text_tokens``. The safetensors metadata key ``"tailattn"`` holds a JSON
object::

    {"format": "tailattn-capture", "version": 1, "model": ..., "grid": [T, H, W],
     "text_tokens": ..., "head_dim": D, "dtype": "float32", "shape": [B, H, N, D],
     "entries": [{"layer": 0, "step": 0, "timestep": 999.0}, ...], ...extra metadata}

:class:`CaptureWriter` streams tensors to a temporary data file as they arrive (memory stays at
one entry) and, on ``close``, writes the safetensors header and the data to a temporary name
that is then renamed: an interrupted capture leaves nothing under the final name.
:func:`load_capture` validates the whole file from its header (missing tensors, shapes, grid,
truncation, metadata) before any tensor is read; tensors are read lazily, one at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._files import check_parent, temp_sibling

FORMAT = "tailattn-capture"
VERSION = 1
META_KEY = "tailattn"
NAMES = ("q", "k", "v")
REQUIRED_META = ("model", "grid", "text_tokens", "head_dim", "dtype", "shape", "entries")

_DTYPES = {
    torch.float64: ("F64", "float64"),
    torch.float32: ("F32", "float32"),
    torch.float16: ("F16", "float16"),
    torch.bfloat16: ("BF16", "bfloat16"),
}
_BY_CODE = {code: (dtype, name) for dtype, (code, name) in _DTYPES.items()}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


class CaptureError(ValueError):
    """A capture file that cannot be read: the message names the file and what is wrong."""


def _check_grid(grid: object) -> list[int]:
    if (
        not isinstance(grid, (list, tuple))
        or len(grid) != 3
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise ValueError(f"grid must be three positive integers (T, H, W), got {grid!r}")
    return [int(g) for g in grid]


def _check_index(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


class CaptureWriter:
    """Write (layer, step) entries of q, k, v to a capture file, atomically.

    Usage::

        writer = CaptureWriter(path, model="Wan2.1-T2V-1.3B", grid=(21, 30, 52), text_tokens=0)
        writer.add(layer, step, q, k, v, timestep=999.0)   # (B, H, N, D) each, any number
        writer.close()                                      # or writer.abort() on failure

    It is also a context manager (close on success, abort on an exception). Every entry must
    have the same shape and dtype, with ``N = T * H * W + text_tokens``. Extra keyword metadata
    (``prompt=...``) must be JSON-serializable and is stored as is.
    """

    def __init__(
        self, path: str | Path, *, model: str, grid: tuple[int, int, int], text_tokens: int, **meta
    ) -> None:
        self.path = check_parent(Path(path), "capture")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        self.grid = _check_grid(grid)
        self.text_tokens = _check_index(text_tokens, "text_tokens")
        clash = sorted(set(meta) & {*REQUIRED_META, "format", "version"})
        if clash:
            raise ValueError(f"metadata keys {clash} are reserved by the capture format")
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as err:
            raise ValueError(f"capture metadata must be JSON-serializable: {err}") from None
        self.meta: dict[str, Any] = {"model": model, **meta}
        self._entries: list[dict[str, Any]] = []
        self._tensors: list[tuple[str, str, list[int], int]] = []  # name, code, shape, nbytes
        self._shape: tuple[int, ...] | None = None
        self._v_shape: tuple[int, ...] | None = None
        self._dtype: torch.dtype | None = None
        self._data_path: Path | None = temp_sibling(self.path, ".data")
        self._data = self._data_path.open("wb")

    # ------------------------------------------------------------------ writing
    def add(
        self,
        layer: int,
        step: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        timestep: float | None = None,
    ) -> None:
        """Append one entry; q, k (B, H, N, D) and v (B, H, N, Dv) go to disk right away."""
        if self._data_path is None:
            raise ValueError(f"capture {self.path} is closed; no more entries can be added")
        layer, step = _check_index(layer, "layer"), _check_index(step, "step")
        if timestep is not None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.item()
            if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
                raise ValueError(f"timestep must be a number or None, got {timestep!r}")
            timestep = float(timestep)
        self._check_entry(q, k, v)
        index = len(self._entries)
        for name, x in zip(NAMES, (q, k, v), strict=True):
            data = x.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
            self._data.write(data)
            self._tensors.append((f"{index}.{name}", _DTYPES[x.dtype][0], list(x.shape), len(data)))
        self._entries.append({"layer": layer, "step": step, "timestep": timestep})

    @property
    def bytes_written(self) -> int:
        """Tensor bytes written so far."""
        return sum(nbytes for *_, nbytes in self._tensors)

    def _check_entry(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for name, x in zip(NAMES, (q, k, v), strict=True):
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise ValueError(f"{name} must be a 4-D tensor (B, H, N, D), got {_describe(x)}")
            if x.dtype not in _DTYPES:
                raise ValueError(
                    f"{name} has dtype {x.dtype}; captures hold {', '.join(map(str, _DTYPES))}"
                )
        if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
            raise ValueError(
                f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share "
                f"(B, H, N) and q, k their head dim"
            )
        if not q.dtype == k.dtype == v.dtype:
            raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        expected = math.prod(self.grid) + self.text_tokens
        if q.shape[2] != expected:
            raise ValueError(
                f"q, k, v have N = {q.shape[2]} tokens but grid {tuple(self.grid)} with "
                f"{self.text_tokens} text tokens needs {expected}"
            )
        if self._shape is None:
            self._shape, self._v_shape, self._dtype = tuple(q.shape), tuple(v.shape), q.dtype
        elif (tuple(q.shape), tuple(v.shape), q.dtype) != (self._shape, self._v_shape, self._dtype):
            raise ValueError(
                f"every entry of a capture has the same shapes and dtype: the first had q "
                f"{self._shape}, v {self._v_shape}, {self._dtype}; this one q {tuple(q.shape)}, "
                f"v {tuple(v.shape)}, {q.dtype}"
            )

    def close(self) -> Path:
        """Write the file (temporary name, then rename) and return its path."""
        if self._data_path is None:
            raise ValueError(f"capture {self.path} is already closed")
        if not self._entries:
            self.abort()
            raise ValueError(f"nothing was added to capture {self.path}; no file was written")
        assert self._shape is not None and self._dtype is not None
        self._data.close()
        meta = {
            "format": FORMAT,
            "version": VERSION,
            **self.meta,
            "grid": self.grid,
            "text_tokens": self.text_tokens,
            "head_dim": self._shape[3],
            "dtype": _DTYPES[self._dtype][1],
            "shape": list(self._shape),
            "entries": self._entries,
        }
        header: dict[str, Any] = {"__metadata__": {META_KEY: json.dumps(meta)}}
        offset = 0
        for name, code, shape, nbytes in self._tensors:
            header[name] = {
                "dtype": code,
                "shape": shape,
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        tmp = temp_sibling(self.path)
        try:
            with tmp.open("wb") as out, self._data_path.open("rb") as data:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                shutil.copyfileobj(data, out, 16 * 2**20)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            self._data_path.unlink(missing_ok=True)
            self._data_path = None
        return self.path

    def abort(self) -> None:
        """Discard everything: no file under the final name, no temporary files."""
        if self._data_path is None:
            return
        self._data.close()
        self._data_path.unlink(missing_ok=True)
        self._data_path = None

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}"
    return type(x).__name__


# ---------------------------------------------------------------------- reading
@dataclass(frozen=True)
class CaptureEntry:
    """One (layer, step) entry; ``q``, ``k``, ``v`` are read from the file on access."""

    path: Path
    index: int
    layer: int
    step: int
    timestep: float | None

    def tensor(self, name: str) -> torch.Tensor:
        """The whole (B, H, N, D) tensor ``name`` (``q``, ``k`` or ``v``)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(f"{self.index}.{name}")

    def head(self, batch: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of one (batch, head), each (1, 1, N, D), read without loading the rest."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            tensors = tuple(
                f.get_slice(f"{self.index}.{name}")[batch : batch + 1, head : head + 1]
                for name in NAMES
            )
        for name, x in zip(NAMES, tensors, strict=True):
            if not bool(torch.isfinite(x).all()):
                raise CaptureError(
                    f"capture {self.path}: tensor '{self.index}.{name}' (layer {self.layer}, "
                    f"step {self.step}) holds NaN or Inf values in batch {batch}, head {head}"
                )
        return tensors  # type: ignore[return-value]

    @property
    def q(self) -> torch.Tensor:
        return self.tensor("q")

    @property
    def k(self) -> torch.Tensor:
        return self.tensor("k")

    @property
    def v(self) -> torch.Tensor:
        return self.tensor("v")


@dataclass(frozen=True)
class Capture:
    """A validated capture: ``meta`` (the JSON metadata) and ``entries`` in the order added."""

    path: Path
    meta: dict[str, Any]
    entries: list[CaptureEntry]

    @property
    def grid(self) -> tuple[int, int, int]:
        t, h, w = self.meta["grid"]
        return t, h, w

    @property
    def steps(self) -> list[int]:
        """The distinct diffusion steps, ascending."""
        return sorted({e.step for e in self.entries})


def _read_header(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CaptureError(f"capture {path} is truncated or not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise CaptureError(
                f"capture {path} is truncated or not a safetensors file: its header claims "
                f"{length} bytes but the file has {size}"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CaptureError(f"capture {path} has a corrupt safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise CaptureError(f"capture {path} has a corrupt safetensors header")
    try:
        end = max(
            (int(t["data_offsets"][1]) for n, t in header.items() if n != "__metadata__"),
            default=0,
        )
    except (KeyError, TypeError, IndexError, ValueError):
        raise CaptureError(f"capture {path} has a corrupt safetensors header") from None
    if 8 + length + end != size:
        raise CaptureError(
            f"capture {path} is truncated: its tensors need {8 + length + end} bytes but the "
            f"file has {size}"
        )
    return header


def _read_meta(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        raise CaptureError(f"{path} is a safetensors file but not a tailattn capture (no metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CaptureError(f"capture {path} has bad JSON metadata: {err}") from None
    if not isinstance(meta, dict):
        raise CaptureError(f"capture {path} has bad JSON metadata: not an object")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise CaptureError(f"capture {path} metadata lacks {', '.join(missing)}")
    try:
        _check_grid(meta["grid"])
        _check_index(meta["text_tokens"], "text_tokens")
        for i, e in enumerate(meta["entries"]):
            _check_index(e["layer"], f"entry {i} layer")
            _check_index(e["step"], f"entry {i} step")
    except (ValueError, TypeError, KeyError) as err:
        raise CaptureError(f"capture {path} has bad metadata: {err}") from None
    if meta["dtype"] not in {name for _, name in _DTYPES.values()}:
        raise CaptureError(f"capture {path} metadata has an unknown dtype {meta['dtype']!r}")
    if not meta["entries"]:
        raise CaptureError(f"capture {path} has no entries")
    return meta


def _check_tensors(path: Path, header: dict[str, Any], meta: dict[str, Any]) -> None:
    n = math.prod(meta["grid"]) + meta["text_tokens"]
    shape = list(meta["shape"])
    for i in range(len(meta["entries"])):
        for name in NAMES:
            key = f"{i}.{name}"
            info = header.get(key)
            if info is None:
                raise CaptureError(f"capture {path} is missing tensor {key!r} (entry {i})")
            got = list(info["shape"])
            want = shape if name != "v" else [*shape[:3], got[-1] if got else -1]
            if len(got) != 4 or got != want:
                raise CaptureError(
                    f"capture {path}: tensor {key!r} has shape {got} but the capture's "
                    f"(B, H, N, D) is {shape}{' (any Dv for v)' if name == 'v' else ''}"
                )
            if got[2] != n:
                raise CaptureError(
                    f"capture {path}: tensor {key!r} has N = {got[2]} tokens but grid "
                    f"{meta['grid']} + {meta['text_tokens']} text tokens is {n}"
                )
            if _BY_CODE.get(info["dtype"], (None, None))[1] != meta["dtype"]:
                raise CaptureError(
                    f"capture {path}: tensor {key!r} has dtype {info['dtype']} but the metadata "
                    f"says {meta['dtype']}"
                )
            start, stop = info["data_offsets"]
            if stop - start != math.prod(got) * _ITEMSIZE[info["dtype"]]:
                raise CaptureError(f"capture {path}: tensor {key!r} has a wrong byte size")
    if shape[3] != meta["head_dim"]:
        raise CaptureError(
            f"capture {path}: head_dim {meta['head_dim']} does not match the tensors' {shape[3]}"
        )


def load_capture(path: str | Path) -> Capture:
    """Open and validate a capture file; tensors are read lazily from the entries.

    Raises:
        FileNotFoundError: no such file.
        CaptureError (a ValueError): truncated or corrupt file, bad or missing metadata, a
            missing tensor, shapes that disagree with each other or with the grid.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no capture file {path}")
    header = _read_header(path)
    meta = _read_meta(path, header)
    try:
        _check_tensors(path, header, meta)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CaptureError):
            raise
        raise CaptureError(f"capture {path} has a malformed tensor entry: {err}") from None
    entries = [
        CaptureEntry(path, i, e["layer"], e["step"], e.get("timestep"))
        for i, e in enumerate(meta["entries"])
    ]
    return Capture(path, meta, entries)
