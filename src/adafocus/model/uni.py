"""Uni-AdaFocus (the family of the published weights) in PyTorch, in the same roles as AdaFocusV3.

    glance      frames (B,Tg,3,S,S)          -> maps (B,Tg,C,h,w), pooled (B,Tg,C)       (global_CNN)
    policy      maps, pooled                 -> boxes (B,K,4), starts (B,K,3)            (temporal_policy,
                                                                                          spatial_policy)
    crop        pool, rows, box, frame       -> patches (B,1,3,P,P)                      (bilinear resampling)
    local       patches (B,1,3,P,P)          -> features (B,D)                           (local_CNN)
    classifier  the AdaFocusV3 classifier: glance head = the official global head Tg-1, step head k =
                the official local head k-1 (the 17 exits of the official early-exit script)

Test-time rules of the official code (LeapLabTHU/Uni-AdaFocus, models/uni_adafocus.py), written here
from reading it:
- The glance sees frames 1, 1 + r, 1 + 2r, ... (r = T / Tg) of the T sampled frames.
- Frame choice: the temporal policy's weights over the Tg glance frames (softmax at a temperature)
  define a piecewise-linear distribution over [0, 1]; the K focus frames are the floors of T times its
  quantiles at (i + 0.5) / K, made strictly increasing (a repeat moves one frame on) and kept below
  T - K + i. They are processed in ascending time, one per step.
- Patch: the spatial policy gives (y, x, scale_y, scale_x) in [0, 1] per glance frame, linearly
  interpolated over all T frames (align_corners=False). A window of side window_min + (S - window_min)
  × scale (96-224 px at S = 224) placed at position × (S - side) is resampled to P² with affine_grid +
  grid_sample (bilinear, zero padding, align_corners=False).

A box is (x0, y0, width, height) in frame pixels (floats); `starts` is (floor x0, floor y0, frame),
the integer part of the plan in the slots AdaFocusV3 uses for a cube's (x0, y0, t0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adafocus.model.networks import Classifier, GlanceEncoder, LocalEncoder, check_family, stride32_size
from adafocus.model.presets import Preset


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    ]


class _InvertedResidual(nn.Module):
    """A MobileNetV2 block with the official repository's flat `conv` Sequential (its key names
    differ from torchvision's nested ones; the arithmetic is the same)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        expansion = _conv_bn_relu6(cin, hidden, 1) if expand != 1 else []
        self.conv = nn.Sequential(
            *expansion,
            *_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


# (expansion, channels, blocks, first stride) of MobileNetV2
_MOBILENET_V2_STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def official_mobilenet_v2_features(width: float, channels: int) -> nn.Sequential:
    """MobileNetV2's `features` in the official layout: the first conv keeps 32 channels, expanding
    stages get `width` × channels rounded up to a multiple of 8, the last 1×1 conv gives `channels`."""
    layers: list[nn.Module] = [nn.Sequential(*_conv_bn_relu6(3, 32, 3, 2))]
    cin = 32
    for expand, c, blocks, stride in _MOBILENET_V2_STAGES:
        cout = -(-int(c * width) // 8) * 8 if expand > 1 else c
        for i in range(blocks):
            layers.append(_InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers.append(nn.Sequential(*_conv_bn_relu6(cin, channels, 1)))
    features = nn.Sequential(*layers)
    for m in features.modules():  # MobileNetV2's initialisation (PyTorch's default fades to ~1e-8 by the end)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
    return features


class TemporalPolicy(nn.Module):
    """Pooled glance features (B, Tg, C) -> frame weights (B, Tg): a 3-tap temporal conv net and a
    softmax at `temperature`. `Tconv` keeps the official key names."""

    def __init__(self, *, channels: int, width: int, temperature: float):
        super().__init__()
        self.temperature = temperature
        self.Tconv = nn.Sequential(
            nn.Conv2d(channels, width, (3, 1), padding=(1, 0), bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, (3, 1), padding=(1, 0), bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 1, 1, bias=False),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        scores = self.Tconv(pooled.transpose(1, 2).unsqueeze(-1)).flatten(1)  # (B, C, Tg, 1) -> (B, Tg)
        return torch.softmax(scores / self.temperature, dim=1)


class SpatialPolicy(nn.Module):
    """Glance maps (B, Tg, C, h, w) -> per glance frame (y, x, scale_y, scale_x) in [0, 1]."""

    def __init__(self, *, channels: int, width: int, map_size: int):
        super().__init__()

        def conv_bn_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
            return [nn.Conv3d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm3d(cout), nn.ReLU()]

        self.encoder = nn.Sequential(
            *conv_bn_relu(channels, width, 1),
            *conv_bn_relu(width, width, 3),
            *conv_bn_relu(width, width, 3),
            nn.Conv3d(width, 4, (1, map_size, map_size), bias=False),
            nn.Sigmoid(),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.encoder(maps.transpose(1, 2)).flatten(2).transpose(1, 2)  # (B, 4, Tg, 1, 1) -> (B, Tg, 4)


def frame_positions(weights: torch.Tensor, num_frames: int, steps: int) -> torch.Tensor:
    """The official frame choice, real-valued: weights (B, Tg) -> (B, K) float, T times the quantiles
    at (i + 0.5) / K of the piecewise-linear distribution the weights define (module docstring)."""
    b, tg = weights.shape
    cumulative = torch.cat([weights.new_zeros(b, 1), weights.cumsum(dim=1)], dim=1)
    cumulative[:, -1] = 1.0  # the official code's guard against rounding at the top
    targets = (torch.arange(steps, device=weights.device, dtype=weights.dtype) + 0.5) / steps  # (K,)
    # the segment [j, j+1] of the distribution that holds each target: first j + 1 with cumulative >= target
    reached = cumulative.unsqueeze(2) >= targets.view(1, 1, -1)  # (B, Tg+1, K)
    segment = (reached.to(torch.int64).argmax(dim=1).clamp(1, tg) - 1).to(torch.int64)  # (B, K)
    low, high = cumulative.gather(1, segment), cumulative.gather(1, segment + 1)
    x_low, x_high = segment.to(weights.dtype) / tg, (segment + 1).to(weights.dtype) / tg
    # the official interpolation, written as it computes it (same rounding)
    quantile = (x_high * (targets - low) - x_low * (targets - high)) / (high - low)
    return quantile * num_frames


def frames_at(positions: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, K) real positions -> (B, K) int64 frames: floors, a repeat moved one frame on, frame i
    kept at or below T - K + i (so they stay distinct and increasing)."""
    steps = positions.shape[1]
    frames = torch.floor(positions).to(torch.int64)
    columns = [frames[:, 0]]
    for i in range(1, steps):  # K is small and static: the loop unrolls in an export
        columns.append(torch.where(frames[:, i] > columns[-1], frames[:, i], columns[-1] + 1))
    last_allowed = num_frames - steps + torch.arange(steps, device=positions.device)
    return torch.minimum(torch.stack(columns, dim=1), last_allowed)


def choose_frames(weights: torch.Tensor, num_frames: int, steps: int) -> torch.Tensor:
    """The official deterministic frame choice: weights (B, Tg) -> K frames (B, K) int64."""
    return frames_at(frame_positions(weights, num_frames, steps), num_frames)


def plan_starts(boxes: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """The integer part of a plan: (floor x0, floor y0, frame) per step, (B, K, 3) int64."""
    corner = boxes[..., :2].floor().to(torch.int64)
    return torch.cat([corner, frames.unsqueeze(-1)], dim=-1)


def spread_over_frames(actions: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, Tg, 4) per glance frame -> (B, T, 4) per frame, by the official linear interpolation."""
    return F.interpolate(actions.transpose(1, 2), size=num_frames, mode="linear", align_corners=False).transpose(1, 2)


def patch_boxes(actions: torch.Tensor, frame_size: int, window_min: int, patch: int) -> torch.Tensor:
    """(..., 4) actions (y, x, scale_y, scale_x) -> boxes (..., 4) (x0, y0, width, height) in pixels.

    The operations are the official ones in the official order (a window side is the patch size
    times a scale), so that the boxes, and the sampling grids made from them, agree bit for bit."""
    scale = actions[..., 2:4] * (frame_size - window_min) / patch + window_min / patch
    side = patch * scale  # (height, width)
    position = actions[..., :2] * (frame_size - side)  # (y0, x0)
    return torch.stack([position[..., 1], position[..., 0], side[..., 1], side[..., 0]], dim=-1)


def resample_patches(frames: torch.Tensor, boxes: torch.Tensor, patch: int) -> torch.Tensor:
    """frames (B, 3, S, S), boxes (B, 4) -> patches (B, 3, P, P): the window resampled bilinearly
    (affine_grid + grid_sample, zero padding, align_corners=False, as the official code)."""
    b, _, size, _ = frames.shape
    x0, y0, width, height = boxes.unbind(dim=1)
    zero = torch.zeros_like(x0)
    theta = torch.stack(
        [
            torch.stack([width / size, zero, -1 + (x0 + (x0 + width)) / size], dim=1),
            torch.stack([zero, height / size, -1 + (y0 + (y0 + height)) / size], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [b, 3, patch, patch], align_corners=False)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop_patches(
    pool: torch.Tensor, rows: torch.Tensor, boxes: torch.Tensor, frames: torch.Tensor, patch: int
) -> torch.Tensor:
    """One patch from each of some videos of a pool: pool (P, T, 3, S, S), rows (B,), boxes (B, 4),
    frames (B,) int64 -> (B, 1, 3, patch, patch)."""
    t = pool.shape[1]
    chosen = pool.flatten(0, 1).index_select(0, rows * t + frames)
    return resample_patches(chosen, boxes, patch).unsqueeze(1)


class UniAdaFocus(nn.Module):
    """The Uni-AdaFocus sub-networks of one preset, under the official module names (a published
    checkpoint loads key for key: adafocus.model.checkpoint), in the roles of AdaFocusV3."""

    def __init__(self, preset: Preset):
        super().__init__()
        check_family(preset, "uni")
        self.preset = preset
        self.global_CNN = GlanceEncoder(
            frames=preset.glance_frames,
            input_size=preset.glance_size,
            channels=preset.glance_channels,
            features=official_mobilenet_v2_features(preset.glance_width, preset.glance_channels),
        )
        map_size = stride32_size(preset.frame_size)
        self.temporal_policy = TemporalPolicy(
            channels=preset.glance_channels, width=preset.temporal_channels, temperature=preset.temperature
        )
        self.spatial_policy = SpatialPolicy(
            channels=preset.glance_channels, width=preset.policy_channels, map_size=map_size
        )
        self.local_CNN = LocalEncoder(arch=preset.local_arch, frames=1, tsm=False)
        self.classifier = Classifier(
            glance_dim=preset.glance_channels,
            local_dim=self.local_CNN.out_dim,
            hidden=preset.hidden_dim,
            classes=preset.num_classes,
            steps=preset.max_cubes,
        )
        stride = preset.num_frames // preset.glance_frames
        self.register_buffer("glance_index", torch.arange(1, preset.num_frames, stride), persistent=False)

    @property
    def glance(self) -> GlanceEncoder:
        return self.global_CNN

    @property
    def local(self) -> LocalEncoder:
        return self.local_CNN

    def glance_frames(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) -> the Tg glance frames (B, Tg, 3, S, S)."""
        return videos.index_select(1, self.glance_index)

    def plan(self, maps: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole plan at once: boxes (B, K, 4) float and starts (B, K, 3) int64 (module docstring)."""
        boxes, starts, _ = self.plan_with_positions(maps, pooled)
        return boxes, starts

    def plan_with_positions(self, maps: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`plan`, and the real-valued frame positions the frames are the floors of (B, K)."""
        p = self.preset
        positions = frame_positions(self.temporal_policy(pooled), p.num_frames, p.max_cubes)
        frames = frames_at(positions, p.num_frames)
        actions = spread_over_frames(self.spatial_policy(maps), p.num_frames)  # (B, T, 4)
        chosen = actions.gather(1, frames.unsqueeze(-1).expand(-1, -1, 4))
        boxes = patch_boxes(chosen, p.frame_size, p.window_min, p.cube_size)
        return boxes, plan_starts(boxes, frames), positions

    def cut(
        self, videos: torch.Tensor, rows: torch.Tensor, planned: torch.Tensor, starts: torch.Tensor
    ) -> torch.Tensor:
        """One step's patches: planned (B, 4) boxes, starts (B, 3) of the rows -> (B, 1, 3, P, P)."""
        return crop_patches(videos, rows, planned, starts[:, 2], self.preset.cube_size)
