"""Wan text-to-video with dense and with tailattn sparse attention, from the same noise.

For users who have Wan weights in diffusers format on disk (e.g. Wan2.1-T2V-1.3B-Diffusers).
It generates the video twice from the same seed, dense and sparse, and prints the time of each
run and the PSNR of the sparse video against the dense one::

    python examples/wan_t2v.py --model /models/Wan2.1-T2V-1.3B-Diffusers \\
        --prompt "a cat surfing a wave at sunset" --method "svg2+uta" --keep 0.1 \\
        --warmup-steps 10 --dense-layers 0 --out videos/

Needs the ``diffusers`` extra (``pip install -e '.[diffusers]'`` from a clone) and a CUDA GPU
for real resolutions; the project's own end-to-end checks run on its toy model instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from diffusers import WanPipeline

import tailattn.integrations.diffusers as tailattn_diffusers

app = typer.Typer(add_completion=False)


def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of frames in [0, 1]: 10 log10(1 / MSE)."""
    mse = float(np.mean((video.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def generate(pipe: WanPipeline, settings: dict[str, Any], seed: int) -> tuple[np.ndarray, float]:
    """One video (frames, H, W, 3) in [0, 1] and the seconds it took."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    video = pipe(**settings, generator=torch.Generator("cpu").manual_seed(seed)).frames[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return np.asarray(video), time.perf_counter() - start


@app.command()
def main(
    model: Annotated[Path, typer.Option(help="local Wan pipeline directory (diffusers format)")],
    prompt: Annotated[str, typer.Option(help="text prompt")],
    method: Annotated[str, typer.Option(help="tailattn method spec")] = "svg2+uta",
    keep: Annotated[float | None, typer.Option(help="keep ratio (budgeted methods)")] = 0.1,
    warmup_steps: Annotated[int, typer.Option(help="dense first steps")] = 10,
    dense_layers: Annotated[str, typer.Option(help="dense layer indices, e.g. '0' or '0,1'")] = "0",
    steps: Annotated[int, typer.Option(help="diffusion steps")] = 50,
    height: Annotated[int, typer.Option(help="video height")] = 480,
    width: Annotated[int, typer.Option(help="video width")] = 832,
    frames: Annotated[int, typer.Option(help="video frames (4k + 1)")] = 81,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 5.0,
    seed: Annotated[int, typer.Option(help="noise seed, the same for both runs")] = 0,
    out: Annotated[Path | None, typer.Option(help="directory for dense.mp4 and sparse.mp4")] = None,
) -> None:
    """Generate dense and sparse videos from the same seed; print time and PSNR."""
    if not model.is_dir():
        raise typer.BadParameter(f"--model {model} is not a directory with Wan weights")
    layers = [int(part) for part in dense_layers.split(",") if part.strip()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = WanPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    settings = {
        "prompt": prompt,
        "height": height,
        "width": width,
        "num_frames": frames,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "output_type": "np",
    }
    dense, dense_s = generate(pipe, settings, seed)
    with tailattn_diffusers.apply(
        pipe, method, keep=keep, warmup_steps=warmup_steps, dense_layers=layers
    ) as handle:
        sparse, sparse_s = generate(pipe, settings, seed)
        sparse_calls = sum(not call.dense for call in handle.calls)
        n_calls = len(handle.calls)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print(f"dense : {dense_s:8.1f} s")
    print(
        f"sparse: {sparse_s:8.1f} s  ({method}, keep={keep}, warmup={warmup_steps}, "
        f"dense layers={layers}; {sparse_calls} of {n_calls} attention calls sparse)"
    )
    print(f"speed-up {dense_s / sparse_s:.2f}x, PSNR(sparse, dense) = {psnr(sparse, dense):.2f} dB")
    if out is not None:
        from diffusers.utils import export_to_video

        out.mkdir(parents=True, exist_ok=True)
        for name, video in (("dense", dense), ("sparse", sparse)):
            partial = out / f".{name}.partial.mp4"  # renamed when complete
            export_to_video(list(video), str(partial), fps=16)
            partial.replace(out / f"{name}.mp4")
        print(f"videos in {out}")


if __name__ == "__main__":
    app()
