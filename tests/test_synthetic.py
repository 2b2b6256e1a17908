import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adafocus.data.synthetic import GLYPH_FRAMES, GLYPH_TILES, MEAN_COLOUR, ON, SyntheticTask, texture_tiles
from adafocus.model import get_preset
from adafocus.model.preprocess import denormalize

DEMO = get_preset("demo")


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(DEMO, seed=7)


def read_texture(frame: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """The lit pixels of a glyph from full-resolution RGB, one sample per texture pixel."""
    scale = size // (4 * GLYPH_TILES)
    return (frame[0, y : y + size : scale, x : x + size : scale] > 0.5).astype(int)


def test_generation_is_deterministic_and_splits_differ(task):
    a, la = task.video("train", 3)
    b, lb = SyntheticTask(DEMO, seed=7).video("train", 3)
    np.testing.assert_array_equal(a, b)
    assert la == lb
    assert not np.array_equal(a, task.video("val", 3)[0])
    assert not np.array_equal(a, SyntheticTask(DEMO, seed=8).video("train", 3)[0])
    assert a.shape == DEMO.video_shape and a.dtype == np.float32


def test_labels_are_recoverable_from_full_resolution_pixels(task):
    textures = [np.tile(tile, (GLYPH_TILES, GLYPH_TILES)) for tile in texture_tiles(DEMO.num_classes)]
    for index in range(40):
        raw, info = task.raw_video("test", index)
        x, y, t0, size = info.glyph
        for t in range(t0, t0 + GLYPH_FRAMES):
            seen = read_texture(raw[t], x, y, size)
            matches = [k for k, texture in enumerate(textures) if np.array_equal(seen, texture)]
            assert matches == [info.label]
        visible = [
            t for t in range(DEMO.num_frames) if np.allclose(raw[t, :, y : y + size, x : x + size][0].max(), ON[0])
        ]
        assert visible == list(range(t0, t0 + GLYPH_FRAMES))


def test_hard_glyphs_are_one_blob_at_glance_resolution(task):
    half = {}
    for index in range(60):
        raw, info = task.raw_video("train", index)
        x, y, t0, size = info.glyph
        glance = F.interpolate(torch.from_numpy(raw[t0 : t0 + 1]), scale_factor=0.5, mode="bilinear").numpy()[0]
        patch = glance[:, y // 2 : (y + size) // 2, x // 2 : (x + size) // 2]
        if info.easy:
            half.setdefault(info.label, patch)
        else:  # every hard glyph, whatever its class, is the flat mean colour, like a decoy
            np.testing.assert_allclose(patch, np.broadcast_to(MEAN_COLOUR[:, None, None], patch.shape), atol=1e-6)
        for dx, dy, dt, dsize in info.decoys:
            decoy = F.interpolate(torch.from_numpy(raw[dt : dt + 1]), scale_factor=0.5, mode="bilinear").numpy()[0]
            patch = decoy[:, dy // 2 : (dy + dsize) // 2, dx // 2 : (dx + dsize) // 2]
            np.testing.assert_allclose(patch, np.broadcast_to(MEAN_COLOUR[:, None, None], patch.shape), atol=1e-6)
    distinct = {tuple(np.round(p, 3).ravel()) for p in half.values()}
    assert len(half) >= 3 and len(distinct) == len(half)  # easy glyphs stay readable


def test_batches_are_normalised_tensors(task):
    videos, labels = task.batch("train", range(5))
    assert videos.shape == (5, *DEMO.video_shape) and videos.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [task.video("train", i)[1] for i in range(5)]
    raw = denormalize(videos[0].numpy())
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_a_preset_too_small_is_refused():
    import dataclasses

    from adafocus import AdaFocusError

    with pytest.raises(AdaFocusError, match="too small for the synthetic task"):
        SyntheticTask(dataclasses.replace(DEMO, frame_size=24, cube_size=16))
