"""Uni-AdaFocus, the family of the published weights: checkpoint layout, plan rules, FLOPs, loop."""

import math

import numpy as np
import pytest
import torch

from adafocus import AdaFocusError
from adafocus.model import adaptive_inference, build_model, get_preset, load_checkpoint
from adafocus.model.flops import count_flops
from adafocus.model.uni import choose_frames, patch_boxes, resample_patches
from adafocus.runtime import Runtime
from conftest import random_model, random_videos

# ---------------------------------------------------------------------------------------------
# The official checkpoint layout, written down from reading LeapLabTHU/Uni-AdaFocus
# (models/uni_adafocus.py, models/mobilenet_v2.py, models/resnet.py; `AdaFocus(args)` with
# num_segments 48, num_glance_segments 16, num_focus_segments 16, stn_hidden_dim 128,
# temporal_hidden_dim 64, saved from DDP as {'epoch', 'best_acc1', 'state_dict': {'module.' ...}}).


def _bn(name: str, c: int, dims: int = 1) -> dict:
    return {f"{name}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")} | {
        f"{name}.num_batches_tracked": ()
    }


def _linear(name: str, cout: int, cin: int) -> dict:
    return {f"{name}.weight": (cout, cin), f"{name}.bias": (cout,)}


def official_mobilenet_v2(prefix: str) -> dict:
    """models/mobilenet_v2.py, width 1: features.0 = conv_bn (conv, BN, ReLU6); blocks keep their
    layers in one flat `conv` Sequential (expand 1: dw 0, BN 1, pw 3, BN 4; expand 6: pw 0, BN 1,
    dw 3, BN 4, pw-linear 6, BN 7); features.18 = conv_1x1_bn; classifier Linear(1280, 1000)."""
    keys = {f"{prefix}.features.0.0.weight": (32, 3, 3, 3)} | _bn(f"{prefix}.features.0.1", 32)
    index, cin = 1, 32
    for t, c, n, _ in [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]:
        for _ in range(n):
            block, hidden = f"{prefix}.features.{index}.conv", cin * t
            if t == 1:
                keys |= {f"{block}.0.weight": (hidden, 1, 3, 3)} | _bn(f"{block}.1", hidden)
                keys |= {f"{block}.3.weight": (c, hidden, 1, 1)} | _bn(f"{block}.4", c)
            else:
                keys |= {f"{block}.0.weight": (hidden, cin, 1, 1)} | _bn(f"{block}.1", hidden)
                keys |= {f"{block}.3.weight": (hidden, 1, 3, 3)} | _bn(f"{block}.4", hidden)
                keys |= {f"{block}.6.weight": (c, hidden, 1, 1)} | _bn(f"{block}.7", c)
            index, cin = index + 1, c
    keys |= {f"{prefix}.features.18.0.weight": (1280, 320, 1, 1)} | _bn(f"{prefix}.features.18.1", 1280)
    return keys | _linear(f"{prefix}.classifier", 1000, 1280)


def official_resnet50(prefix: str) -> dict:
    """models/resnet.py: torchvision's ResNet-50, fc included."""
    keys = {f"{prefix}.conv1.weight": (64, 3, 7, 7)} | _bn(f"{prefix}.bn1", 64)
    cin = 64
    for layer, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            name = f"{prefix}.layer{layer}.{b}"
            keys |= {f"{name}.conv1.weight": (width, cin, 1, 1)} | _bn(f"{name}.bn1", width)
            keys |= {f"{name}.conv2.weight": (width, width, 3, 3)} | _bn(f"{name}.bn2", width)
            keys |= {f"{name}.conv3.weight": (4 * width, width, 1, 1)} | _bn(f"{name}.bn3", 4 * width)
            if b == 0:
                keys |= {f"{name}.downsample.0.weight": (4 * width, cin, 1, 1)} | _bn(f"{name}.downsample.1", 4 * width)
            cin = 4 * width
    return keys | _linear(f"{prefix}.fc", 1000, 2048)


def official_layout(classes: int) -> dict[str, tuple]:
    keys = official_mobilenet_v2("global_CNN") | official_resnet50("local_CNN")
    keys |= _linear("global_CNN_fc.1", classes, 1280) | _linear("aux_fc", classes, 1280)
    keys |= _linear("local_CNN_fc.1", classes, 2048)
    spatial = "spatial_policy.encoder"
    keys |= {f"{spatial}.0.weight": (128, 1280, 1, 1, 1)} | _bn(f"{spatial}.1", 128)
    keys |= {f"{spatial}.3.weight": (128, 128, 3, 3, 3)} | _bn(f"{spatial}.4", 128)
    keys |= {f"{spatial}.6.weight": (128, 128, 3, 3, 3)} | _bn(f"{spatial}.7", 128)
    keys |= {f"{spatial}.9.weight": (4, 128, 1, 7, 7)}
    temporal = "temporal_policy.Tconv"
    keys |= {f"{temporal}.0.weight": (64, 1280, 3, 1)} | _bn(f"{temporal}.1", 64)
    keys |= {f"{temporal}.3.weight": (64, 64, 3, 1)} | _bn(f"{temporal}.4", 64)
    keys |= {f"{temporal}.6.weight": (1, 64, 1, 1)}
    keys |= _linear("classifier.global_mlp.layers.0", 4096, 1280) | _bn("classifier.global_mlp.layers.1", 4096)
    keys |= _linear("classifier.local_mlp.layers.0", 4096, 2048) | _bn("classifier.local_mlp.layers.1", 4096)
    for i in range(16):
        keys |= _linear(f"classifier.global_classifiers.{i}.1", classes, 4096)
        keys |= _linear(f"classifier.local_classifiers.{i}.1", classes, 8192)
    return keys


def official_file(path, classes: int = 200, drop=(), add=None) -> dict[str, torch.Tensor]:
    """An official-layout checkpoint with random values (BN variances positive), saved at `path`."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in official_layout(classes).items():
        if key in drop:
            continue
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    state |= add or {}
    torch.save({"epoch": 50, "best_acc1": 80.7, "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    return state


@pytest.fixture(scope="module")
def actnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("uni") / "actnet_p128.pth.tar"
    return path, official_file(path)


def test_the_official_layout_loads_key_for_key(actnet_file):
    path, theirs = actnet_file
    loaded = load_checkpoint(path, preset=get_preset("uni-actnet-p128"))
    ours = loaded.model.state_dict()
    assert loaded.report.missing == [] and loaded.report.unexpected == []
    # left out on purpose: the training-only heads, the ImageNet heads, glance heads 0..14
    ignored = set(loaded.report.ignored)
    assert {"global_CNN_fc.1.weight", "aux_fc.bias", "local_CNN_fc.1.weight", "local_CNN.fc.weight"} <= ignored
    assert {"global_CNN.classifier.weight", "classifier.global_classifiers.0.1.weight"} <= ignored
    assert "classifier.global_classifiers.15.1.weight" not in ignored
    assert len(ignored) == 2 * 5 + 2 * 15  # five two-tensor heads, 15 glance heads
    # every other official tensor is in the model, where the official forward uses it
    for key in (
        "global_CNN.features.17.conv.6.weight",
        "spatial_policy.encoder.9.weight",
        "temporal_policy.Tconv.4.running_var",
    ):
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(ours["classifier.global_mlp.0.weight"], theirs["classifier.global_mlp.layers.0.weight"])
    assert torch.equal(ours["classifier.glance_head.weight"], theirs["classifier.global_classifiers.15.1.weight"])
    heads = ours["classifier.step_heads.weight"].unflatten(0, (16, 200))
    for i in (0, 7, 15):
        assert torch.equal(heads[i], theirs[f"classifier.local_classifiers.{i}.1.weight"])
    used = set(theirs) - ignored
    assert sum(ours[k].numel() for k in ours) == sum(theirs[k].numel() for k in used)


def test_a_missing_and_an_unknown_key_are_one_error_naming_both(tmp_path):
    path = tmp_path / "broken.pth.tar"
    official_file(
        path, drop={"classifier.local_classifiers.3.1.weight"}, add={"temporal_policy.gate.weight": torch.zeros(2)}
    )
    with pytest.raises(AdaFocusError) as e:
        load_checkpoint(path, preset=get_preset("uni-actnet-p128"))
    text = str(e.value)
    assert "1 keys missing [classifier.local_classifiers.3.1.weight]" in text
    assert "1 keys unknown [temporal_policy.gate.weight]" in text
    assert "aux_fc.* (training-only head" in text  # what is left out on purpose is said


def test_a_checkpoint_of_another_dataset_names_the_shapes(actnet_file):
    with pytest.raises(
        AdaFocusError, match=r"does not fit preset 'uni-fcvid-p128'.*file \(200, 4096\) vs model \(239, 4096\)"
    ):
        load_checkpoint(actnet_file[0], preset=get_preset("uni-fcvid-p128"))


# ---------------------------------------------------------------------------------------------
# The plan: frame choice and patch windows, by the official rules (numbers worked by hand).


def test_frame_choice_follows_the_official_quantile_rule():
    uniform = torch.full((1, 4), 0.25)
    assert choose_frames(uniform, 12, 4).tolist() == [[1, 4, 7, 10]]  # floor(12 (i + 0.5) / 4)
    # all weight on the first glance frame: quantiles 0.25 t -> 0.375, 1.125, 1.875, 2.625 -> 0, 1, 1, 2,
    # a repeat moves one frame on
    first = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert choose_frames(first, 12, 4).tolist() == [[0, 1, 2, 3]]
    # all weight on the last: 9.375, 10.125, 10.875, 11.625 -> 9, 10, 11, 12, kept below 12 - 4 + i
    last = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    assert choose_frames(last, 12, 4).tolist() == [[8, 9, 10, 11]]
    # half on the second frame: cumulative 0, .125, .625, .75, 1 -> quantiles .125/.5*.25+.25 ...
    mixed = torch.tensor([[0.125, 0.5, 0.125, 0.25]])
    # targets .125 -> x = .25 (end of segment 0: cumulative reaches .125 exactly) -> 3;
    # .375 -> .25 + .25 * .25/.5 = .375 -> 4.5 -> 4; .625 -> .5 -> 6; .875 -> .75 + .25 * .125/.25 = .875 -> 10.5 -> 10
    assert choose_frames(mixed, 12, 4).tolist() == [[3, 4, 6, 10]]


def test_patch_windows_follow_the_official_formula():
    # (y, x, scale_y, scale_x) at S = 224, window 96..224, patch 128
    boxes = patch_boxes(torch.tensor([0.25, 0.75, 0.5, 1.0]), 224, 96, 128)
    assert boxes.tolist() == [0.0, 16.0, 224.0, 160.0]  # x0, y0, width, height
    assert patch_boxes(torch.tensor([1.0, 0.0, 0.0, 0.0]), 224, 96, 128).tolist() == [0.0, 128.0, 96.0, 96.0]


def test_resampling_is_a_crop_at_scale_one_and_an_average_at_scale_two():
    frames = torch.randn(2, 3, 64, 64)
    box = torch.tensor([[5.0, 7.0, 16.0, 16.0], [0.0, 48.0, 16.0, 16.0]])
    patches = resample_patches(frames, box, 16)
    torch.testing.assert_close(patches[0], frames[0, :, 7:23, 5:21], atol=1e-5, rtol=0)
    torch.testing.assert_close(patches[1], frames[1, :, 48:64, 0:16], atol=1e-5, rtol=0)
    halved = resample_patches(frames, torch.tensor([[4.0, 8.0, 32.0, 32.0]] * 2), 16)
    expected = torch.nn.functional.avg_pool2d(frames[:, :, 8:40, 4:36], 2)
    torch.testing.assert_close(halved, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# FLOPs: the official early-exit script's table (ops/early_exit_uni_adafocus.py, patch 128), GMACs.
OFFICIAL_GFLOPS_P128 = [
    4.889240, 7.060488, 8.405121, 9.749754, 11.094386, 12.439019, 13.783652, 15.128285, 16.472918,
    17.817550, 19.162183, 20.506816, 21.851449, 23.196081, 24.540714, 25.885347, 27.229980,
]  # fmt: skip


@pytest.mark.parametrize("name", ["uni-actnet-p128", "uni-fcvid-p128", "uni-minik-p128"])
def test_cost_per_exit_equals_the_official_table(name):
    report = count_flops(get_preset(name))
    classes = get_preset(name).num_classes
    # the script's classifier terms are those of 200 classes for every dataset (FCVID has 239)
    for ours, theirs in zip(report.exit_cumulative, OFFICIAL_GFLOPS_P128, strict=True):
        assert ours == pytest.approx(theirs, rel=0.005)
    # the stacked step heads compute the other 15 heads too: said separately, not hidden
    assert report.classifier_step_unused == pytest.approx(15 * 8192 * classes / 1e9)
    assert report.dense_baseline == pytest.approx(16 * 0.2995 + 16 * 4.09, rel=0.01)


# ---------------------------------------------------------------------------------------------
# The reference loop on the family's small preset.


def midway_thresholds(step_logits: torch.Tensor, share: int) -> list[float]:
    """Per step, a threshold midway between two neighbouring entropies (never on one, so that float
    noise cannot flip an exit) with about 1/share of the videos below it."""
    thresholds = []
    for t in range(step_logits.shape[1]):
        values = torch.special.entr(torch.softmax(step_logits[:, t], -1)).sum(-1).sort().values
        i = len(values) // share - 1
        thresholds.append(float(values[i] + values[i + 1]) / 2)
    return thresholds


@pytest.fixture(scope="module")
def small():
    return random_model("uni-small")  # the weights of exported("uni-small")


def test_small_preset_plans_distinct_increasing_frames_and_boxes_inside_the_frame(small):
    p = small.preset
    result = adaptive_inference(small, random_videos(p, 6), [-math.inf] * p.num_exits)
    frames = result.cube_starts[..., 2]
    assert (frames[:, 1:] > frames[:, :-1]).all() and (frames >= 0).all() and (frames < p.num_frames).all()
    assert len({tuple(f) for f in frames.tolist()}) > 1  # the policy looks at the videos
    x0, y0, w, h = result.centres.unbind(-1)
    assert ((w >= p.window_min) & (w <= p.frame_size) & (x0 >= 0) & (x0 + w <= p.frame_size + 1e-4)).all()
    assert ((h >= p.window_min) & (h <= p.frame_size) & (y0 >= 0) & (y0 + h <= p.frame_size + 1e-4)).all()
    assert torch.equal(result.cube_starts[..., 0], x0.floor().long())


def test_small_preset_exits_early_and_each_video_equals_itself_alone(small):
    p = small.preset
    videos = random_videos(p, 8, seed=3)
    full = adaptive_inference(small, videos, [-math.inf] * p.num_exits)
    thresholds = midway_thresholds(full.step_logits, 2)  # about half leave at each step
    result = adaptive_inference(small, videos, thresholds)
    assert 0 < int((result.exit_step == 0).sum()) < 8 and len(set(result.exit_step.tolist())) >= 3
    for i in range(8):
        alone = adaptive_inference(small, videos[i : i + 1], thresholds)
        assert int(alone.exit_step) == int(result.exit_step[i])
        torch.testing.assert_close(alone.probs[0], result.probs[i], atol=1e-4, rtol=0)  # batch-size noise ~3e-5
        used = int(result.exit_step[i])
        assert torch.equal(alone.cube_starts[0, :used], result.cube_starts[i, :used])
    # an exited video's logits are those of the full run at its exit step
    torch.testing.assert_close(result.logits, full.step_logits[torch.arange(8), result.exit_step], atol=1e-4, rtol=0)


def test_families_are_not_mixed_up():
    from adafocus.model import AdaFocusV3

    with pytest.raises(AdaFocusError, match="'uni-small' is of the 'uni' family"):
        AdaFocusV3(get_preset("uni-small"))
    with pytest.raises(AdaFocusError, match="centres= replaces an AdaFocusV3 policy only"):
        adaptive_inference(
            build_model(get_preset("uni-small")),
            random_videos(get_preset("uni-small"), 1),
            [0.0] * 5,
            centres=torch.zeros(1, 4, 3),
        )


# ---------------------------------------------------------------------------------------------
# The export and the one loop: every backend reproduces the reference (exit step, class, frames,
# boxes). A frame is the floor of a real position and a box corner is floored into the starts: rows
# whose value is within float noise of an integer are excluded and counted, as thresholds are.
NOISE = 1e-4
# Probabilities: ONNX Runtime's GridSample samples ~1e-5 (relative) off PyTorch's, which the local
# network carries into the logits; AdaFocusV3's integer crop is exact, so its tests hold 1e-4.
PROB_TOL = 5e-4


def near_integer(x: torch.Tensor) -> torch.Tensor:
    return (x - x.round()).abs() < NOISE


def small_plan_data():
    """The uni-small reference model, 24 random videos, thresholds that spread their exits, and which
    videos have a frame position or box corner within float noise of an integer."""
    small = random_model("uni-small")
    p = small.preset
    videos = random_videos(p, 24, seed=5)
    with torch.no_grad():
        maps, pooled = small.glance(small.glance_frames(videos))
        boxes, _, positions = small.plan_with_positions(maps, pooled)
    full = adaptive_inference(small, videos, [-math.inf] * p.num_exits)
    thresholds = midway_thresholds(full.step_logits, 3)
    fragile = (near_integer(positions) | near_integer(boxes[..., :2]).any(-1)).any(-1)
    return small, videos, thresholds, fragile


@pytest.fixture(scope="module")
def small_data():
    return small_plan_data()[1:]


def assert_reproduces(result_of, reference, fragile) -> int:
    """Same exit, class, frames and box corners as the reference, boxes and probabilities close;
    returns how many videos were excluded for a value within float noise of an integer."""
    for i in range(len(fragile)):
        if fragile[i]:
            continue
        got = result_of(i)
        used = got.exit_step
        assert used == int(reference.exit_step[i]), i
        assert got.prediction == int(reference.prediction[i]), i
        np.testing.assert_allclose(got.probs, reference.probs[i].double().numpy(), atol=PROB_TOL, rtol=0)
        np.testing.assert_array_equal(got.cube_starts[:used], reference.cube_starts[i, :used].numpy())
        np.testing.assert_allclose(got.centres[:used], reference.centres[i, :used].numpy(), atol=1e-3, rtol=0)
        assert np.isnan(got.centres[used:]).all() and (got.cube_starts[used:] == -1).all()
    return int(fragile.sum())


@pytest.mark.parametrize("backend", ["onnxruntime", "pytorch"])
def test_every_backend_reproduces_the_reference_per_batch_and_streaming(exported, small, small_data, backend):
    videos, thresholds, fragile = small_data
    reference = adaptive_inference(small, videos, thresholds)
    assert len(set(reference.exit_step.tolist())) >= 3  # exits really spread over the steps
    runtime = Runtime.load(exported("uni-small").path, backend)
    runtime.set_thresholds(thresholds)
    excluded = assert_reproduces(runtime.predict(videos).video, reference, fragile)
    streamed = {r.index: r for r in runtime.stream(iter(videos), batch_size=8)}
    assert sorted(streamed) == list(range(len(videos)))
    assert_reproduces(streamed.__getitem__, reference, fragile)
    assert excluded <= 2, f"{excluded} of {len(videos)} videos within float noise of a frame or pixel boundary"


def test_the_manifest_declares_the_family_and_its_plan(exported):
    export = exported("uni-small")
    manifest = export.manifest
    assert manifest["preset"]["family"] == "uni" and manifest["plan"]["family"] == "uni"
    assert "patch boxes (x0, y0, width, height)" in manifest["plan"]["centres"]
    assert [t["name"] for t in manifest["graphs"]["crop"]["inputs"]] == ["pool", "rows", "starts", "boxes"]
    assert [t["name"] for t in manifest["graphs"]["policy"]["outputs"]] == ["centres", "cube_starts", "frame_positions"]
    # per exit: the official accounting (one head a step), the other heads said separately
    count = count_flops(export.preset)
    assert manifest["gflops"]["per_exit_step"] == pytest.approx(count.exit_cumulative, rel=1e-3)
    assert manifest["gflops"]["classifier_step_unused"] == pytest.approx(count.classifier_step_unused)


def test_a_result_names_its_patches(exported, small_data):
    videos, thresholds, _ = small_data
    runtime = Runtime.load(exported("uni-small").path)
    runtime.set_thresholds([-math.inf] * 5)  # nobody leaves early: all use 4 patches
    line = runtime.predict(videos[:1]).video(0).to_dict(runtime.class_names)
    assert "cubes" not in line and len(line["patches"]) == 4
    assert [set(p) for p in line["patches"]] == [{"frame", "box"}] * 4
    assert [p["frame"] for p in line["patches"]] == sorted({p["frame"] for p in line["patches"]})


def test_calibration_by_map_on_a_multi_label_set_runs_on_the_export(exported, tmp_path):
    """`--metric map` (ActivityNet, FCVID) on this family's export: the budgets carry map and
    heldout_map, and ONNX Runtime with a budget set exits where the held-out entropies say."""
    import shutil

    from adafocus.calibration.calibrate import calibrate_export
    from adafocus.calibration.thresholds import exit_steps, thresholds_from_json

    target = shutil.copytree(exported("uni-small").path, tmp_path / "uni-small")
    p = exported("uni-small").preset
    videos = random_videos(p, 48, seed=9)
    rng = np.random.default_rng(0)
    labels = rng.random((48, p.num_classes)) < 0.3  # several classes per video
    labels[np.arange(48), rng.integers(0, p.num_classes, 48)] = True
    cal, held = (videos[:24], torch.as_tensor(labels[:24])), (videos[24:], torch.as_tensor(labels[24:]))
    result = calibrate_export(target, cal, held, progress=False, metric="map", solver="msdnet")
    assert result.export.budget_metric == "map" and len(result.table) >= 2
    assert all({"map", "heldout_map", "accuracy"} <= set(e) for e in result.table)
    runtime = Runtime.load(target)
    entropy = result.heldout.entropy
    compared = 0
    for entry in result.table:
        runtime.set_budget(entry["gflops"])
        out = runtime.predict(videos[24:])
        expected = exit_steps(entropy, entry["thresholds"])
        thr = np.asarray(thresholds_from_json(entry["thresholds"]))[None, :4]
        # a video whose entropy lies within ONNX Runtime's resampling noise of a threshold is left out
        clear = (np.abs(entropy[:, :4] - thr) > 1e-3).all(axis=1)
        assert (out.exit_step[clear] == expected[clear]).all()
        compared += int(clear.sum())
    assert compared >= len(result.table) * 24 // 2


def test_an_int8_local_network_keeps_the_plan(exported, tmp_path):
    """INT8 on this family's export (`adafocus calibrate --int8`'s quantisation): with only the local
    network in int8 the policy sees the same glance, so every video gets the same frames and boxes
    as in fp32, while the logits are the int8 graph's own."""
    import shutil

    from adafocus.quantize.int8 import quantize_export

    target = shutil.copytree(exported("uni-small").path, tmp_path / "uni-small")
    p = exported("uni-small").preset
    quantize_export(target, random_videos(p, 16, seed=11), graphs=("local",), progress=False)
    videos = random_videos(p, 12, seed=12).numpy()
    results = {}
    for precision in ("fp32", "int8"):
        runtime = Runtime.load(target, "onnxruntime", precision=precision)
        runtime.set_thresholds([-math.inf] * p.num_exits)  # every video uses every patch
        results[precision] = runtime.predict(videos)
    fp32, int8 = results["fp32"], results["int8"]
    np.testing.assert_array_equal(int8.cube_starts, fp32.cube_starts)  # frames and box corners
    np.testing.assert_allclose(int8.centres, fp32.centres, rtol=0, atol=1e-5)  # the boxes
    assert not np.array_equal(int8.logits, fp32.logits)  # the int8 local graph ran
    # ... on the right patches: each video's int8 logits are nearer its own fp32 logits than any other
    # video's (measured: at most 0.007 from its own, at least 0.012 from another's)
    distance = np.abs(int8.logits[:, None] - fp32.logits[None]).max(-1)
    assert distance.argmin(axis=1).tolist() == list(range(12))


def test_adafocus_export_reads_the_official_file_with_class_names(actnet_file, tmp_path):
    from click.testing import CliRunner

    from adafocus.cli import export

    path, theirs = actnet_file
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"activity {i}" for i in range(200)) + "\n", encoding="utf-8")
    out = tmp_path / "uni-actnet"
    args = ["--checkpoint", str(path), "--preset", "uni-actnet-p128", "--out", str(out), "--validate-batch", "2"]
    args.append("--no-dense")  # the dense baseline is half this export's time, and nothing here runs it
    short = tmp_path / "short.txt"
    short.write_text("walking\nrunning\n", encoding="utf-8")
    refused = CliRunner().invoke(export, [*args, "--classes", str(short)])
    assert refused.exit_code != 0 and "has 2 class names; preset 'uni-actnet-p128' has 200 classes" in refused.output
    assert not out.exists()
    done = CliRunner().invoke(export, [*args, "--classes", str(names)])
    assert done.exit_code == 0, done.output
    assert "40 left out on purpose" in done.output and "aux_fc.* training-only head" in done.output
    written = Runtime.load(out, "pytorch")  # runs the weights the export carries
    assert set(written.export.manifest["graphs"]) == {"glance", "policy", "crop", "local", "classifier"}
    assert written.class_names[7] == "activity 7" and written.preset.name == "uni-actnet-p128"
    carried = written.backend.modules["classifier"].classifier.glance_head.weight
    assert torch.equal(carried, theirs["classifier.global_classifiers.15.1.weight"])
