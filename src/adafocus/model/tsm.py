"""Temporal shift module (TSM): part of the channels move one frame back or forward in time.

Written for the graphs it exports to. Slice assignment into a zero tensor exports as ScatterND chains
that run ~3.5x slower in ONNX Runtime, so the shift is built from Slice and Concat. It also avoids a
Reshape to (clips, frames, ...) and a Pad: ONNX Runtime runs INT8 convolutions channels-last and
cannot move its layout Transposes through a Reshape, and it pads in float between a Dequantize and a
Quantize. With them, two full-tensor Transposes plus a float Pad per shifted block took ~40 % of the
INT8 TSM ResNet-50 (sthsth-v1 cubes, profiled); rolled along the batch axis with a 0/1 mask for the
frames that crossed a clip's edge, every op stays in uint8 and channels-last. The values are the
same, bit for bit, for finite values (x * 1 is x, x * 0 is 0).
"""

from __future__ import annotations

import torch
from torch import nn


def temporal_shift(x: torch.Tensor, segments: int, fold_div: int = 8) -> torch.Tensor:
    """x: (N*segments, C, H, W), clips of `segments` frames one after another. Channels [0, C/8) take
    the next frame's values, [C/8, 2C/8) the previous frame's, the rest stay; frames shifted in from
    outside the clip are zeros. N*segments not a multiple of `segments` raises (the masks' rows
    cannot match)."""
    if segments == 1:
        return x
    nt, c = x.shape[:2]
    fold = c // fold_div
    step = torch.arange(segments, device=x.device)
    clips = nt // segments
    # 1 where the rolled-in frame is of the same clip; 0 on each clip's last (next) / first (prev) frame
    same_clip_next = (step < segments - 1).to(x.dtype).view(segments, 1, 1, 1).repeat(clips, 1, 1, 1)
    same_clip_prev = (step > 0).to(x.dtype).view(segments, 1, 1, 1).repeat(clips, 1, 1, 1)
    ahead, behind = x[:, :fold], x[:, fold : 2 * fold]
    from_next = torch.cat([ahead[1:], ahead[:1]]) * same_clip_next
    from_prev = torch.cat([behind[-1:], behind[:-1]]) * same_clip_prev
    return torch.cat([from_next, from_prev, x[:, 2 * fold :]], dim=1)


class ShiftThen(nn.Module):
    """Shift in time, then run `net` (the first layer of a residual branch, as in TSM's
    'blockres' placement). The child is named `net` like the TSM reference code."""

    def __init__(self, net: nn.Module, segments: int):
        super().__init__()
        self.net = net
        self.segments = segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(temporal_shift(x, self.segments))
