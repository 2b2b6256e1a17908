"""The configurations of the paper (appendix A, sections 4.1-4.2), of the published Uni-AdaFocus
weights, and small demos, as plain data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from adafocus.errors import AdaFocusError


@dataclass(frozen=True)
class Preset:
    """Everything that fixes the shapes of a model of one of the FAMILIES.

    A video enters as `num_frames` frames of `frame_size`² pixels (TSN-sampled, centre-cropped,
    normalised). The glance network sees `glance_frames` of them, resized to `glance_size`². The
    policy places `max_cubes` cubes of `cube_size`² pixels × `cube_frames` frames. In the
    Uni-AdaFocus family a "cube" is one patch: a window of `window_min`..`frame_size` pixels on one
    frame chosen by the temporal policy, resampled to `cube_size`²; `temporal_channels` and
    `temperature` shape that temporal policy.
    """

    name: str
    dataset: str
    num_classes: int
    num_frames: int
    glance_frames: int
    cube_size: int
    cube_frames: int
    max_cubes: int
    tsm: bool
    frame_size: int = 224
    glance_size: int = 224
    glance_width: float = 1.0
    glance_channels: int = 1280
    local_arch: str = "resnet50"
    hidden_dim: int = 4096
    policy_channels: int = 128
    # how a video file becomes this model's input, as the model was trained (PREPROCESSING)
    preprocessing: str = "imagenet"
    description: str = ""
    family: str = "adafocusv3"
    temporal_channels: int = 64  # Uni-AdaFocus only: the temporal policy's width
    temperature: float = 1.0  # Uni-AdaFocus only: softmax temperature of the frame weights
    window_min: int = 96  # Uni-AdaFocus only: the smallest patch window side (pixels)

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise AdaFocusError(f"preset {self.name!r}: {what}", "fix the preset definition")

        check(self.family in FAMILIES, f"family must be one of {sorted(FAMILIES)}")
        check(self.local_arch in LOCAL_ARCHS, f"local_arch must be one of {sorted(LOCAL_ARCHS)}")
        check(self.preprocessing in PREPROCESSING, f"preprocessing must be one of {sorted(PREPROCESSING)}")
        check(0 < self.glance_frames <= self.num_frames, "need 0 < glance_frames <= num_frames")
        check(0 < self.cube_frames <= self.num_frames, "need 0 < cube_frames <= num_frames")
        check(0 < self.cube_size <= self.frame_size, "need 0 < cube_size <= frame_size")
        check(self.max_cubes >= 1, "need max_cubes >= 1")
        check(
            not self.frame_wise or self.max_cubes <= self.num_frames,
            "frame-wise cubes never repeat a frame, so max_cubes must be <= num_frames",
        )
        if self.family == "uni":
            check(self.cube_frames == 1 and not self.tsm, "a Uni-AdaFocus patch is one frame (cube_frames 1, no TSM)")
            check(
                self.glance_size == self.frame_size,
                "the Uni-AdaFocus glance sees whole frames (glance_size == frame_size)",
            )
            check(
                self.num_frames % self.glance_frames == 0 and self.num_frames // self.glance_frames >= 2,
                "Uni-AdaFocus glances at every (num_frames // glance_frames)-th frame: num_frames must be a "
                "multiple (>= 2x) of glance_frames",
            )
            check(0 < self.window_min <= self.frame_size, "need 0 < window_min <= frame_size")
            check(self.temperature > 0, "need temperature > 0")

    @property
    def frame_wise(self) -> bool:
        """Cubes one frame long (paper 4.1): a later cube never re-uses a frame."""
        return self.cube_frames == 1

    @property
    def plan_width(self) -> int:
        """Floats per step of the policy's plan: a cube centre (x, y, t) in [0, 1], or a Uni-AdaFocus
        patch box (x0, y0, width, height) in pixels."""
        return 4 if self.family == "uni" else 3

    @property
    def num_exits(self) -> int:
        """Exit steps 0..K: p0 from the glance, then one after each cube."""
        return self.max_cubes + 1

    @property
    def resize_shorter_side(self) -> int | None:
        """The shorter side a decoded frame is resized to before the centre crop; None: no resize
        (a frame smaller than the crop is scaled up just enough)."""
        return round(self.frame_size * 256 / 224) if self.preprocessing == "imagenet" else None

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """Shape of one preprocessed video: (T, 3, H, W)."""
        return (self.num_frames, 3, self.frame_size, self.frame_size)

    @property
    def video_bytes(self) -> int:
        """Bytes of one preprocessed video (float32)."""
        return 4 * self.num_frames * 3 * self.frame_size * self.frame_size

    @property
    def cube_shape(self) -> tuple[int, int, int, int]:
        """Shape of one cube: (T', 3, h', w')."""
        return (self.cube_frames, 3, self.cube_size, self.cube_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preset:
        data = dict(data)
        if "preprocessing" not in data:  # a record from before the field: what its preset trained with
            registered = PRESETS.get(data.get("name", ""))
            data["preprocessing"] = registered.preprocessing if registered else "imagenet"
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdaFocusError(
                f"preset record has unknown fields {unknown}",
                "it was written by a newer adafocus-deploy; upgrade this one",
            )
        # a damaged or hand-edited record: one error naming what it lacks, not a TypeError traceback
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise AdaFocusError(
                f"preset record {data.get('name', '?')!r} lacks the fields {missing}",
                "the file is damaged or was edited: use the file as adafocus-deploy wrote it",
            )
        return cls(**data)


# What a preset builds (adafocus.model.build_model); docs/model.md says more.
FAMILIES = {
    "adafocusv3": "AdaFocusV3 (ECCV 2022): the policy places K cubes at once, cut integer-aligned",
    "uni": "Uni-AdaFocus (TPAMI 2024, the published weights): a temporal policy picks K frames, a spatial "
    "policy one patch window per frame, resampled bilinearly",
}

# How video files are turned into a preset's input (adafocus.data.video): always TSN frame sampling,
# /255 and ImageNet mean/std; the resize differs.
PREPROCESSING = {
    "imagenet": "shorter side resized to round(S * 256 / 224) (bilinear, antialiased), centre crop S×S: the "
    "official recipe (what ImageNet-pretrained backbones and the paper's models expect)",
    "as-is": "frames as they are: centre crop S×S without resizing (a frame smaller than S is scaled up just "
    "enough); for models trained on frames of exactly their input size, such as the demo",
}

# Local encoder trunks: (block, blocks per stage, stage widths). The first two are torchvision's
# ResNet-18/50; "resnet10-slim" is a half-width, one-block-per-stage ResNet for the CPU demo.
LOCAL_ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet10-slim": ("basic", (1, 1, 1, 1), (32, 64, 128, 256)),
}


def _framewise(dataset: str, key: str, classes: int, patch: int) -> Preset:
    return Preset(
        name=f"{key}-p{patch}",
        dataset=dataset,
        num_classes=classes,
        num_frames=18,
        glance_frames=18,
        cube_size=patch,
        cube_frames=1,
        max_cubes=18,
        tsm=False,
        description=f"{dataset}: MobileNetV2 glance on 18 frames, up to 18 frame-wise {patch}² cubes "
        "for a ResNet-50 (paper 4.1)",
    )


def _tsm(dataset: str, key: str, classes: int, frames: int) -> Preset:
    return Preset(
        name=f"{key}-t{frames}",
        dataset=dataset,
        num_classes=classes,
        num_frames=16,
        glance_frames=8,
        cube_size=128,
        cube_frames=frames,
        max_cubes=2,
        tsm=True,
        description=f"{dataset}: TSM-MobileNetV2 glance on 8 of 16 frames, up to 2 cubes of "
        f"128²×{frames} for a TSM-ResNet-50 (paper 4.2)",
    )


DEMO = Preset(
    name="demo",
    dataset="synthetic 'find the detail' videos",
    num_classes=10,
    num_frames=8,
    glance_frames=4,
    frame_size=128,
    glance_size=64,
    glance_width=0.5,
    glance_channels=256,
    cube_size=64,
    cube_frames=1,
    max_cubes=4,
    tsm=False,
    local_arch="resnet10-slim",
    hidden_dim=128,
    policy_channels=32,
    preprocessing="as-is",  # trained on 128² frames as generated: resampling would blur its 1-pixel glyphs
    description="small model that trains on 2 CPU cores in minutes: MobileNetV2×0.5 glance at 64², "
    "up to 4 frame-wise 64² cubes for a slim ResNet-10",
)


def _uni(dataset: str, key: str, classes: int) -> Preset:
    return Preset(
        name=f"uni-{key}-p128",
        dataset=dataset,
        num_classes=classes,
        num_frames=48,
        glance_frames=16,
        cube_size=128,
        cube_frames=1,
        max_cubes=16,
        tsm=False,
        family="uni",
        description=f"{dataset}, the published Uni-AdaFocus weights ({key}_p128.pth.tar): MobileNetV2 glance on 16 "
        "of 48 frames, 16 frames picked by a temporal policy, a 96-224 px patch of each resampled to 128² for a "
        "ResNet-50",
    )


# The family's small member: the demo's networks in the Uni-AdaFocus roles (random weights in tests).
UNI_SMALL = dataclasses.replace(
    DEMO,
    name="uni-small",
    dataset="synthetic videos",
    num_frames=12,
    glance_frames=4,
    glance_size=128,
    family="uni",
    temporal_channels=16,
    window_min=56,
    description="Uni-AdaFocus at test size: MobileNetV2x0.5 glance on 4 of 12 frames of 128², 4 frames picked, a "
    "56-128 px patch of each resampled to 64² for a slim ResNet-10",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        *(_framewise("ActivityNet", "activitynet", 200, s) for s in (96, 128)),
        *(_framewise("FCVID", "fcvid", 239, s) for s in (96, 128)),
        *(_framewise("Mini-Kinetics", "mini-kinetics", 200, s) for s in (96, 128)),
        *(_tsm("Something-Something V1", "sthsth-v1", 174, t) for t in (8, 12, 16)),
        *(_tsm("Something-Something V2", "sthsth-v2", 174, t) for t in (8, 12, 16)),
        *(_tsm("Diving48", "diving48", 48, t) for t in (8, 12, 16)),
        DEMO,
        _uni("ActivityNet", "actnet", 200),
        _uni("FCVID", "fcvid", 239),
        _uni("Mini-Kinetics", "minik", 200),
        UNI_SMALL,
    ]
}

# Short names pick the configuration the paper uses by default (Table 5: 128²×1; Sec. 4.2: 128²×12).
ALIASES = {
    "activitynet": "activitynet-p128",
    "fcvid": "fcvid-p128",
    "mini-kinetics": "mini-kinetics-p128",
    "sthsth-v1": "sthsth-v1-t12",
    "sthsth-v2": "sthsth-v2-t12",
    "diving48": "diving48-t12",
}


def get_preset(name: str) -> Preset:
    """A preset by its name or alias (case-insensitive)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise AdaFocusError(
            f"unknown preset {name!r}",
            f"choose one of: {', '.join([*PRESETS, *ALIASES])} (`adafocus presets` lists them)",
        )
    return PRESETS[key]
