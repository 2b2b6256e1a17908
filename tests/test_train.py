import pytest
import torch

from adafocus import AdaFocusError
from adafocus.data.synthetic import SyntheticTask
from adafocus.model import build_model, get_preset, load_checkpoint
from adafocus.model.cubes import plan_cubes
from adafocus.train.cube_gradients import CUBE_FEATURES, deep_feature_cube, pixel_cube, whole_plan_centres
from adafocus.train.trainer import TrainConfig, summed_cross_entropy, train, train_step, training_logits

DEMO = get_preset("demo")


@pytest.fixture(scope="module")
def batch():
    return SyntheticTask(DEMO).batch("train", range(8))


def fresh_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(DEMO).train()


def test_one_step_lowers_the_loss_on_a_fixed_batch(batch):
    videos, labels = batch
    model = fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = train_step(model, optimizer, videos, labels, gradient="deep")
    with torch.no_grad():
        after = float(summed_cross_entropy(training_logits(model, videos, CUBE_FEATURES["deep"]), labels))
    assert after < before - 0.01


@pytest.mark.parametrize("gradient", ["deep", "pixel"])
def test_the_policy_gets_gradients_through_the_cube(batch, gradient):
    videos, labels = batch
    model = fresh_model()
    summed_cross_entropy(training_logits(model, videos, CUBE_FEATURES[gradient]), labels).backward()
    for name, param in model.policy.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.glance.parameters() if p.grad is not None and p.grad.abs().sum() == 0)


def test_no_policy_gradient_when_frozen_or_random(batch):
    videos, labels = batch
    model = fresh_model()
    model.policy.requires_grad_(False)
    summed_cross_entropy(training_logits(model, videos, CUBE_FEATURES["deep"]), labels).backward()
    assert all(p.grad is None for p in model.policy.parameters())
    assert model.local.conv1.weight.grad.abs().sum() > 0  # the rest did learn

    model = fresh_model()
    centres = torch.rand(len(labels), DEMO.max_cubes, 3)
    summed_cross_entropy(training_logits(model, videos, CUBE_FEATURES["crop"], centres), labels).backward()
    assert all(p.grad is None for p in model.policy.parameters())


def test_deep_feature_path_equals_the_crop_at_cell_aligned_positions():
    # With the true cube on a feature-cell boundary (offset 0 on every axis) the interpolated feature
    # is fL on the enlarged crop's first cells; check the offset math against an explicit crop.
    model = fresh_model().eval()
    videos = SyntheticTask(DEMO).batch("val", range(2))[0]
    centres = torch.tensor([[32 / 128, 32 / 128, 0.5 / 8], [0.5, 0.5, 4.5 / 8]], requires_grad=True)
    features = deep_feature_cube(model, videos, centres)
    features.sum().backward()
    assert centres.grad.abs().sum() > 0
    # the first video's cube starts at (0, 0, 0): the enlarged window starts there too, offset 0
    with torch.no_grad():
        cube = videos[:1, 0:2, :, 0:96, 0:96]  # one feature cell (32 px) and one frame larger
        maps = model.local.feature_maps(cube)
    expected = maps[:, :1, :, :2, :2].mean(dim=(1, 3, 4))
    torch.testing.assert_close(features[:1].detach(), expected, rtol=1e-5, atol=1e-5)


def test_pixel_path_equals_the_crop_at_integer_positions():
    model = fresh_model().eval()
    videos = SyntheticTask(DEMO).batch("val", range(1))[0]
    # start = c*L - l/2 = 40 in x and y, frame 3: pixel centres fall exactly on pixels
    centres = torch.tensor([[72 / 128, 72 / 128, 3.5 / 8]])
    with torch.no_grad():
        sampled = pixel_cube(model, videos, centres)
        exact = model.local(videos[:, 3:4, :, 40:104, 40:104])
    torch.testing.assert_close(sampled, exact, rtol=1e-5, atol=1e-5)


def test_crop_training_cuts_the_cubes_inference_cuts(batch):
    # refine (and stage 1's random policy) train on cropped cubes: a plan aiming several frame-wise
    # cubes at one frame must give the frames inference gives (each frame once), not that frame again
    from adafocus.model.reference import adaptive_inference

    videos, _ = batch
    model = fresh_model().eval()
    centres = torch.rand(len(videos), DEMO.max_cubes, 3, generator=torch.Generator().manual_seed(0))
    centres[..., 2] = 0.4  # every cube on frame 3
    with torch.no_grad():
        trained = torch.stack(training_logits(model, videos, CUBE_FEATURES["crop"], centres), dim=1)
        run = adaptive_inference(model, videos, [None] * DEMO.num_exits, centres)
    assert run.cube_starts[0, :, 2].tolist() == [3, 2, 4, 1]
    torch.testing.assert_close(trained, run.step_logits, rtol=1e-5, atol=1e-5)


def test_the_gradient_paths_move_each_cube_to_its_frame_of_the_whole_plan_and_keep_its_gradient():
    # four cubes aimed at frame 3, at different places inside it: inference cuts frames 3, 2, 4, 1
    centres = torch.tensor([[[0.3, 0.6, 3.5 / 8], [0.2, 0.1, 3.2 / 8], [0.9, 0.5, 3.9 / 8], [0.5, 0.5, 3.02 / 8]]])
    centres.requires_grad_(True)
    moved = whole_plan_centres(centres, DEMO)
    assert plan_cubes(moved.detach(), DEMO)[0, :, 2].tolist() == [3, 2, 4, 1]
    # the place inside the frame is kept (the moved one at its edge kept off it), x and y untouched
    torch.testing.assert_close(moved[0, :, 2] * 8, torch.tensor([3.5, 2.2, 4.9, 1.05]))
    torch.testing.assert_close(moved[..., :2], centres[..., :2])
    edge = torch.tensor([[[0.5, 0.5, 3.02 / 8]]])
    assert whole_plan_centres(edge, DEMO)[0, 0, 2] == edge[0, 0, 2]  # a cube on its own frame: not moved
    (moved * torch.arange(1.0, 13.0).view(1, 4, 3)).sum().backward()
    torch.testing.assert_close(centres.grad, torch.arange(1.0, 13.0).view(1, 4, 3))  # a shift: gradient 1
    tsm = get_preset("sthsth-v1-t8")
    assert whole_plan_centres(centres, tsm) is centres  # cubes several frames long may overlap in time


def test_pixel_training_cuts_the_frames_inference_cuts(batch):
    # at integer pixel positions and frame middles the pixel path samples exactly the crop: with
    # every cube aimed at one frame it must see the frames inference runs on, not that frame again
    from adafocus.model.reference import adaptive_inference

    videos, _ = batch
    model = fresh_model().eval()
    g = torch.Generator().manual_seed(0)
    centres = torch.randint(32, 97, (len(videos), DEMO.max_cubes, 3), generator=g) / 128  # starts 0..64
    centres[..., 2] = 3.5 / 8
    with torch.no_grad():
        trained = torch.stack(training_logits(model, videos, CUBE_FEATURES["pixel"], centres), dim=1)
        run = adaptive_inference(model, videos, [None] * DEMO.num_exits, centres)
    assert run.cube_starts[0, :, 2].tolist() == [3, 2, 4, 1]
    torch.testing.assert_close(trained, run.step_logits, rtol=1e-4, atol=1e-4)


def tiny_config(**changes) -> TrainConfig:
    base = dict(steps=4, batch_size=4, val_every=2, val_videos=8, checkpoint_every=2, warmup_steps=1)
    return TrainConfig(**(base | changes))


# stop_at=2 pauses right at the switch to stage 2 (its state still holds stage 1's optimizer);
# stop_at=3 pauses between two history records (the loss of step 2 must count in the record of 4)
@pytest.mark.parametrize("stop_at", [2, 3])
def test_resumed_training_ends_where_an_uninterrupted_run_does(tmp_path, stop_at):
    config = tiny_config(schedule="two-stage", stage_one_share=0.5)
    straight = load_checkpoint(train(DEMO, tmp_path / "a", config, progress=False, log=lambda _: None))

    state = tmp_path / "b"
    assert train(DEMO, state, config, stop_at=stop_at, progress=False, log=lambda _: None) is None
    assert not (state / "model.pt").exists()
    resumed = load_checkpoint(train(DEMO, state, config, resume=True, progress=False, log=lambda _: None))

    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    assert [h["step"] for h in resumed.meta["history"]] == [2, 4]
    for ours, theirs in zip(resumed.meta["history"], straight.meta["history"]):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)


def test_training_refuses_to_overwrite_or_mix_runs(tmp_path):
    train(DEMO, tmp_path, tiny_config(steps=1), progress=False, log=lambda _: None)
    with pytest.raises(AdaFocusError, match="already holds a training run"):
        train(DEMO, tmp_path, tiny_config(steps=1), progress=False, log=lambda _: None)
    with pytest.raises(AdaFocusError, match="other settings"):
        train(DEMO, tmp_path, tiny_config(steps=2, lr=1e-4), resume=True, progress=False, log=lambda _: None)


def test_bad_options_are_refused():
    with pytest.raises(AdaFocusError, match="gradient estimator"):
        TrainConfig(gradient="rl")
    with pytest.raises(AdaFocusError, match="schedule"):
        TrainConfig(schedule="three-stage")


def test_validation_keeps_frozen_parts_in_eval_mode():
    from adafocus.train.trainer import _set_stage, accuracy_per_step

    model = fresh_model()
    _set_stage(model, 2)
    accuracy_per_step(model, SyntheticTask(DEMO), "val", 4)
    assert model.policy.training and not model.local.training and not model.glance.training
    assert not any(m.training for m in model.classifier.modules())


@pytest.mark.parametrize(("schedule", "policy_moves"), [("joint", True), ("two-stage", False)])
def test_schedules_train_what_they_say(tmp_path, schedule, policy_moves):
    # two-stage with 2 of 4 steps in stage 1 (random policy): after 2 steps only fL/fC have moved
    config = tiny_config(schedule=schedule, stage_one_share=0.5)
    train(DEMO, tmp_path, config, stop_at=2, progress=False, log=lambda _: None)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)["model"]
    start = fresh_model().state_dict()
    assert (not torch.equal(state["policy.head.weight"], start["policy.head.weight"])) == policy_moves
    assert not torch.equal(state["local.conv1.weight"], start["local.conv1.weight"])


def test_refine_trains_the_local_encoder_and_classifier_on_the_frozen_policys_cubes(tmp_path, batch):
    from adafocus.train.trainer import _set_stage

    start = fresh_model(seed=3).state_dict()

    def initialise(model) -> dict:
        model.load_state_dict(start)
        return {"checkpoint": "seed 3"}

    train(DEMO, tmp_path, tiny_config(schedule="refine"), start_from=initialise, progress=False, log=lambda _: None)
    state = load_checkpoint(tmp_path / "model.pt", DEMO).model.state_dict()
    frozen = [key for key in start if key.startswith(("glance.", "policy."))]
    assert frozen and all(torch.equal(state[key], start[key]) for key in frozen)  # BN statistics included
    assert not torch.equal(state["local.conv1.weight"], start["local.conv1.weight"])
    assert not torch.equal(state["classifier.step_heads.weight"], start["classifier.step_heads.weight"])

    # the first step's loss (recorded before its update) is the loss on the cubes the policy picks
    one = tiny_config(schedule="refine", steps=1, val_every=1)
    train(DEMO, tmp_path / "one", one, start_from=initialise, progress=False, log=lambda _: None)
    recorded = load_checkpoint(tmp_path / "one" / "model.pt", DEMO).meta["history"][0]["loss"]
    model = fresh_model(seed=3)
    _set_stage(model, 3)
    videos, labels = SyntheticTask(DEMO, seed=one.seed, easy_share=one.easy_share).batch("train", range(one.batch_size))
    with torch.no_grad():
        own = model.policy(model.glance(model.glance_frames(videos))[0])
        elsewhere = torch.rand(own.shape, generator=torch.Generator().manual_seed(0))
        loss = [
            float(summed_cross_entropy(training_logits(model, videos, CUBE_FEATURES["crop"], c), labels))
            for c in (own, elsewhere)
        ]
    assert recorded == pytest.approx(loss[0], rel=1e-5)
    assert abs(loss[1] - loss[0]) > 1e-3  # so the check above can tell the policy's cubes from others


def test_refine_needs_a_trained_policy(tmp_path):
    from click.testing import CliRunner

    from adafocus.cli import main

    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), "--schedule", "refine", "--steps", "1"])
    assert result.exit_code != 0
    assert "--init" in result.output and "refine" in result.output
    assert not (tmp_path / "r").exists()  # refused before anything is written
