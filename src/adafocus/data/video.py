"""Video files -> the (T, 3, S, S) float32 tensor an AdaFocusV3 model takes.

Sampling is TSN's: the video is cut into T equal segments and the middle frame of each is kept,
as the official AdaFocus training code does, so a model sees real videos the way it was trained.
Pixels follow the official test-time recipe scaled to the preset's frame size S: shorter side to
round(S * 256 / 224) (bilinear, antialiased like the PIL resize torchvision applies), centre crop
S×S, /255, ImageNet mean/std.

Decoding looks only at the frames it needs. One demux pass (no decoding: 1-5 % of a sequential decode)
lists the stream's packets: their timestamps (pts) in decode order, which are keyframes, how many
there are. Sorting the timestamps gives every frame's presentation-order index, so the sampled
indices become timestamps. Then, for each sampled frame the decoder cannot reach by decoding on
from where it is, it seeks to the keyframe at or before it, and decodes forward with the frames that
nothing references and nobody asked for (x264's B-frames: half of a typical file) skipped
(`skip_frame = NONREF`, set packet by packet). Where the next wanted frame lies past a keyframe still
ahead, the decoder is drained right after the last wanted packet instead of being fed the further
packets its B-frame reordering and frame threads would wait for, whose frames would be decoded and
then thrown away by the seek (median 1.05x, 0.95-1.18x, paired A/B on x264 files). Each kept
frame's RGB conversion and resize run on a helper thread while decoding goes on (`_Crops`).
Frames are identified by their pts, never by counting.

The truth is a full decode in presentation order (every frame the decoder outputs), sampled over
the number of frames that decode; seeking is used only where it provably gives that (exact or
nothing): an mp4/mov/mkv/webm file whose packets all carry distinct timestamps, whose header (when
it has a frame count) agrees with its packets, that starts on a keyframe, and, while decoding, gives
every wanted frame, in increasing pts, with no frame damaged. Anything else takes the sequential
pass instead, for the whole file: decode from the first frame, keep the sampled ones, stop after the
last (or, where the header and the packets disagree, or the stream does not start on a keyframe
shown first, run to the end and sample over what decoded: FFmpeg outputs nothing for the packets
before the first keyframe of a stream cut mid-GOP).

Damage makes a file decode on one thread. FFmpeg conceals a damaged frame, but with frame threads
it reports the frame's rows as done before it conceals them, so whatever references that frame sees
all, part or none of the concealment depending on timing (a B-frame shown before the damaged frame
differed by up to 161 levels from one full decode to the next), and whether the damaged frame comes
out flagged as corrupt varies too. On one thread both are reproducible, so that decode is the truth
for a damaged file. Decoding on several threads is therefore told to fail at damage instead of
concealing it (`err_detect=explode`, `_decode_on`): the error comes out in decode order, before any
frame decoded after the damaged one, and the pass runs again on one thread. The seeking pass fails
that way at an open GOP too (after a seek, its frames reference frames the decoder has not seen,
which FFmpeg stands in for): a file whose packets show an open GOP is sought on one thread from the
start. Both passes also check that no frame whose packet they sent comes out flagged (the decoder
is drained before a seek and at the end: a damaged frame shown after the last frame kept comes out
after it).
`VideoClip.decoded_by` says which path ran, and `fallback` why the sequential one.

Frames are turned as players show them: a phone stores them as its sensor reads them (sideways,
for a portrait video) with a display matrix saying how to turn them, which FFmpeg's command line
applies by default ("autorotate"); both passes apply its quarter turns and mirrors to each kept frame
before the resize and crop (`_orientation`), and refuse any other angle.

Memory is bounded by T frames whatever the video's length: only sampled frames are converted, each
already cropped to S×S.

A clip shorter than T frames is sampled with repeats (`tsn_indices`), like TSN at test time; only
a file without a single decodable frame is an error.

`truncated` means the data is damaged: the decoder stopped on an error, or the file ends inside a
packet. A header that claims more frames than its packets decode to (an H.264 AVI made by stream
copy claims twice its frames) is not damage: the frames that decode are sampled, and
`claimed_frames` keeps the header's number.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import av
import numpy as np
import torch
import torch.nn.functional as F

from adafocus.errors import AdaFocusError
from adafocus.machine import usable_cores
from adafocus.model.preprocess import MEAN, STD

if TYPE_CHECKING:
    from adafocus.model.presets import Preset

_REENCODE = "re-encode it, e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`, or use another copy"


@dataclass(frozen=True)
class VideoClip:
    """A preprocessed clip together with where its frames came from, for drawing and diagnostics.

    `indices` are 0-based positions in presentation order among the `source_frames` frames that
    decode, which were sampled over. `claimed_frames` is what the container's header said (or its
    packet count where it says nothing). `decoded_frames` counts every frame the decoder output in
    the pass that was kept (a seeking pass skips most). `decoded_by` is "seek" or "sequential";
    `fallback` says why a file took the sequential pass (None when it was seeking).
    """

    path: str
    frames: torch.Tensor  # (T, 3, S, S) float32, the model input
    pixels: torch.Tensor  # (T, 3, S, S) uint8, the same frames before normalisation
    indices: list[int]
    source_frames: int
    claimed_frames: int
    counted_by: str  # "container" (stream.frames) or "packets" (demux pass)
    source_size: tuple[int, int]  # (width, height) of the decoded frames as shown (turned by the display matrix)
    decoded_frames: int
    truncated: bool
    decoded_by: str
    fallback: str | None

    @property
    def decoding(self) -> str:
        """How the frames were found, in one string: "seek", or "sequential: <why>"."""
        return self.decoded_by if self.fallback is None else f"{self.decoded_by}: {self.fallback}"


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


# A frame's resize is too small for torch's thread team: with 2 threads on 2 cores it took 4.6x as
# long as with one (15.6 vs 3.4 ms for a 720p frame, same pixels), and while a frame-threaded decoder
# is running the team waits on it, doubling a whole decode (744 vs 407 ms for 300 frames of 720p).
# torch.set_num_threads is per calling thread under OpenMP, so it is set and restored around the
# resize only. None leaves torch's setting alone (benchmarks/decode.py's "before" method).
RESIZE_THREADS: int | None = 1


@contextlib.contextmanager
def _torch_threads(count: int | None):
    previous = torch.get_num_threads()
    if count is not None and count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def resize_crop(rgb: np.ndarray, frame_size: int, resize_shorter_side: int | None | str = IMAGENET) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, S, S) uint8, resized and centre-cropped, rounded back to 8 bits as
    a resized image file would be (and as PIL's resize, which torchvision's transforms run, does):
    frames stay a quarter of float32's size until the model takes them (`to_model_input`), which is
    what the Ray engine ships between machines, and both engines see the same pixels.

    Sizes follow torchvision's Resize(int)/CenterCrop, which the official transforms use: the longer
    side is truncated, the crop offset rounded. `resize_shorter_side` None (the "as-is" preprocessing)
    crops the frame as it is, with no resampling at all, unless it is smaller than the crop.
    """
    with _torch_threads(RESIZE_THREADS):
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


# (transpose, reverse the rows, reverse the columns), in that order: how a stored picture becomes the
# one shown. None: shown as stored, nothing to do (no copy).
Orientation = tuple[bool, bool, bool] | None


def _orientation(frame: av.VideoFrame, name: str) -> Orientation:
    """How to turn the frames of `name` upright, from its display matrix, read from `frame`: the first
    frame each pass decodes (once per file and pass, in this one place), because PyAV exposes the matrix
    only on decoded frames (FFmpeg copies the stream's to each), not on the stream.

    The raw matrix, not `frame.rotation`: that is only the matrix's angle (counter-clockwise, as
    av_display_rotation_get gives it, cut to an integer), which reads a mirrored picture as a half
    turn (-180) and one mirrored upside down as no turn at all. A matrix [a b .; c d .; . . .] in
    16.16 fixed point shows the stored pixel at column p, row q at column a·p + c·q, row b·p + d·q
    (plus a shift): a quarter turn, a half turn, a mirror or a mix of these has two zeros, on one
    diagonal, and only the signs of the others matter (the scale is ignored, as FFmpeg's autorotate
    ignores it). Any other angle is refused: FFmpeg's command line would resample the picture by it."""
    try:
        data = frame.side_data["DISPLAYMATRIX"]
    except KeyError:
        return None
    a, b, _, c, d = np.frombuffer(bytes(data), dtype=np.int32, count=5).tolist()  # native byte order, as FFmpeg's
    if b == c == 0 and a and d:
        return None if a > 0 and d > 0 else (False, d < 0, a < 0)
    if a == d == 0 and b and c:  # shown column from the stored row, shown row from the stored column
        return (True, b < 0, c < 0)
    scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
    if scale_x and scale_y:
        degrees = -math.degrees(math.atan2(b / scale_y, a / scale_x))  # av_display_rotation_get's angle
        mirrored = " and mirrors it" if a * d < b * c else ""
        turn = f"turns the picture by {round(degrees, 2):g}° counter-clockwise{mirrored}"
    else:
        turn = "shrinks the picture to a line"
    raise AdaFocusError(
        f"{name}: its display matrix {turn}, and only quarter turns and mirrors are applied",
        "re-encode it upright: `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4` turns it as it re-encodes",
    )


def _upright(rgb: np.ndarray, orientation: Orientation) -> np.ndarray:
    """(H, W, 3) stored pixels -> the picture as shown (np.rot90 by the matrix's angle, for a pure turn)."""
    if orientation is None:
        return rgb
    transpose, reverse_rows, reverse_columns = orientation
    if transpose:
        rgb = rgb.transpose(1, 0, 2)
    if reverse_rows:
        rgb = rgb[::-1]
    if reverse_columns:
        rgb = rgb[:, ::-1]
    return np.ascontiguousarray(rgb)  # torch.from_numpy takes no negative strides


class _Crops:
    """The seek path's RGB conversions and resizes on one helper thread while it decodes on: a
    keyframe decodes on one thread and leaves the other core idle, and a 720p frame's resize takes
    ~4 ms, its conversion ~1.4 ms. Paired A/B on 2 cores (x264 files, T = 8 and 16, 7 rounds): the
    resize moved here, median 1.04x over inline (10 files, 0.97-1.23x); the conversion moved too,
    1.08x over that (8 files, 0.99-1.22x), most at GOP 15. The same pixels: the same functions on
    the same decoded frame, which the decoder no longer writes to (its buffers are reference-counted)
    and which only the helper thread converts (PyAV keeps one converter per frame; two threads
    converting one frame crash). At most two frames wait, so memory stays bounded by T cropped
    frames plus two whole ones. The sequential pass converts and resizes inline:
    benchmarks/decode.py's baseline runs it."""

    def __init__(self, frame_size: int, resize_shorter_side):
        self.frame_size, self.resize_shorter_side = frame_size, resize_shorter_side
        self.kept: dict[int, Future] = {}
        self._waiting: deque[Future] = deque()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adafocus-crop")

    def add(self, key: int, frame: av.VideoFrame, orientation: Orientation = None) -> None:
        """Hand `frame` over, to be turned by `orientation` first: the caller must not touch it again."""
        while len(self._waiting) >= 2:
            self._waiting.popleft().result()
        future = self._pool.submit(self._crop, frame, orientation)
        self.kept[key] = future
        self._waiting.append(future)

    def _crop(self, frame: av.VideoFrame, orientation: Orientation) -> torch.Tensor:
        rgb = _upright(frame.to_ndarray(format="rgb24"), orientation)
        return resize_crop(rgb, self.frame_size, self.resize_shorter_side)

    def __contains__(self, key: int) -> bool:
        return key in self.kept

    def results(self) -> dict[int, torch.Tensor]:
        return {key: future.result() for key, future in self.kept.items()}

    def __enter__(self) -> _Crops:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


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
    method: str = "auto",
    threads: int = 0,
) -> VideoClip:
    """Like `load_video`, keeping which source frames were sampled, for drawing and checks.
    `sample(frames, count)` picks the frames (default: TSN's test-time middle frames). `method`
    "auto" seeks where that is exact (see the module's docstring), "sequential" always decodes from
    the first frame (the reference the seeking path is checked against). `threads`: FFmpeg's
    decoder threads (0: FFmpeg's choice, one per core and one more; see `decoder_threads`)."""
    with _torch_threads(RESIZE_THREADS):  # every torch op here is per frame: small (see RESIZE_THREADS)
        return _load_clip(os.fspath(path), num_frames, frame_size, resize_shorter_side, sample, method, threads)


def _load_clip(
    name: str, num_frames: int, frame_size: int, resize_shorter_side, sample, method: str, threads: int
) -> VideoClip:
    if num_frames < 1 or frame_size < 1:
        raise AdaFocusError(
            f"{name}: asked for {num_frames} frames of {frame_size}² pixels",
            "num_frames and frame_size must be positive",
        )
    if method not in ("auto", "sequential"):
        raise AdaFocusError(f"unknown decoding method {method!r}", 'use "auto" or "sequential"')
    _check_file(name)

    container, stream = _open(name)
    with container:
        packets = _index(container, stream)
        claimed, counted_by = (
            (packets.container_frames, "container") if packets.container_frames > 0 else (len(packets.pts), "packets")
        )
        if claimed < 1:
            raise AdaFocusError(f"{name}: video has no frames", "give a file that contains at least one video frame")
        clip = dict(path=name, claimed_frames=claimed, counted_by=counted_by)

        fallback = packets.not_seekable if method == "auto" else "sequential asked for"
        if fallback is None:
            order = sorted(packets.pts)  # presentation order: frame i is the i-th smallest pts
            indices = sample(len(order), num_frames)
            wanted = sorted({order[i] for i in indices})
            # Seeking into an open GOP gives frames whose references the decoder has not seen, which
            # fails on several threads (_OnOneThread): one thread from the start saves the attempt.
            seek_threads = 1 if packets.open_gop else threads
            try:
                try:
                    kept, decoded, size = _decode_by_seeking(
                        container, stream, packets, wanted, frame_size, resize_shorter_side, seek_threads
                    )
                except _OnOneThread:
                    again, stream_again = _open(name)  # the thread count is fixed once the decoder opened
                    with again:
                        kept, decoded, size = _decode_by_seeking(
                            again, stream_again, packets, wanted, frame_size, resize_shorter_side, 1
                        )
            except _NotExact as why:
                fallback = str(why)
                if isinstance(why, _Damaged):
                    threads = 1
            else:
                pixels = torch.stack([kept[order[i]] for i in indices])
                return VideoClip(
                    **clip,
                    frames=to_model_input(pixels),
                    pixels=pixels,
                    indices=indices,
                    source_frames=len(order),
                    source_size=size,
                    decoded_frames=decoded,
                    truncated=False,
                    decoded_by="seek",
                    fallback=None,
                )

    # The sequential pass. Where header and packets agree, the data is whole and the stream starts
    # on a keyframe shown first, every packet gives one frame: the count is known and the pass stops
    # after the last sampled frame. Otherwise it runs to the end, since the number of frames that
    # decode is what is sampled over. Checking the start up front is simpler than checking frames
    # against packets during the pass: a pass that stops early could not see a count that is off.
    count_known = packets.damaged is None and packets.container_frames in (0, len(packets.pts)) and packets.starts_clean
    guess = len(packets.pts) or claimed
    indices = sample(guess, num_frames)
    kept, decoded, failure, size, threads = _decode_indices(
        name, indices, frame_size, resize_shorter_side, to_end=not count_known, threads=threads
    )
    truncated = failure is not None or packets.damaged is not None
    ran_out = len(kept) < len(set(indices))
    if ran_out or decoded != guess and not count_known:
        # Sample again over the frames that did decode (ran_out: the decoder ran dry, or failed,
        # before the last wanted frame, so `decoded` is all there is).
        if decoded < 1:
            reason = f" ({failure or packets.damaged})" if failure or packets.damaged else ""
            raise AdaFocusError(
                f"{name}: truncated or damaged: the container claims {claimed} frames but none decodes{reason}",
                _REENCODE,
            )
        source = decoded
        indices = sample(decoded, num_frames)
        kept, _, _, size, _ = _decode_indices(name, indices, frame_size, resize_shorter_side, threads=threads)
        if len(kept) < len(set(indices)):  # the decoder gave a different answer the second time round
            raise AdaFocusError(f"{name}: damaged: decoding stops at a different frame on each pass", _REENCODE)
    else:
        source = guess

    pixels = torch.stack([kept[i] for i in indices])
    return VideoClip(
        **clip,
        frames=to_model_input(pixels),
        pixels=pixels,
        indices=indices,
        source_frames=source,
        source_size=size,
        decoded_frames=decoded,
        truncated=truncated,
        decoded_by="sequential",
        fallback=fallback,
    )


def load_clip_for(
    path: str | os.PathLike, preset: Preset, sample=tsn_indices, method: str = "auto", threads: int = 0
) -> VideoClip:
    """A clip for `preset`: its frame count and size, and the preprocessing it was trained with."""
    return load_clip(path, preset.num_frames, preset.frame_size, preset.resize_shorter_side, sample, method, threads)


def decoder_threads(decoders: int) -> int:
    """FFmpeg threads for each of `decoders` files decoded at once: this process's cores shared
    between them, at least one each. FFmpeg's own choice (cores + 1 frame threads per file) puts
    2 x 3 threads on 2 cores under adafocus-predict's 2 decoder workers: 1.15x fewer videos/s than
    one thread each (12.89 vs 14.87, benchmarks/decode.py's files)."""
    return max(1, usable_cores() // max(decoders, 1))


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


# Containers whose packets carry each frame's presentation timestamp and an index to seek by. AVI
# has neither (its timestamps are counted packets, and B-frames make them lie); raw streams have no
# index. FFmpeg names its demuxers by the formats they read: "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm".
SEEKABLE_FORMATS = {"mov", "mp4", "matroska", "webm"}


@dataclass(frozen=True)
class PacketIndex:
    """What one demux pass over a file's video stream tells, without decoding anything."""

    pts: list[int]  # each packet's presentation timestamp, in decode order (discarded packets left out)
    keyframes: list[int]  # decode-order positions of the keyframe packets
    container_frames: int  # the header's frame count; 0 where the container does not say
    damaged: str | None  # the demux stopped on an error, or the file ends inside a packet
    # The first packet is a keyframe and no frame is shown before it. Otherwise (a stream copy cut
    # mid-GOP, a live capture) FFmpeg outputs nothing for the packets before the first keyframe, or
    # guesses the leading frames: the number of frames that decode is not the number of packets.
    starts_clean: bool
    not_seekable: str | None  # why frames cannot be found by seeking (None: they can)

    @property
    def open_gop(self) -> bool:
        """A keyframe after the first is followed, in decode order, by a frame shown before it: an
        open GOP's leading frame, which references the GOP before."""
        ends = self.keyframes[2:] + [len(self.pts)]
        gops = zip(self.keyframes[1:], ends)
        return any(any(p < self.pts[key] for p in self.pts[key + 1 : end]) for key, end in gops)


def index_packets(name: str) -> PacketIndex:
    """The demux pass: packet timestamps and keyframes of the first video stream."""
    container, stream = _open(name)
    with container:
        return _index(container, stream)


def _index(container, stream) -> PacketIndex:
    pts: list[int | None] = []
    keyframes: list[int] = []
    damaged = None
    format_name = container.format.name
    try:
        for packet in container.demux(stream):
            if not packet.size:  # demux ends with an empty flush packet
                continue
            if packet.is_corrupt:
                damaged = "a packet the demuxer flags corrupt (the file ends inside it, or its data is damaged)"
            if packet.is_discard:  # an edit list drops it: the decoder outputs nothing for it
                continue
            if packet.is_keyframe:
                keyframes.append(len(pts))
            pts.append(packet.pts)
    except av.error.FFmpegError as err:
        damaged = f"demuxing stopped on an error: {err}"
    container_frames = max(stream.frames, 0)
    timed = bool(pts) and all(p is not None for p in pts)
    starts_clean = timed and bool(keyframes) and keyframes[0] == 0 and min(pts) >= pts[0]  # type: ignore[type-var]

    def reason() -> str | None:
        if not set(format_name.split(",")) & SEEKABLE_FORMATS:
            return f"a {format_name} container: seeking is trusted only in mp4/mov/mkv/webm"
        if damaged:
            return damaged
        if not pts:
            return "no packets"
        if any(p is None for p in pts):
            return "packets without timestamps"
        if len(set(pts)) != len(pts):
            return "packets sharing a timestamp"
        if container_frames and container_frames != len(pts):
            return f"the header claims {container_frames} frames, the packets hold {len(pts)}"
        if not starts_clean:
            return "the stream does not start on a keyframe that is shown first"
        return None

    return PacketIndex(
        pts=pts,  # type: ignore[arg-type]  # a None among them makes the file not seekable
        keyframes=keyframes,
        container_frames=container_frames,
        damaged=damaged,
        starts_clean=starts_clean,
        not_seekable=reason(),
    )


class _NotExact(Exception):
    """The seeking pass cannot vouch that its frames are those a full decode gives."""


class _Damaged(_NotExact):
    """The seeking pass met damage (a decoding error, a frame flagged as corrupt): the sequential
    pass decodes on one thread (see the module's docstring)."""


class _OnOneThread(_NotExact):
    """Decoding on several threads failed (see _decode_on): at damage, or at what an open GOP's
    frames reference before the keyframe sought to, which concealment stands in for unseen (the
    full decode has it): the seeking pass again, on one thread."""


def _decode_on(stream, threads: int) -> None:
    """Decode `stream` on `threads` FFmpeg threads (0: FFmpeg's choice, one per core and one more),
    frame and slice threads; with more than one, failing at damage rather than concealing it (see
    the module's docstring). Before the first decode: the options apply when the decoder opens."""
    stream.thread_type = "AUTO"  # frame + slice threads: several times faster on long videos
    stream.thread_count = threads
    if threads != 1:
        stream.codec_context.options = {**stream.codec_context.options, "err_detect": "explode"}


# How many keyframes further back a seek may go when the decoder lands past the frame it was sent
# for (a demuxer that seeks by decode timestamps, an open GOP's leading frames).
_RETRIES = 2


def _decode_by_seeking(
    container, stream, packets: PacketIndex, wanted: list[int], frame_size: int, resize_shorter_side, threads: int
) -> tuple[dict[int, torch.Tensor], int, tuple[int, int]]:
    """The frames with timestamps `wanted` (sorted), cropped: (pts -> frame, frames decoded, (w, h)),
    from the container the demux pass read (not opened twice: opening probes the stream, ~5 % of a
    short file's decode). Raises _NotExact wherever the result could differ from a full decode's."""
    with _Crops(frame_size, resize_shorter_side) as kept:
        decoded, size = _seek_and_decode(container, stream, packets, wanted, kept, threads)
        return kept.results(), decoded, size


def _seek_and_decode(container, stream, packets: PacketIndex, wanted: list[int], kept: _Crops, threads: int):
    """_decode_by_seeking's loop: the wanted frames into `kept`; returns (frames decoded, (w, h))."""
    position = {pts: i for i, pts in enumerate(packets.pts)}  # pts -> decode-order position

    def keyframe_for(pts: int, back: int) -> int:
        """Decode position of the `back`-th keyframe before the last one at or before `pts` in both
        orders: a frame shown before its GOP's keyframe (an open GOP's leading B-frame) needs the
        GOP before."""
        at = bisect.bisect_right(packets.keyframes, position[pts]) - 1
        while at > 0 and packets.pts[packets.keyframes[at]] > pts:
            at -= 1
        if at - back < 0:
            raise _NotExact(f"the frame at pts {pts} did not decode after seeking to the first keyframe")
        return packets.keyframes[at - back]

    wanted_set = set(wanted)
    decoded, todo, back, seeks = 0, 0, 0, 0
    next_packet = -1  # the demuxer's position: -1 at the end of the demux pass or after a drain (seek first)
    size = (0, 0)
    _decode_on(stream, threads)  # skip_frame travels with each packet to its frame thread
    codec = stream.codec_context
    last_shown: int | None = None
    missed = False
    orientation: Orientation = None

    pending = False  # packets sent since the decoder was last drained (or flushed by a seek)

    def failed(err: av.error.FFmpegError) -> _NotExact:
        if threads != 1:
            return _OnOneThread(f"decoding on {threads or 'several'} threads failed ({err})")
        return _Damaged(f"damaged: decoding failed ({err})")

    def drain() -> None:
        """Take every frame the decoder still holds: where no wanted frame lies ahead, before a seek
        flushes it, and at the end. What comes out is checked (a frame kept may reference a damaged
        one that has not come out yet: a B-frame shown before it) and kept if wanted (a decoder's
        output depends only on the packets before, so a frame held back by reordering is the same
        drained as decoded on). A flush instead would wait for the frame threads all the same."""
        nonlocal pending, next_packet
        if not pending:
            return
        try:
            for frame in codec.decode(None):
                take(frame)
        except av.error.FFmpegError as err:
            raise failed(err) from err
        pending, next_packet = False, -1  # a drained decoder takes packets again only after a seek

    def take(frame) -> None:
        """One frame out of the decoder: checked, kept if wanted; `todo` moves past what is kept."""
        nonlocal decoded, last_shown, todo, back, missed, size, orientation
        if not decoded:
            orientation = _orientation(frame, container.name)
        decoded += 1
        pts = frame.pts
        if pts not in position or (last_shown is not None and pts <= last_shown):
            raise _NotExact(f"a frame out of timestamp order (pts {pts})")
        if frame.is_corrupt:  # concealment may depend on the frames skipped, and on timing
            raise _Damaged(f"damaged: the frame at pts {pts} came out concealed")
        last_shown = pts
        if pts in wanted_set and pts not in kept:
            size = (frame.height, frame.width) if orientation and orientation[0] else (frame.width, frame.height)
            kept.add(pts, frame, orientation)  # turned, converted to RGB and resized on the helper thread
        while todo < len(wanted) and wanted[todo] in kept:
            todo, back = todo + 1, 0
        if todo < len(wanted) and pts > wanted[todo]:
            missed = True  # the decoder went past a wanted frame without showing it

    while todo < len(wanted):
        key = keyframe_for(wanted[todo], back)
        sought = next_packet < 0 or key > next_packet or back > 0
        if sought:
            drain()
            seeks += 1
            if seeks > (_RETRIES + 1) * len(wanted):  # a demuxer that never lands where asked
                raise _NotExact("seeking does not reach the wanted frames")
            try:
                container.seek(packets.pts[key], stream=stream, backward=True)  # also flushes the decoder
            except av.error.FFmpegError as err:
                raise _NotExact(f"seeking failed: {err}") from err
        first, last_shown, missed, run_start = sought, None, False, todo
        fed: set[int] = set()  # wanted frames whose packets this run has sent to the decoder
        try:
            for packet in container.demux(stream):
                if packet.size:
                    if packet.pts not in position:
                        raise _NotExact(f"a packet (pts {packet.pts}) the demux pass did not list")
                    here = position[packet.pts]
                    if first and here > key:  # landed past the keyframe: one further back
                        missed = True
                        break
                    first, next_packet, pending = False, here + 1, True
                    is_wanted = packet.pts in wanted_set
                    codec.skip_frame = "DEFAULT" if is_wanted else "NONREF"
                    if is_wanted:
                        fed.add(packet.pts)
                for frame in packet.decode():
                    take(frame)
                if not packet.size:
                    pending = False  # the demuxer's last, empty packet drains the decoder
                if missed or todo == len(wanted):
                    break
                if packet.size and packet.pts in fed:
                    # The decoder holds a frame back until later packets arrive (B-frame reordering,
                    # plus one packet per extra frame thread). If no other wanted frame is reachable
                    # from here, feeding more would decode reference frames nobody wants: drain it
                    # instead and seek on from an empty decoder.
                    ahead = next((pts for pts in wanted[todo:] if pts not in fed), None)
                    if ahead is None or keyframe_for(ahead, 0) > next_packet:
                        drain()
                        if todo < len(wanted) and wanted[todo] in fed:
                            missed = True  # sent, drained, and never shown
                        break
                # The next wanted frame is past a keyframe still ahead: seek there. Not before this
                # run has found a frame: a seek may land before its keyframe, and goes on from there.
                if todo > run_start and keyframe_for(wanted[todo], 0) > next_packet:
                    break
            else:
                if todo < len(wanted):
                    missed = True  # the end of the file, a wanted frame never shown
            if todo == len(wanted):
                drain()
        except av.error.FFmpegError as err:
            raise failed(err) from err
        if missed:
            if back == _RETRIES:
                raise _NotExact(f"the frame at pts {wanted[todo]} was not found by seeking")
            back += 1
    codec.skip_frame = "DEFAULT"
    return decoded, size


def _count_frames(name: str) -> tuple[int, str]:
    """The frame count the container states, or its packet count (kept for benchmarks: this was
    the whole of the count before the demux pass listed timestamps)."""
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
    name: str, indices: list[int], frame_size: int, resize_shorter_side, to_end: bool = False, threads: int = 0
) -> tuple[dict[int, torch.Tensor], int, str | None, tuple[int, int], int]:
    """The sequential pass keeping `indices`: (kept frames, frames decoded, decode error, (w, h),
    decoder threads). It stops right after the last index, unless `to_end` (then `decoded` counts
    the whole file). On several threads, damage (an error, a frame flagged as corrupt) starts it
    again on one (see the module's docstring), which the last value says."""
    wanted = set(indices)
    last = indices[-1]
    kept: dict[int, torch.Tensor] = {}
    decoded = 0
    failure = None
    damaged = False
    orientation: Orientation = None
    container, stream = _open(name)
    size = (stream.codec_context.width, stream.codec_context.height)
    with container:
        _decode_on(stream, threads)
        codec = stream.codec_context
        try:
            for packet in container.demux(stream):
                frames = packet.decode()
                for frame in frames:
                    damaged |= frame.is_corrupt
                    if not decoded:
                        orientation = _orientation(frame, name)
                    if decoded in wanted:
                        rgb = _upright(frame.to_ndarray(format="rgb24"), orientation)
                        kept[decoded] = resize_crop(rgb, frame_size, resize_shorter_side)
                        size = (rgb.shape[1], rgb.shape[0])
                    decoded += 1
                    if decoded > last and not to_end:
                        break
                if decoded > last and not to_end:
                    # What the decoder still holds: damage shown after the last frame kept.
                    damaged |= any(frame.is_corrupt for frame in frames)
                    if packet.size:
                        damaged |= any(frame.is_corrupt for frame in codec.decode(None))
                    break
        except av.error.FFmpegError as err:
            failure = str(err)  # a damaged or cut-off stream; the caller decides what that means
    if (damaged or failure) and threads != 1:
        return _decode_indices(name, indices, frame_size, resize_shorter_side, to_end, threads=1)
    if not decoded and failure:
        raise AdaFocusError(f"{name}: no frame could be decoded ({failure})", _REENCODE)
    return kept, decoded, failure, size, threads


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
