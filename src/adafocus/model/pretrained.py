"""Start the encoders from torchvision ImageNet weights already on disk (nothing is downloaded).

    load_encoder_weights(model.glance, "mobilenet_v2-b0353104.pth", "glance")   # fG
    load_encoder_weights(model.local, "resnet50-0676ba61.pth", "local")          # fL

The encoders keep torchvision's structure and key names (adafocus.model.networks), so a state dict
saved by torchvision (`torch.save(model.state_dict(), path)`, or the files torchvision's own
download cache holds) maps key for key. Two differences are bridged: TSM wraps the first conv of a
residual branch in `ShiftThen`, whose child is `net` (the key gains `.net`), and torchvision's head
(`classifier.*` of MobileNetV2, `fc.*` of ResNet) has no place in an encoder and is skipped. Every
other key must be there with the same shape: a file for another network, width or depth is one
error that names the first differences.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from adafocus.errors import AdaFocusError, first_of

HEADS = ("classifier.", "fc.")  # torchvision's classification heads: not part of an encoder
WHAT = {
    "glance": "torchvision's mobilenet_v2 (width 1.0) ImageNet state dict",
    "local": "torchvision's resnet50 (or resnet18, as the preset's local_arch) ImageNet state dict",
}


def torchvision_key(key: str) -> str:
    """Our encoder's key -> torchvision's (TSM's wrapper `net` removed)."""
    return key.replace(".net.", ".")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a file: a bare one, or one inside {"state_dict"/"model": ...}; DataParallel's
    `module.` prefixes removed."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise AdaFocusError(f"{name}: no such weights file", "give the path of a torchvision state dict on disk")
    try:
        data = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of something else, a truncated file, not a torch file at all
        raise AdaFocusError(
            f"{name}: not a PyTorch state dict ({type(e).__name__}: {e})",
            "save one with torch.save(model.state_dict(), path)",
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise AdaFocusError(
            f"{name}: holds no state dict of tensors", "save one with torch.save(model.state_dict(), path)"
        )
    return {k.removeprefix("module."): v for k, v in data.items()}


def load_encoder_weights(encoder: nn.Module, path: str | os.PathLike, role: str) -> dict:
    """Copy a torchvision state dict into `encoder` (role "glance" or "local"); every key of the
    encoder must be found with its shape. Returns what was loaded and what of the file was skipped."""
    theirs = read_state_dict(path)
    ours = encoder.state_dict()
    missing, mismatched, loaded = [], [], {}
    for key, value in ours.items():
        source = torchvision_key(key)
        if source not in theirs:
            missing.append(source)
        elif theirs[source].shape != value.shape:
            mismatched.append(f"{source} {tuple(theirs[source].shape)} vs {tuple(value.shape)}")
        else:
            loaded[key] = theirs[source].to(value.dtype)
    if missing or mismatched:
        found = []
        if missing:
            found.append(f"{len(missing)} keys missing ({first_of(missing, 3)})")
        if mismatched:
            found.append(f"{len(mismatched)} of another shape ({first_of(mismatched, 3)})")
        raise AdaFocusError(
            f"{os.fspath(path)} does not fit the {role} encoder: {'; '.join(found)}",
            f"give {WHAT.get(role, 'a matching state dict')} for this preset",
        )
    encoder.load_state_dict(loaded)
    used = {torchvision_key(k) for k in ours}
    skipped = sorted(k for k in theirs if k not in used)
    unexpected = [k for k in skipped if not k.startswith(HEADS)]
    if unexpected:
        raise AdaFocusError(
            f"{os.fspath(path)} has {len(unexpected)} keys the {role} encoder does not ({', '.join(unexpected[:3])})",
            f"give {WHAT.get(role, 'a matching state dict')} for this preset",
        )
    return {"file": os.fspath(path), "tensors": len(loaded), "skipped": skipped}
