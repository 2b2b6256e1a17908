import pytest
import torch

from adafocus import AdaFocusError
from adafocus.model import Preset, adaptive_inference, build_model, get_preset, load_checkpoint, save_checkpoint
from adafocus.model.checkpoint import FOREIGN_PREFIXES
from conftest import random_videos

NEVER = [-1.0] * 5


@pytest.fixture
def demo():
    torch.manual_seed(42)
    return build_model(get_preset("demo"))


def test_round_trip_keeps_weights_preset_names_and_meta(demo, tmp_path):
    names = [f"glyph {i}" for i in range(10)]
    path = save_checkpoint(tmp_path / "sub" / "demo.pt", demo, names, meta={"command": "adafocus train"})
    loaded = load_checkpoint(path)
    assert loaded.preset == demo.preset and loaded.class_names == names
    assert loaded.meta == {"command": "adafocus train"} and loaded.report.complete
    videos = random_videos(demo.preset, 3)
    expected = adaptive_inference(demo, videos, NEVER).step_logits
    assert torch.equal(adaptive_inference(loaded.model, videos, NEVER).step_logits, expected)
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["demo.pt"]  # no temporary left


def test_wrong_number_of_class_names_is_refused(demo, tmp_path):
    with pytest.raises(AdaFocusError, match="3 class names for preset 'demo' with 10 classes"):
        save_checkpoint(tmp_path / "x.pt", demo, ["a", "b", "c"])


def test_a_file_with_the_wrong_number_of_class_names_is_refused_on_load(demo, tmp_path):
    path = save_checkpoint(tmp_path / "x.pt", demo)
    record = torch.load(path, weights_only=True)
    record["class_names"] = record["class_names"][:9]  # edited by hand: the last class has no name
    torch.save(record, path)
    with pytest.raises(AdaFocusError, match="has 9 class names for its 10 classes"):
        load_checkpoint(path)


def official_names(state: dict) -> dict:
    """Our keys as the official DDP code would name them (the inverse of the prefix table)."""
    renamed = {}
    for key, value in state.items():
        for theirs, ours in FOREIGN_PREFIXES.items():
            if key.startswith(ours):
                key = theirs + key[len(ours) :]
                break
        renamed["module." + key] = value
    return renamed


def test_foreign_ddp_state_dict_is_mapped(demo, tmp_path):
    foreign = official_names(demo.state_dict())
    assert any(k.startswith("module.global_CNN.features.") for k in foreign)
    torch.save({"epoch": 3, "state_dict": foreign}, tmp_path / "official.pth.tar")
    loaded = load_checkpoint(tmp_path / "official.pth.tar", preset=get_preset("demo"))
    assert loaded.report.complete
    for key, value in demo.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_missing_and_unexpected_keys_are_named(demo, tmp_path):
    state = demo.state_dict()
    del state["policy.head.weight"]
    state["temporal_policy.Tconv.0.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(
        AdaFocusError, match=r"1 missing keys \[policy.head.weight\].*1 unexpected keys \[temporal_policy"
    ):
        load_checkpoint(tmp_path / "partial.pt", preset=get_preset("demo"))
    loose = load_checkpoint(tmp_path / "partial.pt", preset=get_preset("demo"), strict=False)
    assert loose.report.missing == ["policy.head.weight"]
    assert loose.report.unexpected == ["temporal_policy.Tconv.0.weight"]
    assert torch.equal(loose.model.state_dict()["local.conv1.weight"], state["local.conv1.weight"])


def test_shape_mismatch_is_one_clear_error(demo, tmp_path):
    save_checkpoint(tmp_path / "demo.pt", demo)
    torch.save(demo.state_dict(), tmp_path / "bare.pt")
    other = get_preset("demo").to_dict() | {"name": "demo-20", "num_classes": 20}
    with pytest.raises(
        AdaFocusError,
        match=r"does not fit preset 'demo-20'.*classifier.glance_head.weight: file \(10, 128\) vs model \(20, 128\)",
    ):
        load_checkpoint(tmp_path / "bare.pt", preset=Preset(**other))
    with pytest.raises(AdaFocusError, match="holds a 'demo' model, not 'demo-20'"):
        load_checkpoint(tmp_path / "demo.pt", preset=Preset(**other))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is a text file, not weights\n", "is not a PyTorch checkpoint"),
        (b"", "is not a PyTorch checkpoint"),
        (bytes(range(256)) * 4, "is not a PyTorch checkpoint"),
    ],
)
def test_a_file_that_is_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(AdaFocusError, match=message):
        load_checkpoint(path, preset=get_preset("demo"))


def test_other_refusals(demo, tmp_path):
    with pytest.raises(AdaFocusError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")
    torch.save(demo.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(AdaFocusError, match="no preset in it"):
        load_checkpoint(tmp_path / "bare.pt")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "no_weights.pt")
    with pytest.raises(AdaFocusError, match="holds no state dict"):
        load_checkpoint(tmp_path / "no_weights.pt", preset=get_preset("demo"))
    record = torch.load(save_checkpoint(tmp_path / "v.pt", demo), weights_only=True) | {"format_version": 99}
    torch.save(record, tmp_path / "v99.pt")
    with pytest.raises(AdaFocusError, match="format version 99"):
        load_checkpoint(tmp_path / "v99.pt")


def test_half_storage_is_smaller_and_loads_into_float32(demo, tmp_path):
    full = save_checkpoint(tmp_path / "full.pt", demo)
    half = save_checkpoint(tmp_path / "half.pt", demo, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_checkpoint(half).model
    for key, value in demo.state_dict().items():
        got = loaded.state_dict()[key]
        assert got.dtype == value.dtype, key
        if value.is_floating_point():
            assert torch.equal(got, value.half().float()), key
