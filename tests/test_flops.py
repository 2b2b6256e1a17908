import pytest

from adafocus.model import PRESETS, get_preset
from adafocus.model.flops import count_flops

# Figures of the official code and the paper (official-notes.md, paper Table 3), GMACs.
MOBILENET_V2_224 = 0.2995
RESNET50 = {96: 0.7507, 128: 1.3346, 224: 4.09}
TSM_PLUS_STHSTH = 35.1  # paper Table 3: TSM+ baseline
ONE_CUBE_STHSTH = 18.8  # glance 8×224 + policy + one 128²×12 cube


def close(value: float, paper: float, within: float = 0.02) -> bool:
    return abs(value - paper) <= within * paper


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.frame_size == 224])  # not the small ones
def test_module_figures_match_the_official_ones(name):
    r = count_flops(get_preset(name))
    assert close(r.glance_per_frame, MOBILENET_V2_224)
    assert close(r.local_per_frame, RESNET50[get_preset(name).cube_size])
    assert close(r.dense_local / get_preset(name).glance_frames, RESNET50[224])


@pytest.mark.parametrize("name", ["sthsth-v1", "sthsth-v2", "diving48"])
def test_something_something_figures_match_the_paper(name):
    r = count_flops(get_preset(name))
    assert close(r.dense_baseline, TSM_PLUS_STHSTH)
    assert close(r.exit_cumulative[1], ONE_CUBE_STHSTH)
    assert close(r.policy, 0.41)


@pytest.mark.parametrize("name", list(PRESETS))
def test_exit_costs_add_up(name):
    p = get_preset(name)
    r = count_flops(p)
    assert len(r.exit_cumulative) == p.num_exits
    assert r.exit_cumulative[0] == pytest.approx(r.glance + r.classifier_glance)
    steps = [b - a for a, b in zip(r.exit_cumulative[1:], r.exit_cumulative[2:])]
    assert steps == pytest.approx([r.cube + r.classifier_step] * (p.max_cubes - 1))
    assert r.exit_cumulative[1] == pytest.approx(r.exit_cumulative[0] + r.policy + r.cube + r.classifier_step)


def test_counts_scale_with_the_cube():
    t8, t16 = count_flops(get_preset("sthsth-v1-t8")), count_flops(get_preset("sthsth-v1-t16"))
    assert t16.cube == pytest.approx(2 * t8.cube)
    p96, p128 = count_flops(get_preset("fcvid-p96")), count_flops(get_preset("fcvid-p128"))
    assert p128.cube > 1.7 * p96.cube  # (128/96)² = 1.78, minus the size-independent parts
