r"""Train the toy model from scratch: ``python -m tailattn.toy.train --minutes 12 --out DIR``.

Flow matching as Wan trains it. Per step: clips ``x_0`` and labels from the data generator
(``data.clips``, a fresh seed per step, rendered on the device), noise ``eps ~ N(0, I)``, a
noise level per clip ``t = sigmoid(n)``, ``n ~ N(0, 1)`` (logit-normal), and

    x_t = (1 - t) x_0 + t eps,     loss = mean (model(x_t, t, label) - (eps - x_0))^2,

with the label replaced by the null label for 10% of the clips (classifier-free guidance).
AdamW (lr warm-up over the first 200 steps, then cosine decay to 10% over the wall-clock budget),
gradient clipping at 1, bf16 autocast on CUDA, an exponential moving average of the weights
(decay ``min(0.999, (1 + n) / (10 + n))`` after n updates): the EMA weights are the ones saved.

Training stops by wall clock so that the whole run, including saving the weights and sampling
the frame strip, ends within ``--minutes``. ``DIR`` receives the weight shards and
``card.json`` (``weights``), ``loss.json`` and ``loss.png`` (the loss curve) and
``samples.png`` (one sampled clip per label, every other frame).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer

from . import data, weights
from .model import ToyConfig, ToyModel
from .sample import noise, sample
from .strip import save_strip

SAMPLING = {"steps": 30, "shift": 2.0, "guidance": 2.0}
"""Sampler settings of the frame strip written after training."""


@dataclass(frozen=True)
class Settings:
    """One training run."""

    minutes: float
    device: str = "cpu"
    config: str = "default"
    batch: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 200
    label_dropout: float = 0.1
    ema_max: float = 0.999
    seed: int = 0
    max_steps: int | None = None
    log_every: int = 25
    strip_steps: int = SAMPLING["steps"]


def _lr_factor(step: int, fraction: float, warmup: int) -> float:
    """Linear warm-up, then cosine from 1 to 0.1 over the elapsed fraction of the budget."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(fraction, 1.0)))


def _reserve_seconds(settings: Settings, step_seconds: float) -> float:
    """Wall-clock time kept for saving and sampling after the last step: the frame strip costs
    about ``steps * 2 * labels / (3 * batch)`` training steps (a training step is about three
    forward passes of ``batch`` clips, a guided sampling step one of ``2 * labels``), plus a
    margin of 50% and 10 s."""
    sampling = settings.strip_steps * 2 * len(data.SHAPES) / (3 * settings.batch)
    return 1.5 * sampling * step_seconds + 10.0


def flow_matching_loss(
    model: ToyModel,
    x0: torch.Tensor,
    labels: torch.Tensor,
    gen: torch.Generator,
    label_dropout: float,
) -> torch.Tensor:
    """The flow-matching loss of one batch (module docstring)."""
    batch = x0.shape[0]
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    t = torch.sigmoid(torch.randn(batch, generator=gen, device=x0.device))
    drop = torch.rand(batch, generator=gen, device=x0.device) < label_dropout
    labels = torch.where(drop, torch.full_like(labels, model.null_label), labels)
    tt = t.view(batch, 1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    prediction = model(x_t, t, labels)
    return ((prediction.float() - (eps - x0)) ** 2).mean()


def _plot_loss(log: dict[str, list[float]], path: Path) -> None:
    """The loss curve as a PNG (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(log["step"], log["loss"], lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (window mean)")
    ax.set_title("toy Wan training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    partial.replace(path)


def train(settings: Settings, out: Path) -> Path:
    """Run one training (module docstring); returns the path of the written model card."""
    start = time.perf_counter()
    budget = settings.minutes * 60
    device = torch.device(settings.device)
    config = ToyConfig.tiny() if settings.config == "tiny" else ToyConfig()
    torch.manual_seed(settings.seed)
    model = ToyModel(config).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=settings.weight_decay
    )
    gen = torch.Generator(device).manual_seed(settings.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    log: dict[str, list[float]] = {"step": [], "seconds": [], "loss": []}
    window, in_window = torch.zeros((), device=device), 0

    def flush() -> None:
        log["step"].append(step)
        log["seconds"].append(round(time.perf_counter() - start, 2))
        log["loss"].append(float(window) / in_window)
        window.zero_()
        print(f"step {step:6d}  {log['seconds'][-1]:7.1f} s  loss {log['loss'][-1]:.4f}")

    step, step_seconds = 0, 0.0
    while (settings.max_steps is None or step < settings.max_steps) and (
        time.perf_counter() - start + step_seconds + _reserve_seconds(settings, step_seconds)
        < budget
    ):
        began = time.perf_counter()
        factor = _lr_factor(step, (began - start) / budget, settings.warmup)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * factor
        x0, labels = data.clips(settings.seed * 1_000_003 + step, settings.batch, device)
        with autocast:
            loss = flow_matching_loss(model, x0, labels, gen, settings.label_dropout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(settings.ema_max, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        window += loss.detach()
        step, in_window = step + 1, in_window + 1
        took = time.perf_counter() - began
        step_seconds = took if step <= 2 else 0.9 * step_seconds + 0.1 * took
        if in_window == settings.log_every:
            flush()
            in_window = 0
    if in_window:
        flush()
    if step == 0:
        raise RuntimeError(f"no training step fits in {settings.minutes} minutes")
    seconds = time.perf_counter() - start
    tail = log["loss"][-4:]
    card = {
        "model": "tailattn toy: diffusers WanTransformer3DModel, pixel space, label-conditioned",
        "data": {
            "generator": "tailattn.toy.data.clips",
            "shapes": list(data.SHAPES),
            "label": "shape kind (index into shapes)",
            "frames": data.FRAMES,
            "size": data.SIZE,
            "objects": data.OBJECTS,
            "seed_of_step": f"{settings.seed} * 1000003 + step",
        },
        "training": {
            **asdict(settings),
            "steps": step,
            "clips_seen": step * settings.batch,
            "seconds": round(seconds, 1),
            "final_loss": sum(tail) / len(tail),
            "objective": "flow matching, x_t=(1-t)x0+t eps, target eps-x0, t=sigmoid(N(0,1))",
            "precision": "bf16 autocast" if device.type == "cuda" else "float32",
            "weights": "EMA",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        },
        "sampling": {**SAMPLING, "steps": settings.strip_steps},
        "samples": "samples.png",
    }
    out.mkdir(parents=True, exist_ok=True)
    card_path = weights.save(ema, out, card)
    (out / "loss.json").write_text(json.dumps(log) + "\n")
    labels = torch.arange(len(data.SHAPES), device=device)
    x = noise(
        settings.seed, len(data.SHAPES), (data.CHANNELS, data.FRAMES, data.SIZE, data.SIZE), device
    )
    with autocast:
        clips = sample(ema, x, labels, **{**SAMPLING, "steps": settings.strip_steps})
    save_strip(clips.float(), out / "samples.png", list(data.SHAPES))
    _plot_loss(log, out / "loss.png")
    print(
        f"trained {step} steps ({step * settings.batch} clips) in {seconds:.0f} s; final loss "
        f"{card['training']['final_loss']:.4f}; wrote {card_path.parent} "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return card_path


def train_command(
    minutes: Annotated[float, typer.Option(help="wall-clock budget of the whole run")],
    out: Annotated[Path, typer.Option(help="directory for weights and logs")],
    device: Annotated[str, typer.Option(help="torch device, e.g. cuda")] = "cpu",
    config: Annotated[str, typer.Option(help="model size: default or tiny")] = "default",
    batch: Annotated[int, typer.Option(help="clips per step")] = 64,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 3e-4,
    seed: Annotated[int, typer.Option(help="seed of the data, noise and weights")] = 0,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps")] = None,
    log_every: Annotated[int, typer.Option(help="steps between loss log entries")] = 25,
    strip_steps: Annotated[int, typer.Option(help="sampling steps of the frame strip")] = SAMPLING[
        "steps"
    ],
) -> None:
    """Train the toy video DiT from scratch (module docstring)."""
    if config not in ("default", "tiny"):
        raise typer.BadParameter(f"--config must be default or tiny, got {config!r}")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise typer.BadParameter(f"--device {device!r} is not available here ({err})") from None
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings = Settings(
        minutes=minutes,
        device=device,
        config=config,
        batch=batch,
        lr=lr,
        seed=seed,
        max_steps=max_steps,
        log_every=log_every,
        strip_steps=strip_steps,
    )
    train(settings, out)


if __name__ == "__main__":
    typer.run(train_command)
