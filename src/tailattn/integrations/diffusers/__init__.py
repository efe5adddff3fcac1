"""tailattn in diffusers video pipelines: Wan2.1/2.2, HunyuanVideo, CogVideoX.

    handle = apply(pipe, "topk+uta", keep=0.1, warmup_steps=12, dense_layers=(0,))
    video = pipe(prompt="...").frames[0]
    handle.remove()                          # the original processors, exactly

    with capture(pipe, "wan.safetensors", layers=[0, 15], steps=[0, 25]):
        pipe(prompt="...")                   # q, k, v after norm and RoPE, streamed to disk

Modules: ``models`` (supported classes, layer indices, grid), ``processors`` (q, k, v as the
stock processors compute them), ``joint`` (sparse video, dense text), ``clock`` (steps and
guidance branches), ``schedule`` (dense steps and layers, keep over steps), ``state``
(per-layer state of stateful methods), ``runtime`` (each attention call), ``handle``
(``apply``), ``capture``, ``cli`` (``tailattn capture``).
"""

import importlib.util

if importlib.util.find_spec("diffusers") is None:
    raise ImportError(
        "tailattn.integrations.diffusers needs diffusers: pip install -e '.[diffusers]' "
        "from a clone of tailattn"
    )

from .capture import CaptureSession, Sink, capture
from .clock import Tick
from .handle import Handle, apply
from .joint import TokenOrder, joint_attention
from .models import SUPPORTED
from .runtime import LayerCall
from .state import StateKey

__all__ = [
    "SUPPORTED",
    "CaptureSession",
    "Handle",
    "LayerCall",
    "Sink",
    "StateKey",
    "Tick",
    "TokenOrder",
    "apply",
    "capture",
    "joint_attention",
]
