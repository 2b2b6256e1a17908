"""Training on the user's labelled video files: a DataLoader over real files lowers the loss, batches
are a pure function of (seed, step), --init fine-tunes, and torchvision ImageNet state dicts on disk
start the encoders (a missing or mismatched file is one clear error)."""

import dataclasses

import pytest
import torch
import torchvision
from click.testing import CliRunner

from adafocus.cli import main
from adafocus.data.labelled import read_labelled
from adafocus.errors import AdaFocusError
from adafocus.model import build_model, get_preset
from adafocus.model.checkpoint import default_class_names, load_checkpoint
from adafocus.model.pretrained import load_encoder_weights, torchvision_key
from adafocus.model.tsm import ShiftThen
from adafocus.train.sources import FileSource, _StepBatches
from adafocus.train.trainer import TrainConfig, train
from adafocus.weights import builtin_checkpoint


def test_thirty_steps_on_files_lower_the_loss(own_videos, tmp_path):
    preset = get_preset("demo")
    classes = default_class_names(preset)
    videos = read_labelled(own_videos["val"], classes)
    heldout = read_labelled(own_videos["test"], classes)
    val = dataclasses.replace(heldout, paths=heldout.paths[:32], labels=heldout.labels[:32])
    source = FileSource(videos, val, preset, seed=0, workers=2)
    config = TrainConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=5, val_every=10, seed=0)
    path = train(preset, tmp_path / "run", config, source=source, progress=False, log=lambda _: None)
    trained = load_checkpoint(path)
    losses = [entry["loss"] for entry in trained.meta["history"]]  # mean loss over steps 1-10, 11-20, 21-30
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert trained.meta["task"] == "files" and trained.meta["train_data"]["sha256"] == videos.digest()
    assert len(trained.meta["history"][-1]["val_accuracy_per_step"]) == preset.num_exits


def test_validation_videos_that_are_trained_on_are_refused(tmp_path):
    from adafocus.data.labelled import LabelledVideos

    preset = get_preset("demo")
    classes = tuple(default_class_names(preset))
    paths = tuple(str(tmp_path / f"{i}.mp4") for i in range(6))
    train_set = LabelledVideos("train.txt", paths[:4], torch.arange(4).numpy(), classes)
    val_set = LabelledVideos("val.txt", paths[3:], torch.arange(3).numpy(), classes)  # 3.mp4 in both
    with pytest.raises(AdaFocusError, match=r"1 of the 3 validation videos of val.txt are also in the training set"):
        FileSource(train_set, val_set, preset, seed=0)
    disjoint = dataclasses.replace(val_set, paths=paths[4:], labels=val_set.labels[:2])
    assert FileSource(train_set, disjoint, preset, seed=0).val is disjoint


def test_validation_decoding_shows_progress_when_training_does(tmp_path):
    # validating on thousands of files takes minutes: train(progress=True) asks for a bar
    from adafocus.data.labelled import LabelledVideos

    preset = get_preset("demo")
    classes = tuple(default_class_names(preset))
    paths = tuple(str(tmp_path / f"{i}.mp4") for i in range(4))
    train_set = LabelledVideos("train.txt", paths[:2], torch.arange(2).numpy(), classes)
    val_set = LabelledVideos("val.txt", paths[2:], torch.arange(2).numpy(), classes)
    source = FileSource(train_set, val_set, preset, seed=0)
    assert source.validation(progress=True).progress and not source.validation(progress=False).progress


def test_file_batches_are_a_function_of_seed_and_step():
    whole = list(_StepBatches(10, 4, seed=3, start=0, stop=6))
    resumed = list(_StepBatches(10, 4, seed=3, start=4, stop=6))
    assert whole[4:] == resumed
    visits = [index for batch in whole[:5] for index, _ in batch]  # 20 draws = two epochs of 10
    assert sorted(visits[:10]) == list(range(10)) and sorted(visits[10:]) == list(range(10))
    assert len({seed for batch in whole for _, seed in batch}) == 24  # every clip its own random offsets


def test_init_fine_tunes_a_checkpoint_on_files(own_videos, tmp_path):
    args = ["train", "--data", str(own_videos["tree"]), "--steps", "2", "--batch-size", "8", "--val-every", "2"]
    scratch = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "scratch")])
    tuned = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "tuned"), "--init", str(builtin_checkpoint())])
    assert scratch.exit_code == 0 and tuned.exit_code == 0, scratch.output + tuned.output
    a, b = (load_checkpoint(tmp_path / name / "model.pt") for name in ("scratch", "tuned"))
    assert b.meta["initialised_from"] == {"checkpoint": str(builtin_checkpoint())}
    assert a.class_names == b.class_names == load_checkpoint(builtin_checkpoint()).class_names  # the tree's folders
    assert b.meta["history"][-1]["loss"] < a.meta["history"][-1]["loss"] - 1  # it starts from a trained model


def test_imagenet_state_dicts_on_disk_start_the_encoders(tmp_path):
    torch.manual_seed(1)
    mobilenet, resnet = torchvision.models.mobilenet_v2(), torchvision.models.resnet50()
    torch.save(mobilenet.state_dict(), tmp_path / "mobilenet_v2.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}}, tmp_path / "resnet50.pth")
    model = build_model(get_preset("sthsth-v1"))  # TSM: the first conv of each residual branch is wrapped
    report = load_encoder_weights(model.glance, tmp_path / "mobilenet_v2.pth", "glance")
    assert report["skipped"] == ["classifier.1.bias", "classifier.1.weight"]
    load_encoder_weights(model.local, tmp_path / "resnet50.pth", "local")
    for encoder, source in ((model.glance, mobilenet), (model.local, resnet)):
        theirs = source.state_dict()
        for key, value in encoder.state_dict().items():
            assert torch.equal(value, theirs[torchvision_key(key)]), key
    assert isinstance(model.local.layer3[1].conv1, ShiftThen)  # so the names did differ
    with pytest.raises(AdaFocusError, match="does not fit the glance encoder.*keys missing"):
        load_encoder_weights(model.glance, tmp_path / "resnet50.pth", "glance")
    demo = build_model(get_preset("demo"))  # MobileNetV2×0.5: another width
    with pytest.raises(AdaFocusError, match="of another shape"):
        load_encoder_weights(demo.glance, tmp_path / "mobilenet_v2.pth", "glance")


def test_a_missing_weights_file_fails_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run"), "--glance-weights", "nope.pth"])
    assert result.exit_code != 0 and "nope.pth: no such weights file" in result.output
    assert not (tmp_path / "run").exists()
