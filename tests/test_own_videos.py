"""Preprocessing belongs to the model: the demo was trained on its frames as generated, its export
says so, and every reader of video files follows the manifest. Shown on real files: the synthetic
task written losslessly by `adafocus synth`, classified by adafocus-predict exactly as the same
pixels are classified as tensors."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adafocus.cli import predict
from adafocus.data.synthetic import SyntheticTask
from adafocus.data.video import load_clip, load_clip_for, resize_crop
from adafocus.model.preprocess import normalize
from adafocus.model.presets import Preset, get_preset
from adafocus.runtime import Runtime
from conftest import OWN_VIDEOS, strict_loads

VIDEOS = OWN_VIDEOS
THRESHOLDS = "1.6,1.2,1.4,1.8,inf"


@pytest.fixture(scope="module")
def synth_files(own_videos):
    return own_videos["val"].parent


def test_synth_writes_lossless_files_and_a_labels_list(synth_files):
    task = SyntheticTask(get_preset("demo"), seed=0)
    lines = [
        line.split()
        for line in (synth_files / "labels.txt").read_text(encoding="utf-8").splitlines()
        if not line.startswith("#")
    ]
    assert len(lines) == VIDEOS
    for name, label in lines[:5]:
        raw, info = task.raw_video("val", int(name.split("-")[1].split(".")[0]))
        assert int(label) == info.label
        clip = load_clip(synth_files / name, 8, 128, None)
        assert torch.equal(clip.pixels, torch.from_numpy(np.rint(raw * 255).astype(np.uint8)))  # decoded bit-exact


def test_the_export_declares_the_preprocessing_its_model_was_trained_with(exported):
    demo = exported("demo").manifest["input"]
    assert demo["preprocessing"] == "as-is" and demo["resize_shorter_side"] is None
    sthsth = exported("sthsth-v1-t8").manifest["input"]
    assert sthsth["preprocessing"] == "imagenet" and sthsth["resize_shorter_side"] == 256
    # a preset record written before the field existed takes its registered preset's
    old = {k: v for k, v in get_preset("demo").to_dict().items() if k != "preprocessing"}
    assert Preset.from_dict(old).preprocessing == "as-is"


def test_as_is_crops_without_resampling_and_scales_up_only_what_is_too_small():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)
    crop = resize_crop(frame, 128, None)
    top, left = round((150 - 128) / 2), round((170 - 128) / 2)
    assert torch.equal(crop, torch.from_numpy(frame[top : top + 128, left : left + 128].transpose(2, 0, 1).copy()))
    small = resize_crop(frame[:100, :120], 128, None)  # shorter side 100 < 128: scaled up to 128
    assert small.shape == (3, 128, 128) and small.dtype == torch.uint8
    assert not torch.equal(resize_crop(frame, 128), crop)  # the ImageNet recipe resamples


def test_predict_on_files_matches_the_runtime_on_the_same_pixels(synth_files, exported):
    export = exported("demo")
    result = CliRunner().invoke(predict, [str(synth_files), "--export", str(export.path), "--thresholds", THRESHOLDS])
    assert result.exit_code == 0, result.output
    lines = {line["path"].rsplit("/", 1)[1]: line for line in map(strict_loads, result.stdout.splitlines())}
    task = SyntheticTask(export.preset, seed=0)
    raw = [task.raw_video("val", i) for i in range(VIDEOS)]
    pixels = np.stack([normalize(np.rint(video * 255) / 255) for video, _ in raw]).astype(np.float32)
    labels = np.array([info.label for _, info in raw])
    runtime = Runtime.load(export.path)
    runtime.set_thresholds([1.6, 1.2, 1.4, 1.8, float("inf")])
    expected = runtime.predict(pixels)
    got = [lines[f"val-{i:06d}.mkv"] for i in range(VIDEOS)]
    same = [
        (g["class_index"], g["exit_step"]) == (int(c), int(e))
        for g, c, e in zip(got, expected.prediction, expected.exit_step)
    ]
    assert sum(same) >= VIDEOS - 1, f"{VIDEOS - sum(same)} videos differ"  # one may sit on a threshold
    file_accuracy = np.mean([g["class_index"] == y for g, y in zip(got, labels)])
    assert abs(file_accuracy - np.mean(expected.prediction == labels)) <= 0.01
    assert file_accuracy > 0.3  # far from what resampling the glyphs gave (24.5 % on 200 videos)
    assert len(set(expected.exit_step.tolist())) >= 3
    # the reader follows the export's preset: the demo's frames are used as they are
    clip = load_clip_for(synth_files / "val-000000.mkv", export.preset)
    np.testing.assert_array_equal(clip.frames.numpy(), pixels[0])
