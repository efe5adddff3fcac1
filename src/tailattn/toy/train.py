r"""Train the toy model from scratch: ``python -m tailattn.toy.train --minutes 13 --out DIR``.

Flow matching as Wan trains it. Per step: clips ``x_0`` and labels from the data generator
(``data.clips``, a fresh seed per step, rendered on the device), noise ``eps ~ N(0, I)``, a
noise level per clip ``t = shift u / (1 + (shift - 1) u)`` with ``u = sigmoid(n)``,
``n ~ N(0, 1)`` (logit-normal; :data:`TRAIN_SHIFT` = 1 by default, unshifted: a shift of 2, the
sampler's, left the low noise levels that draw edges nearly untrained, P(t < 0.2) = 1.9 % against
8.3 %, and 69 % of the samples recognised against 81 % with 1, H200, 20 minutes each), and

    x_t = (1 - t) x_0 + t eps,     loss = mean (model(x_t, t, label) - (eps - x_0))^2,

with the label replaced by the null label for 10% of the clips (classifier-free guidance).
AdamW (lr warm-up over the first 200 steps, then cosine decay to 10% over the run), gradient
clipping at 1, bf16 autocast on CUDA, an exponential moving average of the weights (decay
``min(0.999, (1 + n) / (10 + n))`` after n updates): the EMA weights are the ones saved.

The run goes through **stages** of growing clips, as Wan's training does (low resolution first:
cheap steps that learn shapes, motion and conditioning; then the full clip). A stage trains on
clips of ``frames x size x size`` in batches of ``batch`` until the fraction ``until`` of the
run; the fraction is of the wall-clock budget, or of ``--max-steps`` when given. The default
config's schedule (:data:`SCHEDULES`): 16 x 32 x 32 clips (4,096 tokens) in batches of 32 for
the first 40 %, then its 16 x 64 x 64 clips (16,384 tokens) in batches of 8, the same 131,072
tokens per step. The saved config records the last stage's clip as the model's training clip
(and ``--layers``, when given, its depth: the config's width with more or fewer blocks).

Training stops by wall clock so that the whole run, including saving the weights and sampling
the frame strip, ends within ``--minutes``. ``DIR`` receives the weight shards (bfloat16 by
default) and ``card.json`` (``weights``), ``loss.json`` and ``loss.png`` (the loss curve, one
line per stage) and ``samples.png`` (one sampled clip per label, every other frame; the card's
``samples`` entry names it and its sampler settings). The card's ``loss_trend`` is the relative
change of the loss over the last quarter of the last stage's log (least-squares line: slope x
span / mean): near 0 when the curve has flattened.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated

import torch
import typer

from . import data, weights
from .model import ToyConfig, ToyModel
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_SHIFT
from .sample import clip_of, noise, sample, shifted
from .strip import save_strip

SAMPLING = {"steps": 30, "shift": DEFAULT_SHIFT, "guidance": DEFAULT_GUIDANCE}
"""Sampler settings of the frame strip written after training (recorded in the card's
``samples`` entry beside the file name; they describe that strip only: ``tailattn generate`` and
the report sample with 20 steps)."""

TRAIN_SHIFT = 1.0
"""Default shift of the training noise levels (module docstring)."""

SCHEDULES = {
    "default": "16:32:32:0.4,16:64:8:1",
    "v1": "16:32:64:1",
    "tiny": "4:8:2:0.5,4:16:1:1",
}
"""Stages of each config as ``FRAMES:SIZE:BATCH:UNTIL,...`` (:func:`parse_stages`)."""


@dataclass(frozen=True)
class Stage:
    """Clips of ``frames x size x size`` in batches of ``batch`` until the fraction ``until``
    of the run (module docstring)."""

    frames: int
    size: int
    batch: int
    until: float


def parse_stages(text: str) -> tuple[Stage, ...]:
    """Stages from ``FRAMES:SIZE:BATCH:UNTIL,...`` (e.g. ``16:32:32:0.4,16:64:8:1``).

    Raises:
        ValueError: a malformed stage, a size that is odd, ``until`` not increasing in (0, 1]
            or a last stage that does not end at 1.
    """
    stages = []
    for part in text.split(","):
        fields = part.strip().split(":")
        try:
            frames, size, batch = (int(x) for x in fields[:3])
            until = float(fields[3])
        except (ValueError, IndexError):
            raise ValueError(f"stage {part!r} is not FRAMES:SIZE:BATCH:UNTIL") from None
        if len(fields) != 4 or min(frames, size, batch) < 1 or size % 2:
            raise ValueError(f"stage {part!r}: positive FRAMES, BATCH and an even SIZE expected")
        stages.append(Stage(frames, size, batch, until))
    ends = [s.until for s in stages]
    if ends[-1] != 1 or any(b <= a for a, b in zip([0.0, *ends], ends, strict=False)):
        raise ValueError(f"stage ends {ends} must increase in (0, 1] and end at 1")
    return tuple(stages)


@dataclass(frozen=True)
class Settings:
    """One training run (``stages``: default the config's schedule, :data:`SCHEDULES`)."""

    minutes: float
    device: str = "cpu"
    config: str = "default"
    layers: int | None = None
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 200
    label_dropout: float = 0.1
    ema_max: float = 0.999
    shift: float = TRAIN_SHIFT
    seed: int = 0
    max_steps: int | None = None
    log_every: int = 25
    strip_steps: int = SAMPLING["steps"]
    store: str = "bfloat16"

    def schedule(self) -> tuple[Stage, ...]:
        return self.stages or parse_stages(SCHEDULES[self.config])

    def strip_sampling(self) -> dict[str, float]:
        """Sampler settings of the frame strip: :data:`SAMPLING` with ``strip_steps``."""
        return {**SAMPLING, "steps": self.strip_steps}


def _lr_factor(step: int, fraction: float, warmup: int) -> float:
    """Linear warm-up, then cosine from 1 to 0.1 over the elapsed fraction of the run."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(fraction, 1.0)))


def _stage_at(stages: tuple[Stage, ...], fraction: float) -> int:
    """Index of the stage that trains at ``fraction`` of the run."""
    return next((i for i, s in enumerate(stages) if fraction < s.until), len(stages) - 1)


def _reserve_seconds(settings: Settings, step_seconds: float) -> float:
    """Wall-clock time kept for saving and sampling after the last step: the frame strip costs
    about ``steps * 2 * labels / (3 * batch)`` steps of the last stage (a training step is about
    three forward passes of ``batch`` clips, a guided sampling step one of ``2 * labels``), plus
    a margin of 50% and 10 s."""
    batch = settings.schedule()[-1].batch
    sampling = settings.strip_steps * 2 * len(data.SHAPES) / (3 * batch)
    return 1.5 * sampling * step_seconds + 10.0


def flow_matching_loss(
    model: ToyModel,
    x0: torch.Tensor,
    labels: torch.Tensor,
    gen: torch.Generator,
    label_dropout: float,
    shift: float = 1.0,
) -> torch.Tensor:
    """The flow-matching loss of one batch (module docstring)."""
    batch = x0.shape[0]
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    t = shifted(torch.sigmoid(torch.randn(batch, generator=gen, device=x0.device)), shift)
    drop = torch.rand(batch, generator=gen, device=x0.device) < label_dropout
    labels = torch.where(drop, torch.full_like(labels, model.null_label), labels)
    tt = t.view(batch, 1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    prediction = model(x_t, t, labels)
    return ((prediction.float() - (eps - x0)) ** 2).mean()


def _stage_points(log: dict[str, list[float]], stage: int) -> list[tuple[float, float]]:
    """(step, loss) of the log entries of one stage."""
    rows = zip(log["step"], log["loss"], log["stage"], strict=True)
    return [(step, loss) for step, loss, k in rows if k == stage]


def loss_trend(log: dict[str, list[float]]) -> float:
    """Relative change of the loss over the last quarter of the last stage's log entries: the
    least-squares slope against the step, times the span of those steps, over their mean loss
    (0 with fewer than two entries)."""
    entries = _stage_points(log, max(log["stage"]))
    tail = entries[len(entries) - max(2, len(entries) // 4) :]
    if len(tail) < 2:
        return 0.0
    xs, ys = zip(*tail, strict=True)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in tail) / sum((x - mx) ** 2 for x in xs)
    return slope * (xs[-1] - xs[0]) / my


def _plot_loss(log: dict[str, list[float]], stages: tuple[Stage, ...], path: Path) -> None:
    """The loss curve as a PNG (log scale), one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for index, stage in enumerate(stages):
        points = _stage_points(log, index)
        if points:
            steps, values = zip(*points, strict=True)
            label = f"{stage.frames} x {stage.size} x {stage.size}, batch {stage.batch}"
            ax.plot(steps, values, lw=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (window mean)")
    ax.set_title("toy Wan training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    partial.replace(path)


class _LossLog:
    """Window means of the loss, flushed every ``every`` steps and at stage changes."""

    def __init__(self, start: float, every: int, device: torch.device) -> None:
        self.start, self.every = start, every
        self.log: dict[str, list[float]] = {"step": [], "seconds": [], "loss": [], "stage": []}
        self.window, self.count, self.stage = torch.zeros((), device=device), 0, 0

    def add(self, loss: torch.Tensor, stage: int, step: int) -> None:
        if stage != self.stage:
            self.flush(step)
            self.stage = stage
        self.window += loss.detach()
        self.count += 1
        if self.count == self.every:
            self.flush(step + 1)

    def flush(self, step: int) -> None:
        if not self.count:
            return
        seconds = round(time.perf_counter() - self.start, 2)
        mean = float(self.window) / self.count
        for name, value in zip(self.log, (step, seconds, mean, self.stage), strict=True):
            self.log[name].append(value)
        self.window.zero_()
        self.count = 0
        print(f"step {step:6d}  {seconds:7.1f} s  stage {self.stage}  loss {mean:.4f}", flush=True)


def _card(
    settings: Settings,
    log: dict[str, list[float]],
    steps: list[int],
    seconds: float,
    device: torch.device,
) -> dict:
    stages = settings.schedule()
    tail = [loss for _, loss in _stage_points(log, max(log["stage"]))]
    return {
        "model": "tailattn toy: diffusers WanTransformer3DModel, pixel space, label-conditioned",
        "data": {
            "generator": "tailattn.toy.data.clips",
            "shapes": list(data.SHAPES),
            "label": "shape kind (index into shapes)",
            "objects": f"{data.OBJECTS} slots, 2 or 3 objects",
            "stages": [asdict(s) for s in stages],
            "seed_of_step": f"{settings.seed} * 1000003 + step",
        },
        "training": {
            **asdict(settings),
            "stages": [asdict(s) for s in stages],
            "steps": sum(steps),
            "steps_per_stage": steps,
            "clips_seen": sum(n * s.batch for n, s in zip(steps, stages, strict=True)),
            "seconds": round(seconds, 1),
            "final_loss": sum(tail[-4:]) / len(tail[-4:]),
            "loss_trend": loss_trend(log),
            "objective": f"flow matching, x_t=(1-t)x0+t eps, target eps-x0, "
            f"t=shift(sigmoid(N(0,1)), {settings.shift})",
            "precision": "bf16 autocast" if device.type == "cuda" else "float32",
            "weights": "EMA",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        },
        "samples": {"file": "samples.png", **settings.strip_sampling()},
    }


def train(settings: Settings, out: Path) -> Path:
    """Run one training (module docstring); returns the path of the written model card."""
    start = time.perf_counter()
    budget = settings.minutes * 60
    device = torch.device(settings.device)
    stages = settings.schedule()
    torch.manual_seed(settings.seed)
    last = stages[-1]  # the clip the model is trained on last is the one its config records
    config = replace(ToyConfig.named(settings.config), frames=last.frames, size=last.size)
    if settings.layers is not None:  # a deeper or shallower model of the same width
        config = replace(config, layers=settings.layers)
    model = ToyModel(config).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=settings.weight_decay
    )
    gen = torch.Generator(device).manual_seed(settings.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses = _LossLog(start, settings.log_every, device)
    steps = [0] * len(stages)
    step, step_seconds, current = 0, 0.0, 0

    def fraction(now: float) -> float:
        if settings.max_steps is not None:
            return step / settings.max_steps
        return (now - start) / budget

    while (settings.max_steps is None or step < settings.max_steps) and (
        time.perf_counter() - start + step_seconds + _reserve_seconds(settings, step_seconds)
        < budget
    ):
        began = time.perf_counter()
        index = _stage_at(stages, fraction(began))
        stage = stages[index]
        factor = _lr_factor(step, fraction(began), settings.warmup)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * factor
        seed = settings.seed * 1_000_003 + step
        x0, labels = data.clips(seed, stage.batch, device, frames=stage.frames, size=stage.size)
        with autocast:
            loss = flow_matching_loss(
                model, x0, labels, gen, settings.label_dropout, settings.shift
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(settings.ema_max, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        losses.add(loss, index, step)
        took = time.perf_counter() - began
        fresh = steps[index] < 2 or index != current  # the first steps of a stage warm up
        step_seconds = took if fresh else 0.9 * step_seconds + 0.1 * took
        steps[index] += 1
        step, current = step + 1, index
    losses.flush(step)
    if step == 0:
        raise RuntimeError(f"no training step fits in {settings.minutes} minutes")
    card = _card(settings, losses.log, steps, time.perf_counter() - start, device)
    out.mkdir(parents=True, exist_ok=True)
    card_path = weights.save(ema, out, card, getattr(torch, settings.store))
    (out / "loss.json").write_text(json.dumps(losses.log) + "\n")
    labels = torch.arange(len(data.SHAPES), device=device)
    x = noise(settings.seed, len(data.SHAPES), (data.CHANNELS, *clip_of(ema)), device)
    with autocast:
        clips = sample(ema, x, labels, **settings.strip_sampling())
    size = ema.config.size
    save_strip(clips.float(), out / "samples.png", list(data.SHAPES), scale=max(1, 128 // size))
    _plot_loss(losses.log, stages, out / "loss.png")
    training = card["training"]
    print(
        f"trained {step} steps ({training['clips_seen']} clips) in {training['seconds']:.0f} s; "
        f"final loss {training['final_loss']:.4f} (trend {training['loss_trend']:+.3f}); wrote "
        f"{card_path.parent} in {time.perf_counter() - start:.0f} s"
    )
    return card_path


def train_command(
    minutes: Annotated[float, typer.Option(help="wall-clock budget of the whole run")],
    out: Annotated[Path, typer.Option(help="directory for weights and logs")],
    device: Annotated[str, typer.Option(help="torch device, e.g. cuda or cuda:1")] = "cpu",
    config: Annotated[str, typer.Option(help="model: default, v1 or tiny")] = "default",
    layers: Annotated[
        int | None, typer.Option(help="transformer blocks (default: the config's)")
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(help="FRAMES:SIZE:BATCH:UNTIL,... (default: the config's schedule)"),
    ] = None,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 3e-4,
    shift: Annotated[float, typer.Option(help="shift of the training noise levels")] = TRAIN_SHIFT,
    seed: Annotated[int, typer.Option(help="seed of the data, noise and weights")] = 0,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps")] = None,
    log_every: Annotated[int, typer.Option(help="steps between loss log entries")] = 25,
    strip_steps: Annotated[int, typer.Option(help="sampling steps of the frame strip")] = SAMPLING[
        "steps"
    ],
    store: Annotated[str, typer.Option(help="dtype of the saved weights")] = "bfloat16",
) -> None:
    """Train the toy video DiT from scratch (module docstring)."""
    if config not in SCHEDULES:
        raise typer.BadParameter(f"--config must be one of {', '.join(SCHEDULES)}, got {config!r}")
    if layers is not None and layers < 1:
        raise typer.BadParameter(f"--layers must be at least 1, got {layers}")
    if store not in ("bfloat16", "float32"):
        raise typer.BadParameter(f"--store must be bfloat16 or float32, got {store!r}")
    try:
        schedule = parse_stages(stages or SCHEDULES[config])
    except ValueError as err:
        raise typer.BadParameter(f"--stages: {err}") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise typer.BadParameter(f"--device {device!r} is not available here ({err})") from None
    if device.startswith("cuda"):
        if torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))  # kernels launch on the chosen GPU
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings = Settings(
        minutes=minutes,
        device=device,
        config=config,
        layers=layers,
        stages=schedule,
        lr=lr,
        shift=shift,
        seed=seed,
        max_steps=max_steps,
        log_every=log_every,
        strip_steps=strip_steps,
        store=store,
    )
    train(settings, out)


if __name__ == "__main__":
    typer.run(train_command)
