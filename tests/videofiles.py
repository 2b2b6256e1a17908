"""Small real video files for the decoding tests, encoded (or remuxed, cut, damaged) here with PyAV.

Every encoded file shows the same kind of content: a colour gradient that drifts a few pixels per
frame and a box gliding along a smooth path. Motion that predicts well is what makes x264 (and the
MPEG-4 encoder when asked) use B-frames, so the files have decode order != presentation order, as
real camera or web videos do. `probe` says what a file really holds: the header's frame count,
packets, keyframes, whether packets arrive out of presentation order (B-frames), and the frames a
full decode gives.

The files are not byte-for-byte reproducible: libx264 through PyAV gives slightly different bytes
from one encode to the next (same structure: frame and keyframe counts, B-frames). So nothing here
hard-codes byte offsets: damage is aimed at packets found by demuxing, and tests take frame
positions from the files themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

FPS = 30


def moving_frames(count: int, width: int, height: int) -> Iterator[np.ndarray]:
    """`count` (height, width, 3) uint8 RGB frames of smooth motion; frame k differs from k-1 a little."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    box_w, box_h = max(width // 6, 8), max(height // 4, 8)
    for k in range(count):
        rgb = np.empty((height, width, 3), np.float32)
        rgb[..., 0] = (x * (300 / width) + 3 * k) % 256
        rgb[..., 1] = (y * (400 / height) + 2 * k) % 256
        rgb[..., 2] = 128 + 60 * np.sin((x + y) / 17 + k / 9)
        left = int((width - box_w) * (0.5 + 0.5 * np.sin(k / 13)))
        top = int((height - box_h) * (0.5 + 0.5 * np.cos(k / 11)))
        rgb[top : top + box_h, left : left + box_w] = (255 - (2 * k) % 200, 40, 200)
        yield rgb.astype(np.uint8)


def _video_frame(rgb: np.ndarray) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")


def _encode(
    path: Path,
    codec: str,
    count: int,
    size: tuple[int, int],
    *,
    fmt: str | None = None,
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    gop: int | None = None,
    max_b_frames: int | None = None,
    pts_ms: Sequence[int] | None = None,
) -> Path:
    """Encode `count` moving frames. With `pts_ms`, frame k is stamped pts_ms[k] in a 1/1000 time base
    (a variable frame rate); otherwise frames are 1/FPS apart."""
    width, height = size
    with av.open(os.fspath(path), "w", format=fmt, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = gop
        if max_b_frames is not None:
            stream.codec_context.max_b_frames = max_b_frames
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        stream.options = dict(options or {})
        for k, rgb in enumerate(moving_frames(count, width, height)):
            frame = _video_frame(rgb)
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[k], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return Path(path)


def x264(
    path: Path,
    count: int = 120,
    gop: int = 60,
    size: tuple[int, int] = (192, 108),
    *,
    fmt: str | None = None,
    open_gop: bool = False,
    faststart: bool = False,
) -> Path:
    """H.264 with x264's default B-frames (3, with b-pyramid), a keyframe every `gop` frames exactly
    (no scene-cut keyframes); `open_gop`: the keyframes after the first are recovery-point I-frames
    whose leading B-frames reference the previous GOP. `faststart`: an MP4's index (moov) first."""
    params = f"keyint={gop}:min-keyint={gop}:scenecut=0" + (":open-gop=1" if open_gop else "")
    return _encode(
        path,
        "libx264",
        count,
        size,
        fmt=fmt,
        options={"x264-params": params},
        container_options={"movflags": "faststart"} if faststart else None,
    )


def irregular_pts_ms(count: int, seed: int = 3) -> list[int]:
    """Strictly increasing presentation times in milliseconds with gaps from 12 to 95 ms (a variable
    frame rate, as phone cameras write), starting at 0."""
    gaps = np.random.default_rng(seed).integers(12, 96, size=count - 1)
    return [0, *np.cumsum(gaps).tolist()]


def x264_vfr(path: Path, count: int = 100, size: tuple[int, int] = (192, 108), *, fmt: str | None = None) -> Path:
    """H.264 with B-frames (keyframe every 30 frames) at a variable frame rate: explicit, irregular
    frame.pts in a 1/1000 time base."""
    return _encode(
        path,
        "libx264",
        count,
        size,
        fmt=fmt,
        options={"x264-params": "keyint=30:min-keyint=30:scenecut=0"},
        pts_ms=irregular_pts_ms(count),
    )


def vp9(path: Path, count: int = 90, size: tuple[int, int] = (160, 96), gop: int = 45) -> Path:
    """VP9 in WebM (libvpx-vp9), with alt-ref (hidden) frames allowed; fast settings."""
    options = {"deadline": "good", "cpu-used": "8", "lag-in-frames": "16", "auto-alt-ref": "1", "crf": "32", "b": "0"}
    return _encode(path, "libvpx-vp9", count, size, fmt="webm", options=options, gop=gop)


def mjpeg_avi(path: Path, count: int = 60, size: tuple[int, int] = (160, 96)) -> Path:
    """Motion JPEG in AVI: every frame a keyframe."""
    return _encode(path, "mjpeg", count, size, fmt="avi", pix_fmt="yuvj420p")


def mpeg4_avi(path: Path, count: int = 90, size: tuple[int, int] = (160, 96), gop: int = 30) -> Path:
    """MPEG-4 part 2 in AVI with up to 2 B-frames in a row (AVI stores no presentation times)."""
    return _encode(path, "mpeg4", count, size, fmt="avi", gop=gop, max_b_frames=2, options={"bf": "2"})


def remux(
    src: Path,
    dst: Path,
    *,
    fmt: str | None = None,
    options: dict[str, str] | None = None,
    time_base: Fraction | None = None,
    bitstream_filter: str | None = None,
) -> Path:
    """Stream copy of the first video stream into another container: the same packets, no re-encode.

    `time_base`: the output stream's (by default the muxer derives one from the source's).
    `bitstream_filter`: rewrite the packets on the way, e.g. "h264_mp4toannexb", which AVI needs for
    H.264 from an MP4 (its muxer refuses length-prefixed NAL units)."""
    with av.open(os.fspath(src)) as inp, av.open(os.fspath(dst), "w", format=fmt, options=options or {}) as out:
        source = inp.streams.video[0]
        stream = out.add_stream_from_template(source)
        if time_base is not None:
            stream.time_base = time_base
        bsf = av.bitstream.BitStreamFilterContext(bitstream_filter, source, stream) if bitstream_filter else None
        for packet in inp.demux(source):
            if packet.dts is None and not packet.size:  # demux's final empty flush packet
                continue
            for copied in bsf.filter(packet) if bsf else [packet]:
                copied.stream = stream
                out.mux(copied)
        for copied in bsf.filter(None) if bsf else []:
            copied.stream = stream
            out.mux(copied)
    return Path(dst)


def cut(src: Path, dst: Path, fraction: float) -> Path:
    """The first `fraction` of the file's bytes: a download that stopped."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def mp4_box(data: bytes, kind: bytes) -> tuple[int, int]:
    """(start, end) of the payload of the first top-level MP4 box of type `kind`."""
    pos = 0
    while pos + 8 <= len(data):
        size, box = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        header = 8
        if size == 1:
            size, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        elif size == 0:
            size = len(data) - pos
        if box == kind:
            return pos + header, pos + size
        pos += size
    raise ValueError(f"no {kind!r} box")


def damage_middle(src: Path, dst: Path, length: int = 600, seed: int = 5) -> Path:
    """A copy of an MP4 with `length` bytes in the middle of its media data (mdat) overwritten with
    random bytes; the size, the index and so every packet's boundaries stay as they were."""
    data = bytearray(Path(src).read_bytes())
    start, end = mp4_box(bytes(data), b"mdat")
    at = (start + end) // 2
    data[at : at + length] = np.random.default_rng(seed).integers(0, 256, size=length, dtype=np.uint8).tobytes()
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def damage_packet(src: Path, dst: Path, index: int, length: int = 16, seed: int = 5) -> Path:
    """A copy with `length` bytes in the middle of the `index`-th video packet (decode order)
    overwritten with random bytes. Small damage inside one frame's slice data decodes without an
    error: the decoder conceals it (and flags that frame corrupt), and frames predicted from it
    inherit the damage."""
    with av.open(os.fspath(src)) as container:
        stream = container.streams.video[0]
        packets = [(p.pos, p.size) for p in container.demux(stream) if p.size]
    pos, size = packets[index]
    data = bytearray(Path(src).read_bytes())
    at = pos + size // 2
    data[at : at + length] = np.random.default_rng(seed).integers(0, 256, size=length, dtype=np.uint8).tobytes()
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def keyframe_packets(path: Path) -> list[int]:
    """Decode-order positions of the keyframe packets."""
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        return [i for i, p in enumerate(p for p in container.demux(stream) if p.size) if p.is_keyframe]


@dataclass(frozen=True)
class Probe:
    container: str  # the demuxer's name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str
    header_frames: int  # stream.frames: 0 where the container stores no count
    packets: int  # non-empty packets demuxed
    keyframes: int
    reordered: int  # packets whose pts is below the previous packet's: B-frames (or hidden frames)
    decoded: int  # frames a full decode gives before it ends or fails
    decode_error: str | None  # the error that ended the full decode, if one did
    b_frames: int  # decoded frames of picture type B
    corrupt: tuple[int, ...]  # indices of the decoded frames flagged corrupt (concealed damage)

    @property
    def has_b_frames(self) -> bool:
        return self.b_frames > 0 and self.reordered > 0


def probe(path: Path) -> Probe:
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        name, codec, header = container.format.name, stream.codec_context.name, stream.frames
        packets = keyframes = reordered = 0
        last = None
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                packets += 1
                keyframes += packet.is_keyframe
                if packet.pts is not None and last is not None and packet.pts < last:
                    reordered += 1
                last = packet.pts if packet.pts is not None else last
        except av.error.FFmpegError:
            pass
    decoded, b_frames, error, corrupt = 0, 0, None, []
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1  # with frame threads, whether a concealed frame is flagged varies
        try:
            for frame in container.decode(stream):
                if frame.is_corrupt:
                    corrupt.append(decoded)
                decoded += 1
                b_frames += frame.pict_type == av.video.frame.PictureType.B
        except av.error.FFmpegError as err:
            error = str(err)
    return Probe(name, codec, header, packets, keyframes, reordered, decoded, error, b_frames, tuple(corrupt))


VP9 = "libvpx-vp9"

# name -> what it is; `make_test_set` writes them all (VP9 only where this FFmpeg has libvpx-vp9).
TEST_SET = {
    "gop15.mp4": "H.264 (B-frames, b-pyramid), keyframe every 15 frames, 120 frames of 192x108",
    "gop60.mp4": "H.264 (B-frames), keyframe every 60 frames, 200 frames of 320x180",
    "gop250.mp4": "H.264 (B-frames), GOP 250 > 150 frames (one keyframe), 160x96",
    "opengop.mp4": "H.264 (B-frames), open GOP of 40: leading B-frames reference the previous GOP, 150 frames",
    "opengop.mkv": "the same encoding in Matroska (no frame count in the header)",
    "vfr.mp4": "H.264 (B-frames) at a variable frame rate (irregular pts, 1/1000 time base), 100 frames",
    "vfr.mkv": "the same in Matroska",
    "remux.mkv": "gop60.mp4's packets copied into Matroska",
    "vp9.webm": "VP9 (libvpx-vp9, alt-ref allowed) in WebM, keyframe every 45 frames, 90 frames of 160x96",
    "mjpeg.avi": "Motion JPEG in AVI, 60 frames",
    "mpeg4.avi": "MPEG-4 part 2 with B-frames (bf=2) in AVI, 90 frames",
    "h264.avi": "gop60.mp4's packets (Annex B) in AVI with a 1/30 time base: the header counts 200",
    "h264_overclaim.avi": "gop60.mp4's packets in AVI with the time base PyAV's muxer picks (1/600): "
    "empty index entries fill the gaps, the header claims 4000 frames, 200 decode",
    "one.mp4": "H.264, a single frame",
    "three.mp4": "H.264, three frames",
    "faststart.mp4": "H.264 (B-frames), GOP 30, 150 frames, index (moov) first",
    "cut.mp4": "faststart.mp4's first 60 % of bytes: the header claims 150 frames, fewer decode",
    "cut.mkv": "remux.mkv's first 60 % of bytes",
    "damaged.mp4": "gop60.mp4 with 600 bytes in the middle of its media data overwritten with noise: "
    "decoding stops with an error",
    "damaged-keyframe.mp4": "gop60.mp4 with 16 bytes of noise inside its second keyframe (an IDR frame): "
    "every frame decodes, that one concealed (from the frame before it, when decoding runs through)",
    "damaged-frame.mp4": "gop60.mp4 with 16 bytes of noise inside the 30th packet after its second keyframe",
    "nocues.mkv": "gop60.mp4's packets in Matroska written as a live stream: no Cues (no seek index)",
    "fragmented.mp4": "gop60.mp4's packets in a fragmented MP4 (empty moov, a moof per keyframe): "
    "no frame count in the header, no edit list",
}


def make_test_set(folder: Path) -> dict[str, Path]:
    """Write every file of TEST_SET into `folder` (about 3 s on 2 cores); name -> path."""
    folder = Path(folder)
    out: dict[str, Path] = {}

    def add(name: str, make) -> None:
        out[name] = make(folder / name)

    add("gop15.mp4", lambda p: x264(p, 120, 15, (192, 108)))
    add("gop60.mp4", lambda p: x264(p, 200, 60, (320, 180)))
    add("gop250.mp4", lambda p: x264(p, 150, 250, (160, 96)))
    add("opengop.mp4", lambda p: x264(p, 150, 40, open_gop=True))
    add("opengop.mkv", lambda p: x264(p, 150, 40, fmt="matroska", open_gop=True))
    add("vfr.mp4", lambda p: x264_vfr(p, 100))
    add("vfr.mkv", lambda p: x264_vfr(p, 100, fmt="matroska"))
    add("remux.mkv", lambda p: remux(out["gop60.mp4"], p, fmt="matroska"))
    if VP9 in av.codecs_available:
        add("vp9.webm", vp9)
    add("mjpeg.avi", mjpeg_avi)
    add("mpeg4.avi", mpeg4_avi)
    annexb = "h264_mp4toannexb"
    add(
        "h264.avi", lambda p: remux(out["gop60.mp4"], p, fmt="avi", time_base=Fraction(1, FPS), bitstream_filter=annexb)
    )
    add("h264_overclaim.avi", lambda p: remux(out["gop60.mp4"], p, fmt="avi", bitstream_filter=annexb))
    add("one.mp4", lambda p: x264(p, 1))
    add("three.mp4", lambda p: x264(p, 3))
    add("faststart.mp4", lambda p: x264(p, 150, 30, faststart=True))
    add("cut.mp4", lambda p: cut(out["faststart.mp4"], p, 0.6))
    add("cut.mkv", lambda p: cut(out["remux.mkv"], p, 0.6))
    add("damaged.mp4", lambda p: damage_middle(out["gop60.mp4"], p))
    second_key = keyframe_packets(out["gop60.mp4"])[1]
    add("damaged-keyframe.mp4", lambda p: damage_packet(out["gop60.mp4"], p, second_key))
    add("damaged-frame.mp4", lambda p: damage_packet(out["gop60.mp4"], p, second_key + 30))
    add("nocues.mkv", lambda p: remux(out["gop60.mp4"], p, fmt="matroska", options={"live": "1"}))
    fragments = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}
    add("fragmented.mp4", lambda p: remux(out["gop60.mp4"], p, fmt="mp4", options=fragments))
    return out


def avcc_nal_types(data: bytes, length_size: int = 4) -> list[int]:
    """NAL unit types in an H.264 packet from MP4 or Matroska (each unit prefixed by its length):
    5 is an IDR slice (a clean random access point), 1 a non-IDR slice, 6 SEI."""
    types, pos = [], 0
    while pos + length_size < len(data):
        size = int.from_bytes(data[pos : pos + length_size], "big")
        types.append(data[pos + length_size] & 0x1F)
        pos += length_size + size
    return types


def keyframe_nal_types(path: Path) -> list[list[int]]:
    """The NAL unit types of each packet the container flags as a keyframe (H.264 in MP4/Matroska)."""
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        return [avcc_nal_types(bytes(p)) for p in container.demux(stream) if p.size and p.is_keyframe]


def packet_pts(path: Path) -> list[int]:
    """Demuxed packets' pts in decode order."""
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        return [p.pts for p in container.demux(stream) if p.size]


def keyframe_indices(path: Path) -> list[int]:
    """Presentation-order indices (0-based) of the frames whose packets are keyframes."""
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size]
    order = {pts: i for i, pts in enumerate(sorted(pts for pts, _ in packets))}
    return sorted(order[pts] for pts, key in packets if key)


def leading_frames(path: Path) -> list[int]:
    """Presentation-order indices of the frames shown before the keyframe whose packet precedes
    theirs (an open GOP's leading B-frames: they reference the GOP before)."""
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size]
    order = {pts: i for i, pts in enumerate(sorted(pts for pts, _ in packets))}
    leading, key = [], None
    for pts, is_key in packets:
        if is_key:
            key = order[pts]
        elif key is not None and order[pts] < key:
            leading.append(order[pts])
    return sorted(leading)
