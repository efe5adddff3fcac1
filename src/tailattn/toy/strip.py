"""Pictures of clips: a frame strip (PNG) and a side-by-side animation (GIF, MP4).

Clips are (B, 3, F, H, W) tensors in [-1, 1]; pixels are ``round(255 (x + 1) / 2)``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(clips: torch.Tensor) -> np.ndarray:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    pixels = ((clips.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()


def save_strip(
    clips: torch.Tensor, path: Path, names: list[str], every: int = 2, scale: int = 3
) -> Path:
    """One row per clip, frames ``0, every, 2 every, ...``, each ``scale`` times enlarged, the
    name of each row on its left."""
    frames = to_uint8(clips)[:, ::every]
    b, f, h, w, _ = frames.shape
    rows = frames.transpose(0, 2, 1, 3, 4).reshape(b * h, f * w, 3)
    image = Image.fromarray(rows).resize((f * w * scale, b * h * scale), Image.NEAREST)
    label_width = 70
    canvas = Image.new("RGB", (image.width + label_width, image.height), "white")
    canvas.paste(image, (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(names):
        draw.text((4, row * h * scale + h * scale // 2 - 5), name, fill="black")
    partial = path.with_name(f".{path.name}.partial.png")
    canvas.save(partial)
    partial.replace(path)
    return path


def side_by_side(left: torch.Tensor, right: torch.Tensor, scale: int = 4) -> list[Image.Image]:
    """Frames of two clips (3, F, H, W) next to each other with a 4-pixel white gap, then
    enlarged ``scale`` times."""
    a, b = to_uint8(left[None])[0], to_uint8(right[None])[0]
    gap = np.full((a.shape[0], a.shape[1], 4, 3), 255, dtype=np.uint8)
    both = np.concatenate([a, gap, b], axis=2)
    height, width = both.shape[1] * scale, both.shape[2] * scale
    return [Image.fromarray(frame).resize((width, height), Image.NEAREST) for frame in both]


def save_animation(
    frames: list[Image.Image], directory: Path, name: str, fps: int = 8
) -> list[Path]:
    """``name.gif`` (Pillow) and, when imageio-ffmpeg is installed, ``name.mp4``."""
    directory.mkdir(parents=True, exist_ok=True)
    gif = directory / f"{name}.gif"
    partial = directory / f".{name}.partial.gif"
    frames[0].save(partial, save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0)
    partial.replace(gif)
    written = [gif]
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        import imageio_ffmpeg

        mp4 = directory / f"{name}.mp4"
        partial = directory / f".{name}.partial.mp4"
        width, height = frames[0].size
        writer = imageio_ffmpeg.write_frames(
            str(partial), (width, height), fps=fps, macro_block_size=1
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(np.asarray(frame.convert("RGB"))))
        writer.close()
        partial.replace(mp4)
        written.append(mp4)
    return written
