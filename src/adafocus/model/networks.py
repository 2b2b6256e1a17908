"""The four sub-networks of AdaFocusV3 (paper 3.2) with the tensor interfaces the exporter freezes.

Shapes: B videos, Tg glance frames, C glance channels (1280), h×w glance map, K cubes,
T'×h'×w' cube, D local feature width (2048 for ResNet-50), H classifier width, N classes.
All tensors are float32 except `step` (int64).

    glance      frames (B,Tg,3,S,S)                     -> maps (B,Tg,C,h,w), pooled (B,Tg,C)
    policy      maps (B,Tg,C,h,w)                       -> centres (B,K,3) in [0,1], order (x,y,t)
    local       cubes (B,T',3,h',w')                    -> features (B,D)
    classifier  .glance(pooled)                         -> logits0 (B,N), global_state (B,H)
                .step(features, local_state, global_state, step)
                                                        -> logits (B,N), local_state (B,H)

The classifier's state is explicit: `global_state` is the running max of the glance features,
`local_state` the running max of the cube features (zeros before the first cube), `step` the
1-based cube index of each row. Rows at different steps can share one call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import Conv2dNormActivation

from adafocus.errors import AdaFocusError
from adafocus.model.cubes import crop_cubes, plan_cubes
from adafocus.model.presets import LOCAL_ARCHS, Preset
from adafocus.model.tsm import ShiftThen


class GlanceEncoder(nn.Module):
    """fG: a MobileNetV2 (torchvision's structure and key names, unless `features` brings another
    layout of it) on every glance frame."""

    def __init__(
        self,
        *,
        frames: int,
        input_size: int,
        width: float = 1.0,
        channels: int = 1280,
        tsm: bool = False,
        features: nn.Sequential | None = None,
    ):
        super().__init__()
        self.input_size = input_size
        if features is None:
            features = torchvision.models.mobilenet_v2(width_mult=width).features
            if channels != features[-1].out_channels:  # a narrower last 1×1 conv (the demo)
                last_in = features[-1][0].in_channels
                features[-1] = Conv2dNormActivation(last_in, channels, kernel_size=1, activation_layer=nn.ReLU6)
        self.features = features
        self.out_channels = channels
        if tsm:
            for block in self.features:
                if isinstance(block, InvertedResidual) and block.use_res_connect:
                    block.conv[0] = ShiftThen(block.conv[0], frames)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = frames.flatten(0, 1)
        if x.shape[-1] != self.input_size:  # the glance may look at a downscaled video
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear")
        maps = self.features(x).unflatten(0, frames.shape[:2])
        return maps, maps.mean(dim=(-2, -1))


class PolicyNetwork(nn.Module):
    """π: the glance maps of the whole video -> the centres of all K cubes at once (paper 3.2).

    Layers of the official spatial policy: 1×1×1 conv, two 3×3×3 convs (BN+ReLU), then one conv
    spanning the whole (Tg, h, w) volume that emits 3K numbers, squashed to [0,1] by a sigmoid.
    """

    def __init__(self, *, in_channels: int, glance_frames: int, map_size: int, cubes: int, width: int):
        super().__init__()

        def conv_bn_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
            return [
                nn.Conv3d(cin, cout, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True),
            ]

        self.cubes = cubes
        self.encoder = nn.Sequential(
            *conv_bn_relu(in_channels, width, 1),
            *conv_bn_relu(width, width, 3),
            *conv_bn_relu(width, width, 3),
        )
        self.head = nn.Conv3d(width, 3 * cubes, kernel_size=(glance_frames, map_size, map_size))
        # Start from cubes spread evenly over time at the frame centre, so that an untrained policy
        # (and a random-weight benchmark model) looks at different frames, not K times the same.
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            spread = torch.logit((torch.arange(cubes) + 0.5) / cubes)
            self.head.bias.copy_(torch.stack([torch.zeros(cubes), torch.zeros(cubes), spread], dim=1).flatten())

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = self.encoder(maps.transpose(1, 2))  # (B, C, Tg, h, w) for Conv3d
        return torch.sigmoid(self.head(x).flatten(1)).unflatten(1, (self.cubes, 3))


def _resnet_stage(block: type[nn.Module], cin: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage of torchvision blocks, with torchvision's layout and key names."""
    cout = width * block.expansion
    downsample = None
    if stride != 1 or cin != cout:
        downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
    layers = [block(cin, width, stride, downsample)]
    layers += [block(cout, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class LocalEncoder(nn.Module):
    """fL: a ResNet trunk (no fc) on the frames of one cube, TSM-shifted when the cube has
    several frames; the feature is the mean over the cube's frames and positions. The trunk is
    torchvision's ResNet layout (same key names); LOCAL_ARCHS sets depth and widths."""

    def __init__(self, *, arch: str, frames: int, tsm: bool):
        super().__init__()
        self.arch, self.frames, self.tsm = arch, frames, tsm
        kind, depths, widths = LOCAL_ARCHS[arch]
        block = {"basic": BasicBlock, "bottleneck": Bottleneck}[kind]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths)):
            setattr(self, f"layer{i + 1}", _resnet_stage(block, cin, width, depth, stride=1 if i == 0 else 2))
            cin = width * block.expansion
        self.out_dim = cin
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if tsm:
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                for block in layer:
                    block.conv1 = ShiftThen(block.conv1, frames)

    @contextlib.contextmanager
    def clip_length(self, frames: int) -> Iterator[LocalEncoder]:
        """Run clips of another length with the same weights: the dense baseline runs whole
        clips, training runs cubes one frame longer. Only the TSM shifts need to know."""
        shifts = [m for m in self.modules() if isinstance(m, ShiftThen)]
        for m in shifts:
            m.segments = frames
        try:
            yield self
        finally:
            for m in shifts:
                m.segments = self.frames

    def feature_maps(self, cubes: torch.Tensor) -> torch.Tensor:
        """(B, T', 3, h, w) -> (B, T', D, h/32, w/32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(cubes.flatten(0, 1)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.unflatten(0, cubes.shape[:2])

    def forward(self, cubes: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(cubes).mean(dim=(1, 3, 4))


def _mlp(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))


class Classifier(nn.Module):
    """fC: accumulated feature pooling (FrameExit style) with reuse of the glance features.

    The K per-step heads are stacked into one linear layer: computing every head for every row and
    taking each row's slice by its step is one GEMM, cheap beside the encoders, and lets rows at
    different steps share a call. Because both MLPs end in ReLU, a zero `local_state` is the
    identity of the running max, so the first cube needs no special case.
    """

    def __init__(self, *, glance_dim: int, local_dim: int, hidden: int, classes: int, steps: int):
        super().__init__()
        self.classes, self.steps = classes, steps
        self.global_mlp = _mlp(glance_dim, hidden)
        self.local_mlp = _mlp(local_dim, hidden)
        self.glance_head = nn.Linear(hidden, classes)
        self.step_heads = nn.Linear(2 * hidden, steps * classes)

    def glance(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled (B, Tg, C) -> logits0 (B, N), global_state (B, H)."""
        global_state = self.global_mlp(pooled.flatten(0, 1)).unflatten(0, pooled.shape[:2]).amax(dim=1)
        return self.glance_head(global_state), global_state

    def step(
        self,
        features: torch.Tensor,
        local_state: torch.Tensor,
        global_state: torch.Tensor,
        step: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold one cube's features in; `step` (B,) int64 in 1..K picks each row's head."""
        local_state = torch.maximum(local_state, self.local_mlp(features))
        every_head = self.step_heads(torch.cat([local_state, global_state], dim=1))
        every_head = every_head.unflatten(1, (self.steps, self.classes))
        index = (step - 1).view(-1, 1, 1).expand(-1, 1, self.classes)
        return every_head.gather(1, index).squeeze(1), local_state


class AdaFocusV3(nn.Module):
    """The four sub-networks of one preset. Adaptive inference over them is in `reference.py`."""

    def __init__(self, preset: Preset):
        super().__init__()
        check_family(preset, "adafocusv3")
        self.preset = preset
        self.glance = GlanceEncoder(
            frames=preset.glance_frames,
            input_size=preset.glance_size,
            width=preset.glance_width,
            channels=preset.glance_channels,
            tsm=preset.tsm,
        )
        self.policy = PolicyNetwork(
            in_channels=self.glance.out_channels,
            glance_frames=preset.glance_frames,
            map_size=stride32_size(preset.glance_size),
            cubes=preset.max_cubes,
            width=preset.policy_channels,
        )
        self.local = LocalEncoder(arch=preset.local_arch, frames=preset.cube_frames, tsm=preset.tsm)
        self.classifier = Classifier(
            glance_dim=self.glance.out_channels,
            local_dim=self.local.out_dim,
            hidden=preset.hidden_dim,
            classes=preset.num_classes,
            steps=preset.max_cubes,
        )
        self.register_buffer(
            "glance_index",
            torch.as_tensor(glance_frame_indices(preset.num_frames, preset.glance_frames)),
            persistent=False,
        )

    def glance_frames(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> the Tg glance frames (B, Tg, 3, H, W)."""
        return videos.index_select(1, self.glance_index)

    def plan(self, maps: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole plan at once: centres (B, K, 3) and cube starts (B, K, 3) int64 (cubes.py)."""
        centres = self.policy(maps)
        return centres, plan_cubes(centres, self.preset)

    def cut(
        self, videos: torch.Tensor, rows: torch.Tensor, planned: torch.Tensor, starts: torch.Tensor
    ) -> torch.Tensor:
        """One step's cubes of some videos: starts (B, 3) of the rows -> (B, T', 3, h', w')."""
        return crop_cubes(videos, rows, starts, self.preset.cube_size, self.preset.cube_frames)


def glance_frame_indices(num_frames: int, glance_frames: int) -> list[int]:
    """The glance frames among the video's frames: the middle of Tg equal segments (TSN rule)."""
    return [(2 * i + 1) * num_frames // (2 * glance_frames) for i in range(glance_frames)]


def stride32_size(size: int) -> int:
    """Feature-map side of MobileNetV2 and ResNet trunks: five halvings, rounding up."""
    for _ in range(5):
        size = (size + 1) // 2
    return size


def check_family(preset: Preset, family: str) -> None:
    if preset.family != family:
        raise AdaFocusError(
            f"preset {preset.name!r} is of the {preset.family!r} family, not {family!r}",
            "build models with adafocus.model.build_model(preset), which picks the family",
        )
