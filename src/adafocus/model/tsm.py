"""Temporal shift module (TSM): part of the channels move one frame back or forward in time.

Written as Slice + Pad + Concat because that exports to a lean ONNX graph; slice assignment into a
zero tensor exports as ScatterND chains that run ~3.5x slower in ONNX Runtime.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def temporal_shift(x: torch.Tensor, segments: int, fold_div: int = 8) -> torch.Tensor:
    """x: (N*segments, C, H, W). Channels [0, C/8) take the next frame's values, [C/8, 2C/8) the
    previous frame's, the rest stay; frames shifted in from outside the clip are zeros."""
    if segments == 1:
        return x
    nt, c, h, w = x.shape
    x = x.reshape(nt // segments, segments, c, h, w)
    fold = c // fold_div
    zero_last = (0, 0, 0, 0, 0, 0, 0, 1)  # F.pad counts from the last dim: (W, H, C, T)
    zero_first = (0, 0, 0, 0, 0, 0, 1, 0)
    from_next = F.pad(x[:, 1:, :fold], zero_last)
    from_prev = F.pad(x[:, :-1, fold : 2 * fold], zero_first)
    out = torch.cat([from_next, from_prev, x[:, :, 2 * fold :]], dim=2)
    return out.reshape(nt, c, h, w)


class ShiftThen(nn.Module):
    """Shift in time, then run `net` (the first layer of a residual branch, as in TSM's
    'blockres' placement). The child is named `net` like the TSM reference code."""

    def __init__(self, net: nn.Module, segments: int):
        super().__init__()
        self.net = net
        self.segments = segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(temporal_shift(x, self.segments))
