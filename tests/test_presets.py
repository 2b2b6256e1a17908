import pytest

from adafocus import AdaFocusError
from adafocus.model import ALIASES, PRESETS, Preset, get_preset

# Appendix A and sections 4.1-4.2 of the paper.
PAPER = {
    "activitynet": (200, 18, (96, 128), 1, 18),
    "fcvid": (239, 18, (96, 128), 1, 18),
    "mini-kinetics": (200, 18, (96, 128), 1, 18),
}
TSM = {"sthsth-v1": 174, "sthsth-v2": 174, "diving48": 48}


@pytest.mark.parametrize("key", PAPER)
def test_frame_wise_presets_follow_the_paper(key):
    classes, frames, sizes, cube_frames, cubes = PAPER[key]
    for size in sizes:
        p = PRESETS[f"{key}-p{size}"]
        assert (p.num_classes, p.num_frames, p.cube_size, p.cube_frames, p.max_cubes) == (
            classes,
            frames,
            size,
            cube_frames,
            cubes,
        )
        assert p.frame_wise and not p.tsm and p.local_arch == "resnet50" and p.glance_size == 224


@pytest.mark.parametrize("key", TSM)
def test_tsm_presets_follow_the_paper(key):
    for t in (8, 12, 16):
        p = PRESETS[f"{key}-t{t}"]
        assert (p.num_classes, p.glance_frames, p.cube_size, p.cube_frames, p.max_cubes) == (TSM[key], 8, 128, t, 2)
        assert p.tsm and not p.frame_wise


def test_aliases_and_case():
    assert get_preset("SthSth-V1").name == "sthsth-v1-t12"
    assert get_preset("activitynet").name == "activitynet-p128"
    assert all(target in PRESETS for target in ALIASES.values())
    assert get_preset("demo").num_exits == get_preset("demo").max_cubes + 1


def test_unknown_preset_names_the_choices():
    with pytest.raises(AdaFocusError, match="(?s)unknown preset .kinetics400.*demo"):
        get_preset("kinetics400")


def test_inconsistent_preset_is_refused_at_construction():
    demo = get_preset("demo")
    fields = demo.to_dict() | {"name": "bad", "max_cubes": demo.num_frames + 1}
    with pytest.raises(AdaFocusError, match="max_cubes must be <= num_frames"):
        Preset(**fields)
    with pytest.raises(AdaFocusError, match="local_arch"):
        Preset(**(demo.to_dict() | {"local_arch": "vgg16"}))


def test_preset_record_round_trip_and_unknown_fields():
    p = get_preset("diving48")
    assert Preset.from_dict(p.to_dict()) == p
    with pytest.raises(AdaFocusError, match="unknown fields"):
        Preset.from_dict(p.to_dict() | {"colour": "blue"})


def test_preset_record_missing_fields_is_one_error_naming_them():
    record = get_preset("demo").to_dict()
    del record["max_cubes"], record["num_frames"]
    with pytest.raises(AdaFocusError, match=r"'demo' lacks the fields \['num_frames', 'max_cubes'\]"):
        Preset.from_dict(record)
