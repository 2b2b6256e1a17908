"""Video files -> the (T, 3, S, S) float32 tensor an AdaFocusV3 model takes.

Sampling is TSN's: the video is cut into T equal segments and the middle frame of each is kept,
as the official AdaFocus training code does, so a model sees real videos the way it was trained.
Pixels follow the official test-time recipe scaled to the preset's frame size S: shorter side to
round(S * 256 / 224) (bilinear, antialiased like the PIL resize torchvision applies), centre crop
S×S, /255, ImageNet mean/std.

Decoding is one sequential pass that keeps only the sampled frames (each already cropped to S×S)
and stops right after the last one, so memory is bounded by T frames whatever the video's length.
Seeking would skip decoding the gaps, but a seek lands on a keyframe, and mapping timestamps back to
exact frame indices is unreliable across containers; a sequential pass gives exact indices
everywhere, and costs at most one decode of the file.

Frame counts come from the container (`stream.frames`) when it reports one. When it reports 0
(Matroska/WebM, raw streams), a first demux pass counts the stream's packets without decoding
them: one packet per frame holds for the codecs video files carry, and it is far cheaper than
decoding.

A clip shorter than T frames is sampled with repeats (`tsn_indices`), like TSN at test time; only
a file without a single decodable frame is an error.

A container can claim more frames than decode (a cut-off download; or a count that includes
frames the decoder drops). Then the frames that did decode are sampled again with a second
sequential pass and the clip is marked `truncated`; with none decoded it is an error. The other
way round, a container that under-reports its count is not detected: sampling covers the frames it
claims.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import av
import numpy as np
import torch
import torch.nn.functional as F

from adafocus.errors import AdaFocusError
from adafocus.model.preprocess import MEAN, STD

if TYPE_CHECKING:
    from adafocus.model.presets import Preset

_REENCODE = "re-encode it, e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`, or use another copy"


@dataclass(frozen=True)
class VideoClip:
    """A preprocessed clip together with where its frames came from, for drawing and diagnostics.

    `indices` are 0-based positions in decode order among the `source_frames` frames sampled over.
    `claimed_frames` is what the container said (or the packet count); it differs from
    `source_frames` only when the file turned out to be `truncated`. `decoded_frames` counts every
    frame the decoder produced in the pass that was kept, which stops after the last sampled one.
    """

    path: str
    frames: torch.Tensor  # (T, 3, S, S) float32, the model input
    pixels: torch.Tensor  # (T, 3, S, S) uint8, the same frames before normalisation
    indices: list[int]
    source_frames: int
    claimed_frames: int
    counted_by: str  # "container" (stream.frames) or "packets" (demux pass)
    source_size: tuple[int, int]  # (width, height) of the decoded frames
    decoded_frames: int
    truncated: bool


def tsn_indices(num_frames: int, count: int) -> list[int]:
    """Middle frame of each of `count` equal segments: floor((i + 0.5) * num_frames / count).

    Integer arithmetic, so no float rounding can shift an index by one for long videos. A video
    shorter than `count` frames gets some frames more than once (3 frames sampled to 8: 0 0 0 1 1 2
    2 2), as TSN's test-time rule does: a short clip is still a video.
    """
    if count < 1 or num_frames < 1:
        raise AdaFocusError(f"cannot sample {count} frames from {num_frames}", "need count >= 1 and num_frames >= 1")
    return [((2 * i + 1) * num_frames) // (2 * count) for i in range(count)]


def random_tsn_indices(num_frames: int, count: int, rng: np.random.Generator) -> list[int]:
    """TSN's training sampling: one frame drawn uniformly from each of `count` equal segments (a
    segment shorter than one frame, in a clip shorter than `count`, keeps its single frame).
    Non-decreasing, like `tsn_indices`, so one sequential pass decodes them."""
    if count < 1 or num_frames < 1:
        raise AdaFocusError(f"cannot sample {count} frames from {num_frames}", "need count >= 1 and num_frames >= 1")
    out = []
    for i in range(count):
        lo, hi = (i * num_frames) // count, ((i + 1) * num_frames) // count
        out.append(int(rng.integers(lo, max(hi, lo + 1))))
    return out


IMAGENET = "imagenet"  # resize_shorter_side's default: the official recipe, round(S * 256 / 224)


def shorter_side_for(frame_size: int, resize_shorter_side: int | None | str = IMAGENET) -> int | None:
    return round(frame_size * 256 / 224) if resize_shorter_side == IMAGENET else resize_shorter_side


def resize_crop(rgb: np.ndarray, frame_size: int, resize_shorter_side: int | None | str = IMAGENET) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, S, S) uint8, resized and centre-cropped, rounded back to 8 bits as
    a resized image file would be (and as PIL's resize, which torchvision's transforms run, does):
    frames stay a quarter of float32's size until the model takes them (`to_model_input`), which is
    what the Ray engine ships between machines, and both engines see the same pixels.

    Sizes follow torchvision's Resize(int)/CenterCrop, which the official transforms use: the longer
    side is truncated, the crop offset rounded. `resize_shorter_side` None (the "as-is" preprocessing)
    crops the frame as it is, with no resampling at all, unless it is smaller than the crop.
    """
    height, width = rgb.shape[:2]
    short = shorter_side_for(frame_size, resize_shorter_side)
    if short is None and min(height, width) >= frame_size:
        image = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)  # exact pixels: nothing to round
        new_h, new_w = height, width
    else:
        short = short or frame_size  # "as-is", but too small: scale up just enough
        if width <= height:
            new_w, new_h = short, int(short * height / width)
        else:
            new_w, new_h = int(short * width / height), short
        image = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float()
        image = F.interpolate(image, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top = int(round((new_h - frame_size) / 2.0))
    left = int(round((new_w - frame_size) / 2.0))
    image = image[0, :, top : top + frame_size, left : left + frame_size]
    if image.dtype == torch.uint8:
        return image.contiguous()
    return image.round_().clamp_(0, 255).to(torch.uint8)


def to_model_input(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(T, 3, S, S) uint8 frames -> the float32 model input (/255, ImageNet mean/std).

    The float32 operations of `normalize(frames / 255)`, in place on one new array: the same values
    to the bit (tested), 6x faster than with a new array per operation (fresh memory is slow to
    touch), which a server pays on every request's frames."""
    out = np.asarray(pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels).astype(np.float32)
    np.divide(out, np.float32(255.0), out=out)
    out -= MEAN[:, None, None]
    out /= STD[:, None, None]
    return torch.from_numpy(out)


def load_video(
    path: str | os.PathLike, num_frames: int, frame_size: int, resize_shorter_side: int | None | str = IMAGENET
) -> torch.Tensor:
    """Model input (num_frames, 3, frame_size, frame_size) for one video file."""
    return load_clip(path, num_frames, frame_size, resize_shorter_side).frames


def load_video_for(path: str | os.PathLike, preset: Preset) -> torch.Tensor:
    """Model input shaped and preprocessed for `preset` (a `adafocus.model.presets.Preset`)."""
    return load_video(path, preset.num_frames, preset.frame_size, preset.resize_shorter_side)


def load_clip(
    path: str | os.PathLike,
    num_frames: int,
    frame_size: int,
    resize_shorter_side: int | None | str = IMAGENET,
    sample=tsn_indices,
) -> VideoClip:
    """Like `load_video`, keeping which source frames were sampled, for drawing and checks.
    `sample(frames, count)` picks the frames (default: TSN's test-time middle frames)."""
    name = os.fspath(path)
    if num_frames < 1 or frame_size < 1:
        raise AdaFocusError(
            f"{name}: asked for {num_frames} frames of {frame_size}² pixels",
            "num_frames and frame_size must be positive",
        )
    _check_file(name)

    claimed, counted_by = _count_frames(name)
    if claimed < 1:
        raise AdaFocusError(f"{name}: video has no frames", "give a file that contains at least one video frame")

    indices = sample(claimed, num_frames)
    kept, decoded, failure, size = _decode_indices(name, indices, frame_size, resize_shorter_side)
    source, truncated = claimed, False
    if len(kept) < len(set(indices)):
        # The decoder ran dry (or failed) before the last wanted frame: `decoded` is every frame
        # the file really has, so sample again over those.
        source, truncated = decoded, True
        reason = f" ({failure})" if failure else ""
        if decoded < 1:
            raise AdaFocusError(
                f"{name}: truncated or damaged: the container claims {claimed} frames but none decodes{reason}",
                _REENCODE,
            )
        indices = sample(decoded, num_frames)
        kept, decoded, failure, size = _decode_indices(name, indices, frame_size, resize_shorter_side)
        if len(kept) < len(set(indices)):  # the decoder gave a different answer the second time round
            raise AdaFocusError(f"{name}: damaged: decoding stops at a different frame on each pass", _REENCODE)

    pixels = torch.stack([kept[i] for i in indices])
    return VideoClip(
        path=name,
        frames=to_model_input(pixels),
        pixels=pixels,
        indices=indices,
        source_frames=source,
        claimed_frames=claimed,
        counted_by=counted_by,
        source_size=size,
        decoded_frames=decoded,
        truncated=truncated,
    )


def load_clip_for(path: str | os.PathLike, preset: Preset, sample=tsn_indices) -> VideoClip:
    """A clip for `preset`: its frame count and size, and the preprocessing it was trained with."""
    return load_clip(path, preset.num_frames, preset.frame_size, preset.resize_shorter_side, sample)


def _check_file(name: str) -> None:
    """Cheap checks first, so the common mistakes get a plain message instead of FFmpeg's."""
    if not os.path.exists(name):
        raise AdaFocusError(f"{name}: no such file", "check the path")
    if not os.path.isfile(name):
        raise AdaFocusError(f"{name}: not a regular file", "give the path of a video file")
    if os.path.getsize(name) == 0:
        raise AdaFocusError(f"{name}: file is empty (0 bytes)", "the copy or download did not finish; fetch it again")


def _open(name: str):
    """av.open with every failure turned into an AdaFocusError; returns (container, video stream)."""
    try:
        container = av.open(name)
    except av.error.InvalidDataError as err:
        raise AdaFocusError(
            f"{name}: not a video FFmpeg can read (unknown format, or the file is damaged/truncated)",
            f"check it plays in a video player; {_REENCODE}",
        ) from err
    except (av.error.FFmpegError, OSError) as err:
        raise AdaFocusError(f"{name}: cannot be opened: {err}", "check the file is a readable video") from err
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise AdaFocusError(
            f"{name}: has no video stream (streams found: {', '.join(kinds)})", "give a file that contains video"
        )
    return container, container.streams.video[0]


def _count_frames(name: str) -> tuple[int, str]:
    container, stream = _open(name)
    with container:
        if stream.frames > 0:
            return stream.frames, "container"
        count = 0
        try:
            for packet in container.demux(stream):
                if packet.size:  # demux ends with an empty flush packet
                    count += 1
        except av.error.FFmpegError:
            pass  # damaged tail: count what demuxed; decoding will confirm
        return count, "packets"


def _decode_indices(
    name: str, indices: list[int], frame_size: int, resize_shorter_side
) -> tuple[dict[int, torch.Tensor], int, str | None, tuple[int, int]]:
    """One sequential pass keeping `indices`: (kept frames, frames decoded, decode error, (w, h))."""
    wanted = set(indices)
    last = indices[-1]
    kept: dict[int, torch.Tensor] = {}
    decoded = 0
    failure = None
    container, stream = _open(name)
    size = (stream.codec_context.width, stream.codec_context.height)
    with container:
        stream.thread_type = "AUTO"  # frame + slice threads: several times faster on long videos
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    kept[decoded] = resize_crop(frame.to_ndarray(format="rgb24"), frame_size, resize_shorter_side)
                    size = (frame.width, frame.height)
                decoded += 1
                if decoded > last:
                    break
        except av.error.FFmpegError as err:
            failure = str(err)  # a damaged or cut-off stream; the caller decides what that means
    if not decoded and failure:
        raise AdaFocusError(f"{name}: no frame could be decoded ({failure})", _REENCODE)
    return kept, decoded, failure, size


LOSSLESS = {"codec": "libx264rgb", "options": {"qp": "0", "preset": "veryfast"}, "pix_fmt": "rgb24", "suffix": ".mkv"}


def write_lossless(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> None:
    """(T, H, W, 3) uint8 RGB frames -> a video file that decodes back to exactly these pixels:
    H.264 in RGB (libx264rgb) at qp 0, no chroma subsampling. Subsampled or lossy codecs (yuv420p,
    any crf > 0) blur one-pixel detail, such as the synthetic task's glyph textures."""
    if LOSSLESS["codec"] not in av.codecs_available:
        raise AdaFocusError(
            f"this PyAV's FFmpeg lacks {LOSSLESS['codec']}, needed for lossless RGB video files",
            "install a PyAV wheel with libx264 (the PyPI wheels have it)",
        )
    frames = np.asarray(frames, dtype=np.uint8)
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(LOSSLESS["codec"], rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], LOSSLESS["pix_fmt"]
        stream.options = dict(LOSSLESS["options"])
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        container.mux(stream.encode())
