"""Checkpoints: our own format, and foreign state dicts mapped onto our modules.

Our format is a `torch.save`d dict that `torch.load(weights_only=True)` can read (tensors and plain
Python only, no pickled classes):

    {"format": "adafocus-checkpoint", "format_version": 1, "preset": {...Preset fields...},
     "class_names": [...], "state_dict": {...}, "meta": {...}}

A foreign checkpoint is a bare state dict or one under "state_dict"/"model" (the official code saves
{'epoch', 'state_dict', ...} from DDP, keys prefixed `module.`); it needs a preset to say which shapes
to build. For an AdaFocusV3 preset its keys are mapped by the prefix table below. For a Uni-AdaFocus
preset (the published weights) every official key is either taken (`uni_sources`: our modules carry
the official names, apart from the classifier's heads, which are stacked) or left out on purpose
(`UNI_IGNORED`); anything else, and anything missing, is one error naming the keys.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adafocus.errors import AdaFocusError
from adafocus.files import atomic_write
from adafocus.model.families import Model, model_class
from adafocus.model.presets import Preset

FORMAT = "adafocus-checkpoint"
FORMAT_VERSION = 1

# Official (Uni-)AdaFocus names -> ours (official-notes.md). Keys outside it are reported as unexpected.
FOREIGN_PREFIXES = {
    "global_CNN.features.": "glance.features.",
    "local_CNN.": "local.",
    "spatial_policy.encoder.": "policy.encoder.",
    "classifier.global_mlp.layers.": "classifier.global_mlp.",
    "classifier.local_mlp.layers.": "classifier.local_mlp.",
}


@dataclass
class LoadReport:
    """What a non-strict load left out, by name."""

    missing: list[str] = field(default_factory=list)  # our parameters the file did not have
    unexpected: list[str] = field(default_factory=list)  # file entries nothing of ours took
    ignored: list[str] = field(default_factory=list)  # file entries left out on purpose (UNI_IGNORED)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected


@dataclass
class Checkpoint:
    model: Model
    class_names: list[str]
    meta: dict
    report: LoadReport

    @property
    def preset(self) -> Preset:
        return self.model.preset


def default_class_names(preset: Preset) -> list[str]:
    return [f"class_{i}" for i in range(preset.num_classes)]


def save_checkpoint(
    path: str | os.PathLike,
    model: Model,
    class_names: list[str] | None = None,
    meta: dict | None = None,
    *,
    half: bool = False,
) -> Path:
    """Write `model` in our format; the file appears whole or not at all. `half` stores floating
    tensors as float16 (half the size; they load back into float32 exactly as rounded)."""
    preset = model.preset
    names = list(class_names) if class_names is not None else default_class_names(preset)
    if len(names) != preset.num_classes:
        raise AdaFocusError(
            f"{len(names)} class names for preset {preset.name!r} with {preset.num_classes} classes",
            "pass one name per class",
        )
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preset": preset.to_dict(),
        "class_names": names,
        "state_dict": {
            k: v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu()
            for k, v in model.state_dict().items()
        },
        "meta": json.loads(json.dumps(meta or {})),  # plain JSON types, so weights_only loading works
    }
    return atomic_write(path, torch_bytes(record))


def torch_bytes(value) -> bytes:
    """What torch.save writes for `value`, in memory (for an atomic write)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def load_checkpoint(path: str | os.PathLike, preset: Preset | None = None, *, strict: bool = True) -> Checkpoint:
    """Read our format or a foreign state dict (which needs `preset`).

    With `strict`, any missing or unexpected key is an error naming the keys; otherwise the model
    keeps its random initialisation there and `Checkpoint.report` lists them.
    """
    path = Path(path)
    if not path.is_file():
        raise AdaFocusError(f"checkpoint {path} does not exist", "check the path")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a non-checkpoint file
        raise AdaFocusError(
            f"{path} is not a PyTorch checkpoint that can be read safely ({type(e).__name__}: {str(e)[:200]})",
            "pass a file written by `adafocus` or a state dict saved with torch.save",
        ) from None

    if isinstance(record, dict) and record.get("format") == FORMAT:
        version = record.get("format_version")
        if version != FORMAT_VERSION:
            raise AdaFocusError(
                f"{path} has checkpoint format version {version}; this adafocus-deploy reads {FORMAT_VERSION}",
                "use the adafocus-deploy version that wrote it",
            )
        stored = Preset.from_dict(record["preset"])
        if preset is not None and preset != stored:
            raise AdaFocusError(
                f"{path} holds a {stored.name!r} model, not {preset.name!r}", "drop --preset or pick the matching one"
            )
        state, names, meta, foreign = record["state_dict"], record["class_names"], record["meta"], False
        # save_checkpoint writes one name per class; a file with another count (edited, or made by
        # hand) would name the wrong classes, or fail on the last ones, only when predictions come
        if not isinstance(names, list) or len(names) != stored.num_classes:
            count = len(names) if isinstance(names, list) else type(names).__name__
            raise AdaFocusError(
                f"{path} has {count} class names for its {stored.num_classes} classes",
                "use the file as adafocus-deploy wrote it (save_checkpoint with one name per class)",
            )
    else:
        state = _foreign_state_dict(record, path)
        if preset is None:
            raise AdaFocusError(
                f"{path} is a plain state dict with no preset in it", "say which preset it is (e.g. --preset sthsth-v1)"
            )
        stored, names, meta, foreign = preset, default_class_names(preset), {"source": str(path)}, True

    model = model_class(stored)(stored)
    if foreign and stored.family == "uni":
        state, report = _map_uni_checkpoint(model, state, path, strict)
        _load_state(model, state, path, strict=False)  # what is there; the report says what was not
    elif foreign:
        report = _load_state(model, map_foreign_keys(state), path, strict)
    else:
        report = _load_state(model, state, path, strict)
    return Checkpoint(model.eval(), list(names), dict(meta), report)


def _foreign_state_dict(record: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(record, dict):
        for key in ("state_dict", "model"):
            if isinstance(record.get(key), dict):
                record = record[key]
                break
    if not isinstance(record, dict) or not record or not all(isinstance(v, torch.Tensor) for v in record.values()):
        raise AdaFocusError(
            f"{path} holds no state dict (expected name -> tensor, bare or under 'state_dict')",
            "pass a checkpoint of an AdaFocus model",
        )
    return record


def map_foreign_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP's `module.` and rename the official prefixes; unknown keys pass through unchanged
    (and are then reported as unexpected)."""
    mapped = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for theirs, ours in FOREIGN_PREFIXES.items():
            if key.startswith(theirs):
                key = ours + key[len(theirs) :]
                break
        mapped[key] = value
    return mapped


def _load_state(model: Model, state: dict[str, torch.Tensor], path: Path, strict: bool) -> LoadReport:
    own = model.state_dict()
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong_shape:
        raise AdaFocusError(
            f"{path} does not fit preset {model.preset.name!r}; shapes differ for {len(wrong_shape)} tensors: "
            + "; ".join(wrong_shape[:5]),
            "pick the preset the checkpoint was trained with",
        )
    report = LoadReport(missing=sorted(set(own) - set(state)), unexpected=sorted(set(state) - set(own)))
    if strict and not report.complete:
        raise AdaFocusError(
            f"{path} does not match preset {model.preset.name!r}: "
            f"{len(report.missing)} missing keys {_first(report.missing)}, "
            f"{len(report.unexpected)} unexpected keys {_first(report.unexpected)}",
            "pick the matching preset, or load with strict=False to keep random weights where keys are missing",
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report


def _first(names: list[str], n: int = 8) -> str:
    return "[" + ", ".join(names[:n]) + (", ..." if len(names) > n else "") + "]"


# Official Uni-AdaFocus keys that inference never reads, by prefix, and why they are left out.
UNI_IGNORED = {
    "global_CNN.classifier.": "MobileNetV2's ImageNet head (the glance stops at the feature maps)",
    "local_CNN.fc.": "ResNet-50's ImageNet head (the local network stops at the pooled features)",
    "global_CNN_fc.": "training-only head on the glance features",
    "aux_fc.": "training-only head of the spatial policy's auxiliary loss",
    "local_CNN_fc.": "training-only head on the local features",
    "classifier.global_classifiers.": "glance heads 0..Tg-2: the official early exit reads only the last one",
}


def uni_sources(model: Model) -> dict[str, list[str]]:
    """Each key of our Uni-AdaFocus state dict -> the official keys (DDP's `module.` stripped) it is
    made of: the same name, the MLPs' `layers.` level, the last glance head as `glance_head`, and the
    K local heads stacked into `step_heads` (rows of head i at i × N)."""
    p = model.preset
    sources = {}
    for key in model.state_dict():
        if key.startswith("classifier.glance_head."):
            sources[key] = [f"classifier.global_classifiers.{p.glance_frames - 1}.1.{key.rsplit('.', 1)[1]}"]
        elif key.startswith("classifier.step_heads."):
            sources[key] = [f"classifier.local_classifiers.{i}.1.{key.rsplit('.', 1)[1]}" for i in range(p.max_cubes)]
        elif key.startswith(("classifier.global_mlp.", "classifier.local_mlp.")):
            head, rest = key.split(".", 2)[1:]
            sources[key] = [f"classifier.{head}.layers.{rest}"]
        else:
            sources[key] = [key]
    return sources


def _uni_ignored(key: str, preset: Preset) -> bool:
    if key.startswith("classifier.global_classifiers."):
        index = key.split(".")[2]
        return index.isdigit() and int(index) < preset.glance_frames - 1
    return key.startswith(tuple(UNI_IGNORED))


def _map_uni_checkpoint(
    model: Model, state: dict[str, torch.Tensor], path: Path, strict: bool
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The official keys of `state` as our state dict, and what was missing, unknown or left out
    (in the official names). With `strict` anything missing or unknown is one error naming it all."""
    preset = model.preset
    theirs = {key.removeprefix("module."): value for key, value in state.items()}
    sources = uni_sources(model)
    wanted = {name for names in sources.values() for name in names}
    report = LoadReport(
        missing=sorted(wanted - set(theirs)),
        unexpected=sorted(k for k in set(theirs) - wanted if not _uni_ignored(k, preset)),
        ignored=sorted(k for k in set(theirs) - wanted if _uni_ignored(k, preset)),
    )
    if strict and not report.complete:
        raise AdaFocusError(
            f"{path} is not a Uni-AdaFocus checkpoint of preset {preset.name!r}: "
            f"{len(report.missing)} keys missing {_first(report.missing, 12)}, "
            f"{len(report.unexpected)} keys unknown {_first(report.unexpected, 12)}",
            "pass the official file of this preset (e.g. actnet_p128.pth.tar for uni-actnet-p128); "
            "left out on purpose, and never an error: " + ", ".join(f"{k}* ({why})" for k, why in UNI_IGNORED.items()),
        )
    own = model.state_dict()
    mapped, wrong_shape = {}, []
    for key, names in sources.items():
        if not all(name in theirs for name in names):
            continue
        expected = own[key].shape if len(names) == 1 else (own[key].shape[0] // len(names), *own[key].shape[1:])
        wrong = [
            f"{n}: file {tuple(theirs[n].shape)} vs model {tuple(expected)}"
            for n in names
            if theirs[n].shape != expected
        ]
        if wrong:
            wrong_shape += wrong
            continue
        mapped[key] = theirs[names[0]] if len(names) == 1 else torch.cat([theirs[n] for n in names], dim=0)
    if wrong_shape:
        raise AdaFocusError(
            f"{path} does not fit preset {preset.name!r}; shapes differ for {len(wrong_shape)} tensors: "
            + "; ".join(wrong_shape[:5]),
            "pick the preset the checkpoint was trained with (uni-actnet-p128, uni-fcvid-p128, uni-minik-p128)",
        )
    return mapped, report
