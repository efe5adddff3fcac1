r"""How good the toy model is, and how close two videos are.

Between videos (B, 3, F, H, W) in [-1, 1], compared in [0, 1] (``y = (x + 1) / 2``):

- ``psnr = 10 log10(1 / mean((y - y*)^2))`` in dB over the whole video (inf when identical);
- ``ssim``: the mean over frames and channels of the SSIM map
  ``(2 mu mu* + C1)(2 s_xy + C2) / ((mu^2 + mu*^2 + C1)(s^2 + s*^2 + C2))`` with an 11 x 11
  Gaussian window (sigma 1.5; smaller on frames under 11 px), ``C1 = 0.01^2``,
  ``C2 = 0.03^2`` (Wang et al. 2004), over the valid part of the frame.

Quality of the model (measured, not asserted): a small frame classifier (:class:`ShapeClassifier`)
trained on the data generator recognises the shape kind of a frame; a video's prediction is the
argmax of its frame logits summed. :func:`label_accuracy` is the fraction of generated clips
whose prediction is the label they were generated for (chance = 1 / 4); the classifier's own
accuracy on fresh real clips is its calibration. Two settings sampled from the same noise are
compared sample by sample (:func:`mcnemar_p`): only the samples that one recognises and the other
does not tell them apart. :func:`motion` is the mean absolute change
between successive frames, ``mean |y_{t+1} - y_t|``, to compare with real clips (0 for a still
video, large for flicker).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from . import data


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x.detach().double() + 1) / 2


def _check_pair(video: torch.Tensor, reference: torch.Tensor) -> None:
    if video.shape != reference.shape or video.ndim != 5:
        raise ValueError(
            f"videos must be (B, 3, F, H, W) of equal shapes, got {tuple(video.shape)} and "
            f"{tuple(reference.shape)}"
        )


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of ``video`` against ``reference`` (module docstring); inf when equal."""
    _check_pair(video, reference)
    mse = float(((_unit(video) - _unit(reference)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM of ``video`` against ``reference`` over frames and channels (module docstring);
    1 when equal."""
    _check_pair(video, reference)
    x = _unit(video).permute(0, 2, 1, 3, 4).flatten(0, 2)[:, None]  # (B F 3, 1, H, W)
    y = _unit(reference).permute(0, 2, 1, 3, 4).flatten(0, 2)[:, None]
    size = min(11, x.shape[-1], x.shape[-2])
    window = _gaussian_window(size - (size + 1) % 2).to(x.device)
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x**2
    var_y = F.conv2d(y * y, window) - mu_y**2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ratio = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(ratio.mean())


def motion(videos: torch.Tensor) -> float:
    """Mean absolute change between successive frames, in [0, 1] units (module docstring)."""
    y = _unit(videos)
    return float((y[:, :, 1:] - y[:, :, :-1]).abs().mean())


class ShapeClassifier(torch.nn.Module):
    """Frames (B, 3, S, S) in [-1, 1], any S of at least 8 -> logits over ``data.SHAPES``: four
    3 x 3 conv layers (32, 64, 96, 128 channels) with batch norm and GELU, a 2 x 2 max-pool
    after each of the first three (a receptive field of 38 px, more than an object spans at
    S = 64), global average pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        widths = (3, 32, 64, 96, 128)
        layers: list[torch.nn.Module] = []
        for index, (a, b) in enumerate(itertools.pairwise(widths)):
            layers += [
                torch.nn.Conv2d(a, b, 3, padding=1),
                torch.nn.BatchNorm2d(b),
                torch.nn.GELU(),
            ]
            if index < len(widths) - 2:
                layers.append(torch.nn.MaxPool2d(2))
        self.features = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1))
        self.head = torch.nn.Linear(widths[-1], len(data.SHAPES))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(frames).flatten(1))

    @torch.no_grad()
    def predict(self, videos: torch.Tensor) -> torch.Tensor:
        """Shape index (B,) of videos (B, 3, F, H, W): argmax of the summed frame logits."""
        b, c, f, h, w = videos.shape
        frames = videos.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        return self(frames.float()).view(b, f, -1).sum(dim=1).argmax(dim=1)


def train_classifier(
    steps: int = 300,
    batch: int = 32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    *,
    frames: int = data.FRAMES,
    size: int = data.SIZE,
) -> ShapeClassifier:
    """A :class:`ShapeClassifier` trained on ``steps`` batches of 4 random frames from each of
    ``batch`` fresh clips of ``frames`` x ``size`` x ``size`` (cross-entropy, Adam 2e-3 decayed
    by a cosine to 0); deterministic for a seed on one device."""
    torch.manual_seed(seed)
    classifier = ShapeClassifier().to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        seed_of_step = 2_000_000_000 + seed * 100_003 + step
        clips, labels = data.clips(seed_of_step, batch, device, frames=frames, size=size)
        chosen = torch.randint(0, frames, (batch, 4), generator=gen).to(device)
        picked = clips.permute(0, 2, 1, 3, 4)[torch.arange(batch, device=device)[:, None], chosen]
        loss = F.cross_entropy(classifier(picked.flatten(0, 1)), labels.repeat_interleave(4))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return classifier.eval()


def label_accuracy(
    classifier: ShapeClassifier, videos: torch.Tensor, labels: torch.Tensor
) -> float:
    """Fraction of videos whose predicted shape is their label (module docstring)."""
    return float(recognised(classifier, videos, labels).float().mean())


def recognised(
    classifier: ShapeClassifier, videos: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """(B,) bool: whether each video's predicted shape is its label."""
    return classifier.predict(videos) == labels.to(videos.device)


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar p-value of two settings scored on the same samples (paired
    outcomes, right or wrong).

    With ``b = only_first`` samples right under the first setting only and ``c = only_second``
    under the second only, under the null hypothesis (both equally good) ``b ~ Binomial(b + c,
    1/2)``, and ``p = min(1, 2 sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c))`` (1 when b + c = 0).
    """
    if only_first < 0 or only_second < 0:
        raise ValueError(f"counts must be >= 0, got {only_first} and {only_second}")
    n = only_first + only_second
    tail = sum(math.comb(n, i) for i in range(min(only_first, only_second) + 1))
    return min(1.0, 2 * tail / 2**n)
