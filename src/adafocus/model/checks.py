"""The checks every entry point runs before any work: a batch of videos and a set of exit thresholds
that a preset can take. One place, so the reference loop and the runtime say the same thing."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from adafocus.errors import AdaFocusError, NonFiniteOutput
from adafocus.model.presets import Preset


def check_videos(videos, preset: Preset, name: str = "videos") -> None:
    """One clear error for a batch (B, T, 3, H, W) this preset cannot take: shape, dtype, NaN/inf.
    numpy arrays and torch tensors (on any device) alike."""
    check_video_layout(videos, preset, name)
    bad = nonfinite_rows(videos)
    if bad:
        raise AdaFocusError(f"{name} hold NaN or inf values (videos {bad})", "check the decoder and normalisation")


def check_video(video, preset: Preset, name: str = "video") -> None:
    """`check_videos` for one video (T, 3, H, W), as a server receives them."""
    check_video_layout(video[None], preset, name)
    if nonfinite_rows(video[None]):
        raise AdaFocusError(f"{name} holds NaN or inf values", "check the decoder and normalisation")


def check_video_layout(videos, preset: Preset, name: str = "videos") -> None:
    """The shape and dtype half of `check_videos`: what can be told without reading the frames."""
    shape = tuple(videos.shape) if hasattr(videos, "shape") else None
    expected = "(B, " + ", ".join(map(str, preset.video_shape)) + ")"
    if shape is None or len(shape) != 5 or shape[1:] != preset.video_shape:
        raise AdaFocusError(
            f"{name} has shape {shape}, the {preset.name!r} preset takes {expected}",
            f"sample {preset.num_frames} frames, centre-crop to {preset.frame_size}², layout (B, T, C, H, W)",
        )
    if str(videos.dtype).removeprefix("torch.") != "float32":
        raise AdaFocusError(f"{name} has dtype {videos.dtype}, expected float32", "normalise frames to float32")


def check_finite_in_set(videos, offset: int, name: str = "videos") -> None:
    """The NaN/inf check of a part of a larger set (a batch, a recording pass), naming the videos by
    their index in the whole set: the runtime's own check can only count within the part."""
    if bad := nonfinite_rows(videos):
        raise AdaFocusError(
            f"{name} {[offset + i for i in bad]} (counted from 0 over the whole set) hold NaN or inf values",
            "check the decoder and normalisation",
        )


def nonfinite_rows(videos) -> list[int]:
    """The rows of a float32 batch holding NaN or inf: one cheap pass (a sum) for a good batch, and
    only a failing one is searched for the culprits (an overflowing sum of finite values is none)."""
    if not isinstance(videos, torch.Tensor):  # numpy's sum: one thread, and no OpenMP threads left
        array = np.asarray(videos)  # spinning beside the engine's (torch's sum slowed a server's loop)
        with np.errstate(over="ignore", invalid="ignore"):  # a sum of large finite values may overflow
            if np.isfinite(array.sum()):
                return []
        return np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(1)).tolist()
    if bool(torch.isfinite(videos.sum())):
        return []
    return (~torch.isfinite(videos.flatten(1)).all(1)).nonzero().flatten().tolist()


def nonfinite_logits(what: str, logits, exit_step: int | None = None) -> NonFiniteOutput | None:
    """The error for one video's logits that hold NaN or inf, else None. The input checks pass finite
    pixels, yet an fp16 engine can overflow on them and a broken export can compute NaN: such logits
    have no class and no probabilities (softmax makes them NaN), and strict JSON cannot hold them.
    Returned, not raised: the callers answer that video with it and go on with the others."""
    logits = np.asarray(logits)
    if np.isfinite(logits).all():
        return None
    kinds = [name for name, bad in (("NaN", np.isnan(logits)), ("inf", np.isinf(logits))) if bad.any()]
    at = "" if exit_step is None else f" at exit step {exit_step}"
    return NonFiniteOutput(
        f"{what}: the model gave non-finite logits ({' and '.join(kinds)}) for this video{at}",
        "an fp16 or INT8 engine can overflow: run it in fp32 (--backend onnxruntime); "
        "if fp32 gives them too, the export is broken: re-export the model",
    )


def check_thresholds(thresholds: Sequence[float | None], preset: Preset) -> list[float]:
    """K+1 entropy thresholds as floats; None means "never exit here" (-inf)."""
    values = [-math.inf if t is None else float(t) for t in thresholds]
    if len(values) != preset.num_exits or any(math.isnan(t) for t in values):
        raise AdaFocusError(
            f"{preset.name!r} needs {preset.num_exits} exit thresholds (steps 0..{preset.max_cubes}), "
            f"got {list(thresholds)!r}",
            "give one entropy threshold per step; +inf always exits, -inf never does",
        )
    return values
