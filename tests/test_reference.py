import math

import pytest
import torch

from adafocus import AdaFocusError
from adafocus.model import adaptive_inference, crop_cubes, entropy, plan_cubes
from adafocus.model.flops import count_flops
from conftest import random_videos

NEVER = -1.0  # entropy is >= 0, so no video exits before the last cube
PRESETS = ["demo", "sthsth-v1-t8", "activitynet-p96"]


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Within tol of the logit scale. The batch size changes the order in which the conv kernels
    sum, so batched and single runs differ by float32 rounding: ~1e-6 of the largest logit, and
    random-weight paper presets have logits up to ~25."""
    scale = max(1.0, float(expected.abs().max()))
    error = float((actual - expected).abs().max())
    assert error <= tol * scale, f"max |diff| {error:.2e} > {tol:g} x logit scale {scale:.1f}"


def midpoint_thresholds(step_entropy: torch.Tensor, min_gap: float = 2e-4) -> list[float]:
    """Per step, a threshold in the widest gap between neighbouring entropies near the median, so
    that about half of the videos exit there and none sits within min_gap/2 of it. A step whose
    entropies are all closer than that (random weights make some steps flat) gets no exits."""
    thresholds = []
    for values in step_entropy.T[:-1]:  # after the last cube every video exits anyway
        v = values.sort().values
        lo, hi = len(v) // 4, max(len(v) * 3 // 4, len(v) // 4 + 1)
        gaps = v[lo + 1 : hi + 1] - v[lo:hi]
        j = lo + int(gaps.argmax())
        thresholds.append(float(v[j] + v[j + 1]) / 2 if gaps.max() > min_gap else NEVER)
    return thresholds + [NEVER]


@pytest.mark.parametrize("name", PRESETS)
def test_high_thresholds_exit_every_video_at_the_glance(model_of, name):
    model = model_of(name)
    p = model.preset
    result = adaptive_inference(model, random_videos(p, 3), [math.log(p.num_classes)] * p.num_exits)
    assert result.exit_step.tolist() == [0, 0, 0]
    assert result.centres.isnan().all() and (result.cube_starts == -1).all()  # the policy never ran
    assert result.step_logits[:, 1:].isnan().all()
    assert result.gflops.tolist() == [pytest.approx(count_flops(p).exit_cumulative[0])] * 3


@pytest.mark.parametrize("name", PRESETS)
def test_negative_thresholds_use_all_cubes(model_of, name):
    model = model_of(name)
    p = model.preset
    result = adaptive_inference(model, random_videos(p, 2), [NEVER] * p.num_exits)
    assert result.exit_step.tolist() == [p.max_cubes] * 2
    assert not result.step_logits.isnan().any()
    assert result.gflops.tolist() == [pytest.approx(count_flops(p).exit_cumulative[-1])] * 2
    if p.frame_wise:
        for starts in result.cube_starts:
            assert len(set(starts[:, 2].tolist())) == p.max_cubes


@pytest.mark.parametrize("name", PRESETS)
def test_batched_reference_equals_per_video_runs(model_of, name):
    model = model_of(name)
    p = model.preset
    batch = 8 if p.name != "demo" else 16
    videos = random_videos(p, batch, seed=3)
    every_step = adaptive_inference(model, videos, [NEVER] * p.num_exits)
    thresholds = midpoint_thresholds(entropy(every_step.step_logits))

    batched = adaptive_inference(model, videos, thresholds)
    exits = batched.exit_step.tolist()
    assert len(set(exits)) >= 2, f"want a mix of exit steps, got {exits}"
    for i in range(batch):
        alone = adaptive_inference(model, videos[i : i + 1], thresholds)
        assert alone.exit_step.item() == exits[i]
        assert_logits_close(alone.logits[0], batched.logits[i])
        torch.testing.assert_close(alone.probs[0], batched.probs[i], rtol=0, atol=1e-5)
        assert alone.cube_starts[0].tolist() == batched.cube_starts[i].tolist()
        assert alone.gflops.item() == batched.gflops[i].item()


def test_exit_rule_and_compaction(model_of):
    model = model_of("demo")
    p = model.preset
    videos = random_videos(p, 16, seed=5)
    every_step = adaptive_inference(model, videos, [NEVER] * p.num_exits)
    h = entropy(every_step.step_logits)
    thresholds = midpoint_thresholds(h)
    result = adaptive_inference(model, videos, thresholds)
    for i, step in enumerate(result.exit_step.tolist()):
        passes = [t for t in range(p.max_cubes) if h[i, t] <= thresholds[t]]
        assert step == (passes[0] if passes else p.max_cubes)  # the first step whose entropy passes
        assert not result.step_logits[i, : step + 1].isnan().any()
        assert result.step_logits[i, step + 1 :].isnan().all()  # nothing computed after the exit
        assert_logits_close(result.logits[i], every_step.step_logits[i, step])
        info = result.video(i)
        assert info["exit_step"] == step and len(info["centres"]) == step and len(info["cube_starts"]) == step
        assert info["gflops"] == pytest.approx(count_flops(p).exit_cumulative[step])


def test_reference_follows_the_pipeline_by_hand(model_of):
    # Step 1 logits rebuilt from the sub-networks directly, outside the reference loop.
    model = model_of("sthsth-v1-t8")
    p = model.preset
    videos = random_videos(p, 2, seed=7)
    result = adaptive_inference(model, videos, [NEVER] * p.num_exits)
    with torch.no_grad():
        maps, pooled = model.glance(videos[:, 1::2])  # glance frames 1, 3, ..., 15
        logits0, g = model.classifier.glance(pooled)
        starts = plan_cubes(model.policy(maps), p)
        cubes = torch.stack(
            [
                videos[i, t0 : t0 + 8, :, y0 : y0 + 128, x0 : x0 + 128]
                for i, (x0, y0, t0) in enumerate(starts[:, 0].tolist())
            ]
        )
        logits1, _ = model.classifier.step(model.local(cubes), torch.zeros_like(g), g, torch.ones(2, dtype=torch.int64))
    torch.testing.assert_close(result.step_logits[:, 0], logits0)
    assert_logits_close(result.step_logits[:, 1], logits1)
    assert result.cube_starts.tolist() == starts.tolist()
    torch.testing.assert_close(crop_cubes(videos, torch.arange(2), starts[:, 0], 128, 8), cubes)


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (lambda v: v[:, :-1], r"shape \(2, 7, 3, 128, 128\).*takes \(B, 8, 3, 128, 128\)"),
        (lambda v: v.double(), "dtype torch.float64"),
        (lambda v: v.index_put_((torch.tensor([1]),), torch.tensor(math.nan)), r"NaN or inf values \(videos \[1\]\)"),
        (lambda v: v.numpy(), "must be a torch.Tensor"),
    ],
)
def test_bad_videos_get_one_clear_error(model_of, make_bad, message):
    model = model_of("demo")
    p = model.preset
    with pytest.raises(AdaFocusError, match=message):
        adaptive_inference(model, make_bad(random_videos(p, 2)), [NEVER] * p.num_exits)


def test_wrong_threshold_count_is_refused(model_of):
    model = model_of("demo")
    with pytest.raises(AdaFocusError, match="needs 5 exit thresholds"):
        adaptive_inference(model, random_videos(model.preset, 1), [0.5] * 4)
    with pytest.raises(AdaFocusError, match="needs 5 exit thresholds"):
        adaptive_inference(model, random_videos(model.preset, 1), [math.nan] * 5)
