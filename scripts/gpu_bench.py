"""Run `tailattn.bench` for the Wan shapes and write markdown + JSON under --out."""

import argparse
import json
import sys
from pathlib import Path

import torch

from tailattn import bench

parser = argparse.ArgumentParser()
parser.add_argument("--shapes", default="wan-1.3b-480p;wan-14b-720p")
parser.add_argument("--keep", default="1.0,0.1")
parser.add_argument("--tails", default="drop,uta,blocks")
parser.add_argument("--out", default=".")
args = parser.parse_args()
device = torch.cuda.get_device_name()
report = [f"Device: {device}; torch {torch.__version__}\n"]
data = {}
for shape in args.shapes.split(";"):
    rows = bench.run(
        bench.parse_shape(shape),
        [float(x) for x in args.keep.split(",")],
        args.tails.split(","),
        progress=lambda s: print(s, file=sys.stderr, flush=True),
    )
    md = bench.to_markdown(rows, f"{shape} {bench.parse_shape(shape)}")
    print(md, flush=True)
    report.append(md)
    data[shape] = [r.as_dict() for r in rows]
Path(args.out, "bench.md").write_text("\n".join(report))
Path(args.out, "bench.json").write_text(json.dumps({"device": device, "rows": data}, indent=1))

# registers and spills of every compiled variant of the fused kernel (for the closing note)
from tailattn.kernels.attention import _block_sparse_fwd  # noqa: E402

lines = []
for caches in _block_sparse_fwd.device_caches.values():
    for kernel in caches[0].values():
        meta = kernel.metadata
        lines.append(
            f"regs={kernel.n_regs} spills={kernel.n_spills} warps={meta.num_warps} "
            f"stages={meta.num_stages} shared={meta.shared} name={meta.name}"
        )
Path(args.out, "kernels.txt").write_text("\n".join(lines))
print("\n".join(lines[:40]))
