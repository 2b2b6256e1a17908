"""BatchNorm statistics for random weights.

Plain random weights make every video look the same (BatchNorm with its initial statistics squashes
the differences: glance features differ by ~1e-11 between videos), so all videos would have one
entropy and no exit threshold could split them. Benchmarks of random-weight presets therefore first
measure BatchNorm's statistics on real-looking videos; the weights stay random.
"""

from __future__ import annotations

import math

import torch

from adafocus.model.families import Model
from adafocus.model.reference import adaptive_inference


def measure_batchnorm(model: Model, videos: torch.Tensor) -> None:
    """Replace every BatchNorm's running statistics by those of `videos` passed through the whole
    loop (glance, policy, every cube), then return to eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches seen
    model.train()
    try:
        with torch.no_grad():
            adaptive_inference(model, videos, [-math.inf] * model.preset.num_exits)
    finally:
        model.eval()
