import pytest
import torch

from adafocus.model import PRESETS, AdaFocusV3, build_model, get_preset
from adafocus.model.networks import glance_frame_indices, stride32_size
from adafocus.model.tsm import temporal_shift
from conftest import random_videos


def run_all_subnetworks(model, videos: torch.Tensor) -> dict[str, torch.Tensor]:
    maps, pooled = model.glance(model.glance_frames(videos))
    logits0, global_state = model.classifier.glance(pooled)
    centres, starts = model.plan(maps, pooled)
    rows = torch.arange(videos.shape[0], device=videos.device)
    cubes = model.cut(videos, rows, centres[:, 0], starts[:, 0])
    features = model.local(cubes)
    step = torch.ones(videos.shape[0], dtype=torch.int64, device=videos.device)
    logits1, local_state = model.classifier.step(features, torch.zeros_like(global_state), global_state, step)
    return dict(
        maps=maps,
        pooled=pooled,
        logits0=logits0,
        global_state=global_state,
        centres=centres,
        starts=starts,
        cubes=cubes,
        features=features,
        logits1=logits1,
        local_state=local_state,
    )


def expected_shapes(p, b: int) -> dict[str, tuple]:
    m = stride32_size(p.glance_size)
    c = p.glance_channels
    d = {"resnet50": 2048, "resnet18": 512, "resnet10-slim": 256}[p.local_arch]
    return dict(
        maps=(b, p.glance_frames, c, m, m),
        pooled=(b, p.glance_frames, c),
        logits0=(b, p.num_classes),
        global_state=(b, p.hidden_dim),
        centres=(b, p.max_cubes, 4 if p.family == "uni" else 3),
        starts=(b, p.max_cubes, 3),
        cubes=(b, p.cube_frames, 3, p.cube_size, p.cube_size),
        features=(b, d),
        logits1=(b, p.num_classes),
        local_state=(b, p.hidden_dim),
    )


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(PRESETS))
def test_output_shapes_of_every_preset(name, batch):
    # Shape propagation through the real modules on meta tensors: every preset, no compute.
    p = get_preset(name)
    with torch.device("meta"):
        model = build_model(p)
        out = run_all_subnetworks(model, torch.empty(batch, *p.video_shape))
    assert {k: tuple(v.shape) for k, v in out.items()} == expected_shapes(p, batch)


@pytest.mark.parametrize("batch", [1, 3])
def test_demo_runs_for_real(model_of, batch):
    model = model_of("demo")
    out = run_all_subnetworks(model, random_videos(model.preset, batch))
    assert {k: tuple(v.shape) for k, v in out.items()} == expected_shapes(model.preset, batch)
    assert out["starts"].dtype == torch.int64
    assert ((out["centres"] >= 0) & (out["centres"] <= 1)).all()
    assert torch.isfinite(out["logits1"]).all()


def test_glance_frames_follow_the_tsn_rule():
    assert glance_frame_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert glance_frame_indices(18, 18) == list(range(18))
    assert glance_frame_indices(10, 4) == [1, 3, 6, 8]  # floor((i + 0.5) * 10 / 4)


def test_temporal_shift_moves_an_eighth_each_way():
    n, t, c = 2, 4, 16
    x = torch.randn(n * t, c, 3, 3)
    out = temporal_shift(x, t).view(n, t, c, 3, 3)
    v = x.view(n, t, c, 3, 3)
    fold = c // 8
    torch.testing.assert_close(out[:, :-1, :fold], v[:, 1:, :fold])  # from the next frame
    assert (out[:, -1, :fold] == 0).all()
    torch.testing.assert_close(out[:, 1:, fold : 2 * fold], v[:, :-1, fold : 2 * fold])  # from the previous
    assert (out[:, 0, fold : 2 * fold] == 0).all()
    torch.testing.assert_close(out[:, :, 2 * fold :], v[:, :, 2 * fold :])
    assert temporal_shift(x, 1) is x


@pytest.mark.parametrize("clips, frames", [(1, 8), (3, 12), (2, 16)])
def test_temporal_shift_equals_the_obvious_shift_bit_for_bit(clips, frames):
    """The rolled-and-masked form (written for ONNX Runtime's INT8 layout) against zeros filled by
    slice assignment; a frame count that does not split into clips raises."""
    x = torch.randn(clips * frames, 24, 5, 7)
    v, fold = x.view(clips, frames, 24, 5, 7), 3
    expected = v.clone()
    expected[:, :, : 2 * fold] = 0
    expected[:, :-1, :fold] = v[:, 1:, :fold]
    expected[:, 1:, fold : 2 * fold] = v[:, :-1, fold : 2 * fold]
    assert torch.equal(temporal_shift(x, frames), expected.view_as(x))
    with pytest.raises(RuntimeError):
        temporal_shift(x[1:], frames)


def test_tsm_presets_shift_and_frame_wise_presets_do_not(model_of):
    shifted = [m for m in AdaFocusV3(get_preset("diving48-t8")).modules() if type(m).__name__ == "ShiftThen"]
    assert len(shifted) == 16 + 10  # every ResNet-50 bottleneck + the residual MobileNetV2 blocks
    assert not [m for m in model_of("demo").modules() if type(m).__name__ == "ShiftThen"]


def test_classifier_rows_at_different_steps_share_one_call(model_of):
    clf = model_of("demo").classifier
    torch.manual_seed(1)
    features, g = torch.randn(4, 256), torch.rand(4, clf.global_mlp[0].out_features)
    local = torch.rand_like(g)
    steps = torch.tensor([1, 2, 3, 4])
    logits, _ = clf.step(features, local, g, steps)
    for i, s in enumerate(steps):
        alone, _ = clf.step(features[i : i + 1], local[i : i + 1], g[i : i + 1], s.view(1))
        torch.testing.assert_close(logits[i : i + 1], alone)
    assert not torch.allclose(logits[0], clf.step(features[:1], local[:1], g[:1], torch.tensor([2]))[0][0])


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_local_trunks_have_torchvision_names_and_shapes(arch):
    import torchvision

    from adafocus.model.networks import LocalEncoder

    with torch.device("meta"):
        ours = LocalEncoder(arch=arch, frames=1, tsm=False).state_dict()
        theirs = {k: v for k, v in getattr(torchvision.models, arch)().state_dict().items() if not k.startswith("fc.")}
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_clip_length_runs_other_lengths_and_restores():
    from adafocus.model.networks import LocalEncoder

    local = LocalEncoder(arch="resnet18", frames=8, tsm=True).eval()
    clip = torch.randn(1, 4, 3, 32, 32)
    with pytest.raises(RuntimeError):
        local(clip)  # 4 frames cannot be split into 8-frame segments
    with local.clip_length(4):
        assert local(clip).shape == (1, 512)
    assert {m.segments for m in local.modules() if type(m).__name__ == "ShiftThen"} == {8}


def test_untrained_policy_spreads_cubes_over_time(model_of):
    model = model_of("demo")
    with torch.no_grad():
        maps, _ = model.glance(model.glance_frames(random_videos(model.preset, 2)))
        t = model.policy(maps)[..., 2]
    assert (t[:, 1:] > t[:, :-1]).all()  # cube k starts near (k + 0.5) / K
