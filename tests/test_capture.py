"""The capture file format: round trip, atomic writing, and every kind of bad file."""

import json
import struct

import pytest
import torch

from tailattn.capture_file import CaptureError, CaptureWriter, load_capture

GRID = (2, 3, 4)


def qkv(seed, n=24, dtype=torch.float32, b=1, h=2, d=8):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(3))


def write(path, entries=((0, 0), (1, 0), (0, 1)), text_tokens=0, **meta):
    writer = CaptureWriter(path, model="tiny", grid=GRID, text_tokens=text_tokens, **meta)
    tensors = []
    for i, (layer, step) in enumerate(entries):
        q, k, v = qkv(i, n=24 + text_tokens)
        writer.add(layer, step, q, k, v, timestep=1000.0 - 10 * step)
        tensors.append((q, k, v))
    writer.close()
    return tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_round_trip(tmp_path, dtype):
    path = tmp_path / "c.safetensors"
    writer = CaptureWriter(path, model="m", grid=GRID, text_tokens=2, prompt="a cat")
    sent = []
    for step in range(3):
        q, k, v = (x.to(dtype) for x in qkv(step, n=26))
        writer.add(5, step, q, k, v[..., :4].contiguous(), timestep=float(step))
        sent.append((q, k, v[..., :4]))
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
    cap = load_capture(path)
    assert cap.meta["model"] == "m" and cap.meta["prompt"] == "a cat"
    assert cap.meta["grid"] == list(GRID) and cap.meta["text_tokens"] == 2
    assert cap.meta["head_dim"] == 8 and cap.meta["dtype"] == str(dtype).removeprefix("torch.")
    assert [(e.layer, e.step, e.timestep) for e in cap.entries] == [
        (5, s, float(s)) for s in range(3)
    ]
    assert cap.steps == [0, 1, 2]
    for entry, (q, k, v) in zip(cap.entries, sent, strict=True):
        assert torch.equal(entry.q, q) and torch.equal(entry.k, k) and torch.equal(entry.v, v)


def test_file_is_plain_safetensors(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "c.safetensors"
    sent = write(path)
    loaded = load_file(str(path))
    assert torch.equal(loaded["2.k"], sent[2][1])


def test_context_manager_aborts_on_error(tmp_path):
    path = tmp_path / "c.safetensors"
    with pytest.raises(RuntimeError), CaptureWriter(path, model="m", grid=GRID, text_tokens=0) as w:
        w.add(0, 0, *qkv(0))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_abort_leaves_nothing_and_keeps_an_older_file(tmp_path):
    path = tmp_path / "c.safetensors"
    write(path)
    before = path.read_bytes()
    writer = CaptureWriter(path, model="m", grid=GRID, text_tokens=0)
    writer.add(0, 0, *qkv(9))
    writer.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    assert path.read_bytes() == before


def test_writer_streams_to_disk(tmp_path):
    path = tmp_path / "c.safetensors"
    writer = CaptureWriter(path, model="m", grid=GRID, text_tokens=0)
    q, k, v = qkv(0)
    writer.add(0, 0, q, k, v)
    writer._data.flush()
    data = [p for p in tmp_path.iterdir() if p.name.endswith(".data")]
    assert len(data) == 1 and data[0].stat().st_size == 3 * q.numel() * 4
    assert not path.exists()
    writer.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, k, v: (q[:, :, :20], k[:, :, :20], v[:, :, :20]), "grid"),
        (lambda q, k, v: (q, k[..., :4], v), "must share"),
        (lambda q, k, v: (q[0], k[0], v[0]), "4-D"),
        (lambda q, k, v: (q, k.double(), v), "dtype"),
        (lambda q, k, v: (q, k, v.to(torch.int32)), "dtype"),
    ],
)
def test_writer_rejects_bad_entries(tmp_path, change, message):
    writer = CaptureWriter(tmp_path / "c.safetensors", model="m", grid=GRID, text_tokens=0)
    with pytest.raises(ValueError, match=message):
        writer.add(0, 0, *change(*qkv(0)))
    writer.abort()


def test_writer_rejects_inconsistent_entries_and_bad_arguments(tmp_path):
    path = tmp_path / "c.safetensors"
    writer = CaptureWriter(path, model="m", grid=GRID, text_tokens=0)
    writer.add(0, 0, *qkv(0))
    with pytest.raises(ValueError, match="same shapes"):
        writer.add(1, 0, *qkv(1, h=3))
    with pytest.raises(ValueError, match="layer"):
        writer.add(-1, 0, *qkv(1))
    writer.abort()
    with pytest.raises(ValueError, match="grid"):
        CaptureWriter(path, model="m", grid=(2, 3), text_tokens=0)
    with pytest.raises(ValueError, match="JSON"):
        CaptureWriter(path, model="m", grid=GRID, text_tokens=0, prompt=object())
    with pytest.raises(ValueError, match="reserved"):
        CaptureWriter(path, model="m", grid=GRID, text_tokens=0, entries=[])
    with pytest.raises(ValueError, match="no directory"):
        CaptureWriter(tmp_path / "nope" / "c.safetensors", model="m", grid=GRID, text_tokens=0)
    empty = CaptureWriter(path, model="m", grid=GRID, text_tokens=0)
    with pytest.raises(ValueError, match="nothing was added"):
        empty.close()
    assert list(tmp_path.iterdir()) == []


def _rewrite(path, edit_header=None, edit_meta=None, cut=0):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    if edit_meta is not None:
        meta = json.loads(header["__metadata__"]["tailattn"])
        edit_meta(meta)
        header["__metadata__"]["tailattn"] = json.dumps(meta)
    if edit_header is not None:
        edit_header(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    out = struct.pack("<Q", len(new)) + new + data
    path.write_bytes(out[: len(out) - cut] if cut else out)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cut": 100}, "truncated"),
        # the last tensor and its bytes removed: a consistent file that lacks a tensor
        ({"edit_header": lambda h: h.pop("1.v"), "cut": 2 * 24 * 8 * 4}, "missing tensor '1.v'"),
        ({"edit_meta": lambda m: m.update(grid=[2, 3, 5])}, "grid"),
        ({"edit_meta": lambda m: m.update(grid=[2, 3])}, "grid"),
        ({"edit_meta": lambda m: m.update(shape=[1, 2, 24, 4])}, "shape"),
        ({"edit_meta": lambda m: m.pop("model")}, "lacks model"),
        ({"edit_meta": lambda m: m.update(dtype="float16")}, "dtype"),
        ({"edit_meta": lambda m: m.update(entries=[])}, "no entries"),
        ({"edit_header": lambda h: h["__metadata__"].update(tailattn="{not json")}, "bad JSON"),
        ({"edit_header": lambda h: h.pop("__metadata__")}, "not a tailattn capture"),
    ],
)
def test_loader_rejects_bad_files(tmp_path, kwargs, message):
    path = tmp_path / "c.safetensors"
    write(path, entries=((0, 0), (1, 0)))
    _rewrite(path, **kwargs)
    with pytest.raises(CaptureError, match=message):
        load_capture(path)


def test_loader_rejects_missing_garbage_and_short_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_capture(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05")
    with pytest.raises(CaptureError, match="truncated"):
        load_capture(bad)
    bad.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(CaptureError, match="corrupt"):
        load_capture(bad)
