import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adafocus.model import crop_cubes, get_preset, plan_cubes
from adafocus.model.cubes import axis_starts, distinct_frames


@pytest.mark.parametrize(
    ("centre", "length", "extent", "start"),
    [
        (0.0, 224, 128, 0),  # clamped at the near border
        (1.0, 224, 128, 96),  # clamped at the far border
        (0.5, 224, 128, 48),  # centred: 112 - 64
        (0.5, 224, 96, 64),
        (0.3, 224, 128, 3),  # 67.2 - 64 + 0.5 -> floor 3
        (0.0, 16, 12, 0),
        (1.0, 16, 12, 4),
        (0.5, 16, 16, 0),  # a cube as long as the clip has one place
        (0.999, 18, 1, 17),  # one-frame cubes: floor(c * T), inside the clip
        (1.0, 18, 1, 17),
        (0.0, 18, 1, 0),
        (0.5, 18, 1, 9),
    ],
)
def test_crop_rule_at_the_borders(centre, length, extent, start):
    assert axis_starts(torch.tensor([centre]), length, extent).item() == start


@given(c=st.floats(0, 1), length=st.integers(1, 300), data=st.data())
def test_crop_rule_is_the_nearest_start_inside(c, length, data):
    extent = data.draw(st.integers(1, length))
    s = axis_starts(torch.tensor([c], dtype=torch.float32), length, extent).item()
    assert 0 <= s <= length - extent
    wanted = float(np.float32(c) * np.float32(length)) - extent / 2  # the unclamped ideal start
    if 0.5 <= wanted <= length - extent - 0.5:
        assert abs(s - wanted) <= 0.5 + 1e-4


def test_distinct_frames_takes_the_nearest_free_frame_earlier_on_ties():
    targets = torch.tensor([[5, 5, 5, 5, 0, 0]])
    # 5 -> 5; then 4 and 6 tie -> 4; then 6; then 3 and 7 tie -> 3; 0 -> 0; 0 -> 1
    assert distinct_frames(targets, 10).tolist() == [[5, 4, 6, 3, 0, 1]]


@given(st.lists(st.integers(0, 17), min_size=18, max_size=18))
def test_frame_wise_cubes_never_reuse_a_frame(targets):
    frames = distinct_frames(torch.tensor([targets]), 18)[0].tolist()
    assert sorted(frames) == list(range(18))  # K = T: every frame exactly once
    assert frames[0] == targets[0]


def test_plan_uses_the_rule_per_axis_and_dedups_only_frame_wise():
    centres = torch.tensor([[[0.0, 1.0, 0.5], [0.5, 0.5, 0.5]]])
    tsm = plan_cubes(centres, get_preset("sthsth-v1"))  # 224², 16 frames, 128²×12
    assert tsm.tolist() == [[[0, 96, 2], [48, 48, 2]]]  # same t twice is fine for 3-D cubes
    demo = get_preset("demo")  # 128², 8 frames, 64²×1
    fw = plan_cubes(centres.expand(1, 2, 3).clone(), demo)
    assert fw[0, :, 2].tolist() == [4, 3]  # second cube wanted frame 4 too: nearest free is 3
    assert fw[0, :, :2].tolist() == [[0, 64], [32, 32]]


@pytest.mark.parametrize("frames", [1, 3])
def test_crop_equals_numpy_slicing(frames):
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((5, 6, 3, 20, 24)).astype(np.float32)
    rows = np.array([4, 0, 4, 2])
    starts = np.array([[0, 0, 0], [24 - 7, 20 - 7, 6 - frames], [3, 5, 1], [10, 2, 2]])
    cubes = crop_cubes(torch.from_numpy(pool), torch.from_numpy(rows), torch.from_numpy(starts), 7, frames)
    for i, (r, (x0, y0, t0)) in enumerate(zip(rows, starts)):
        expected = pool[r, t0 : t0 + frames, :, y0 : y0 + 7, x0 : x0 + 7]
        np.testing.assert_array_equal(cubes[i].numpy(), expected)
