"""The user's own labelled videos: the list formats, label checks before any decoding, broken files
left out (and --max-bad), calibration and evaluation from real files against the same videos as
tensors, calibration on a deployed engine, and the cache of step outputs."""

import hashlib
import json
import os
import re
import shutil
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import adafocus.data.video
from adafocus.calibration.calibrate import calibrate_export, collect
from adafocus.cli import calibrate, main
from adafocus.data.labelled import DecodedBatches, decode_ahead, read_labelled
from adafocus.data.synthetic import SyntheticTask
from adafocus.errors import AdaFocusError
from adafocus.export.manifest import open_export, update_manifest
from adafocus.model.preprocess import normalize
from adafocus.runtime import Runtime
from adafocus.train.sources import FileSource
from adafocus.weights import DEMO_PIXEL, builtin_checkpoint
from conftest import OWN_VIDEOS, strict_loads


@pytest.fixture
def decodes(monkeypatch):
    """Counts the videos decoded (the one function every reader of files goes through)."""
    calls = []
    real = adafocus.data.video.load_clip_for

    def counting(path, preset, **options):
        calls.append(str(path))
        return real(path, preset, **options)

    monkeypatch.setattr(adafocus.data.video, "load_clip_for", counting)
    return calls


def as_tensors(split: str, preset):
    """The fixture's videos as tensors: the task's frames rounded to 8 bits, as the files hold them."""
    task = SyntheticTask(preset, seed=0)
    raw = [task.raw_video(split, i) for i in range(OWN_VIDEOS)]
    videos = np.stack([normalize(np.rint(v * 255) / 255) for v, _ in raw]).astype(np.float32)
    return videos, np.array([info.label for _, info in raw])


def test_every_list_format_names_the_same_videos_and_labels(own_videos, exported):
    classes = exported("demo").class_names
    listed = read_labelled(own_videos["val"], classes)
    from_csv = read_labelled(own_videos["csv"], classes, root=own_videos["root"])
    tree = read_labelled(own_videos["tree"], classes)
    assert len(listed) == len(from_csv) == len(tree) == OWN_VIDEOS
    assert [p.rsplit("/", 1)[1] for p in listed.paths] == [p.rsplit("/", 1)[1] for p in from_csv.paths]
    np.testing.assert_array_equal(listed.labels, from_csv.labels)
    by_name = dict(zip((p.rsplit("/", 1)[1] for p in tree.paths), tree.labels.tolist()))  # the tree is by class
    assert by_name == dict(zip((p.rsplit("/", 1)[1] for p in listed.paths), listed.labels.tolist()))
    _, labels = as_tensors("val", exported("demo").preset)
    np.testing.assert_array_equal(listed.labels, labels)


def test_label_problems_are_one_error_before_anything_is_decoded(own_videos, exported, tmp_path, decodes):
    classes = exported("demo").class_names
    (tmp_path / "bad.csv").write_text(
        "path,label\nval/val-000000.mkv,glyph-3\nval/val-000001.mkv,cat\n", encoding="utf-8"
    )
    with pytest.raises(AdaFocusError, match=r"(?s)line 3: 'cat'.*nothing was decoded"):
        read_labelled(tmp_path / "bad.csv", classes, root=own_videos["root"])
    (tmp_path / "bad.txt").write_text(f"# a comment\n{own_videos['val'].parent}/val-000000.mkv 10\n", encoding="utf-8")
    with pytest.raises(AdaFocusError, match=r"(?s)line 2: '10'.*indices 0\.\.9"):
        read_labelled(tmp_path / "bad.txt", classes)
    tree = tmp_path / "tree"
    shutil.copytree(own_videos["tree"], tree)
    (tree / "glyph-0").rename(tree / "glyph-zero")
    with pytest.raises(AdaFocusError, match=r"not classes of the model: glyph-zero; classes without a folder: glyph-0"):
        read_labelled(tree, classes)
    assert decodes == []


def test_broken_files_are_named_and_left_out_and_max_bad_refuses(own_videos, demo_copy, tmp_path, decodes):
    folder = own_videos["val"].parent
    truncated = tmp_path / "cut.mkv"
    truncated.write_bytes((folder / "val-000000.mkv").read_bytes()[:300])
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n", encoding="utf-8")
    good = [f"{folder}/val-{i:06d}.mkv {i % 10}" for i in range(1, 39)]
    lines = [f"{truncated} 0", f"{text} 1", *good]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*lines, f"{folder}/val-000039.mkv glyph-3"]) + "\n", encoding="utf-8")
    result = CliRunner().invoke(calibrate, [str(demo_copy), "--data", str(listing)])
    assert result.exit_code != 0 and "line 41: 'glyph-3'" in result.output  # 1-based, after nothing decoded
    assert decodes == []

    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = CliRunner().invoke(calibrate, [str(demo_copy), "--data", str(listing), "--json", "--max-bad", "0.1"])
    assert result.exit_code == 0, result.output
    report = strict_loads(result.stdout)
    assert f"left out {truncated}" in result.stderr and f"left out {text}" in result.stderr
    assert "38 used, 2 left out (see above)" in result.stderr
    assert report["calibration_set"] == {
        "list": str(listing),
        "sha256": read_labelled(listing, open_export(demo_copy).class_names).digest(),
        "videos": 40,
        "used": 38,
        "left_out": 2,
    }
    assert [entry["path"] for entry in report["left_out"]["calibration"]] == [str(truncated), str(text)]

    result = CliRunner().invoke(calibrate, [str(demo_copy), "--data", str(listing), "--max-bad", "0"])
    assert result.exit_code != 0 and "more than 0% of its 40 videos cannot be used" in result.output


def test_calibration_from_files_matches_calibration_from_the_same_videos_as_tensors(own_videos, exported, tmp_path):
    preset = exported("demo").preset
    from_files, from_tensors = (shutil.copytree(exported("demo").path, tmp_path / n) for n in ("files", "tensors"))
    args = [str(from_files), "--data", str(own_videos["val"]), "--heldout", str(own_videos["test"]), "--json"]
    result = CliRunner().invoke(calibrate, args)
    assert result.exit_code == 0, result.output
    files = strict_loads(result.stdout)
    tensors = calibrate_export(from_tensors, as_tensors("val", preset), as_tensors("test", preset), progress=False)
    assert len(files["budgets"]) == len(tensors.table) >= 4
    for a, b in zip(files["budgets"], tensors.table):
        np.testing.assert_allclose(a["thresholds"], b["thresholds"], rtol=1e-5)  # lossless: only float noise
        assert abs(a["heldout_accuracy"] - b["heldout_accuracy"]) <= 0.03
    assert open_export(from_files).budgets == files["budgets"]  # written into the manifest


def test_evaluate_from_files_through_onnxruntime_is_what_the_loop_does(own_videos, exported, tmp_path):
    export = calibrate_export(
        shutil.copytree(exported("demo").path, tmp_path / "demo"),
        as_tensors("val", exported("demo").preset),
        progress=False,
    ).export
    args = ["evaluate", "--export", str(export.path), "--data", str(own_videos["test"]), "--json"]
    result = CliRunner().invoke(main, [*args, "--plot", str(tmp_path / "front.png")])
    assert result.exit_code == 0, result.output
    report = strict_loads(result.stdout)
    assert report["videos"] == OWN_VIDEOS and report["left_out"] == [] and report["engine"]["backend"] == "onnxruntime"
    assert len(report["accuracy_per_step"]) == export.preset.num_exits
    assert len(report["budgets"]) == len(export.budgets) and (tmp_path / "front.png").stat().st_size > 10_000
    videos, labels = as_tensors("test", export.preset)
    runtime = Runtime.load(export.path, "onnxruntime")
    for t in range(export.preset.num_exits):  # t cubes for every video: thresholds -inf before t, +inf at t
        runtime.set_thresholds([-np.inf] * t + [np.inf] * (export.preset.num_exits - t))
        accuracy = float((runtime.predict(videos).prediction == labels).mean())
        assert abs(report["accuracy_per_step"][t] - accuracy) <= 1 / OWN_VIDEOS
    for budget in report["budgets"][:: max(1, len(report["budgets"]) // 3)]:  # the loop at the budget's thresholds
        runtime.set_thresholds(budget["thresholds"])
        result = runtime.predict(videos)
        assert abs(budget["accuracy"] - float((result.prediction == labels).mean())) <= 1 / OWN_VIDEOS
        assert abs(budget["gflops"] - float(result.gflops.mean())) <= 0.02 * budget["gflops"]


def test_calibrating_on_a_deployed_engine_uses_its_own_entropies(own_videos, exported):
    export = exported("demo")
    videos = read_labelled(own_videos["val"], export.class_names)
    batches = DecodedBatches(videos, export.preset, batch_size=32, progress=False)
    reference = collect(export, batches, progress=False)
    engine = collect(export, batches, progress=False, engine=Runtime.load(export.path, "onnxruntime"))
    np.testing.assert_allclose(engine.entropy, reference.entropy, atol=1e-4)
    assert (engine.predictions == reference.predictions).mean() >= 0.99
    assert not np.array_equal(engine.entropy, reference.entropy)  # computed by ONNX Runtime, not copied


def test_the_cache_spares_decoding_and_is_refused_when_the_export_changes(own_videos, demo_copy, tmp_path, decodes):
    cache = tmp_path / "outputs.json"
    args = [str(demo_copy), "--data", str(own_videos["val"]), "--cache", str(cache), "--json"]
    first = CliRunner().invoke(calibrate, args)
    assert first.exit_code == 0, first.output
    assert (
        len(decodes) == OWN_VIDEOS
        and json.loads(cache.read_text(encoding="utf-8"))["format"] == "adafocus-step-outputs/1"
    )
    second = CliRunner().invoke(calibrate, [*args, "--max-drop", "0.05"])
    assert second.exit_code == 0, second.output
    assert len(decodes) == OWN_VIDEOS and "from " + str(cache) + " (nothing decoded)" in second.stderr
    assert strict_loads(second.stdout)["budgets"] == strict_loads(first.stdout)["budgets"]

    other = tmp_path / "model.pt"  # the same preset and classes, other weights: the export changed
    shutil.copy(builtin_checkpoint(DEMO_PIXEL), other)
    update_manifest(demo_copy, lambda manifest: None, new_files={"model.pt": other})
    third = CliRunner().invoke(calibrate, args)
    assert third.exit_code == 0, third.output
    assert len(decodes) == 2 * OWN_VIDEOS and "collecting again" in third.stderr


def test_int8_ranges_from_your_videos(own_videos, demo_copy):
    args = [str(demo_copy), "--data", str(own_videos["csv"]), "--heldout", str(own_videos["test_csv"]), "--int8"]
    args += ["--int8-data", str(own_videos["csv"]), "--root", str(own_videos["root"]), "--int8-videos", "24"]
    result = CliRunner().invoke(calibrate, [*args, "--json"])
    assert result.exit_code == 0, result.output
    record = open_export(demo_copy).int8
    assert record["list"] == str(own_videos["csv"]) and record["calibration_videos"] == 24
    assert record["heldout"]["set"] == str(own_videos["test_csv"]) and record["heldout"]["videos"] == OWN_VIDEOS
    assert record["heldout"]["class_changed"] < 0.5  # the ranges fit the videos: int8 mostly agrees with fp32
    int8 = Runtime.load(demo_copy, "onnxruntime", precision="int8")
    videos, _ = as_tensors("test", int8.preset)
    assert int8.predict(videos[:8]).exit_step.shape == (8,)


def test_decode_ahead_keeps_the_order_hands_out_errors_and_bounds_the_work():
    """The one decode-ahead pool of DecodedBatches and adafocus-predict: loads run at most `ahead`
    items beyond the one handed out, a failing item comes out in its place, closing stops the rest."""
    started, lock = [], threading.Lock()

    def load(i):
        with lock:
            started.append(i)
        if i == 3:
            raise ValueError("broken")
        return i * 10

    decoded = decode_ahead(range(1000), load, workers=2, ahead=4)
    first = [next(decoded) for _ in range(5)]
    assert [item for item, _, _ in first] == [0, 1, 2, 3, 4]
    assert [result for _, result, _ in first] == [0, 10, 20, None, 40]
    assert isinstance(first[3][2], ValueError) and all(e is None for i, _, e in first if i != 3)
    decoded.close()
    assert len(started) <= 5 + 4  # five handed out, at most four ahead: never the whole input


def write_list(path, own_videos, labels) -> str:
    """A `path label` list of the first len(labels) val videos, with these label fields."""
    folder = own_videos["val"].parent
    lines = [f"{folder}/val-{i:06d}.mkv {label}" for i, label in enumerate(labels)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def multi_hot(rows, classes: int = 10) -> np.ndarray:
    expected = np.zeros((len(rows), classes), bool)
    for row, indices in enumerate(rows):
        expected[row, indices] = True
    return expected


def test_several_labels_make_a_multi_label_set_of_multi_hot_rows(own_videos, exported, tmp_path):
    classes = exported("demo").class_names
    expected = multi_hot([[1, 7], [3], [0, 2, 9]])
    listed = read_labelled(write_list(tmp_path / "multi.txt", own_videos, ["7;1", "3", "2;0;9"]), classes)
    assert listed.multi_label and listed.labels.dtype == np.bool_ and listed.labels.shape == (3, 10)
    np.testing.assert_array_equal(listed.labels, expected)
    (tmp_path / "multi.csv").write_text(
        "path,label\nval/val-000000.mkv,glyph-7;glyph-1\n"
        'val/val-000001.mkv,glyph-3\nval/val-000002.mkv,"2; 0;glyph-9"\n',
        encoding="utf-8",
    )
    from_csv = read_labelled(tmp_path / "multi.csv", classes, root=own_videos["root"])
    assert from_csv.multi_label and from_csv.paths == listed.paths
    np.testing.assert_array_equal(from_csv.labels, expected)

    for single in (read_labelled(own_videos["val"], classes), read_labelled(own_videos["tree"], classes)):
        assert not single.multi_label and single.labels.dtype == np.int64 and single.labels.shape == (OWN_VIDEOS,)
    (tmp_path / "odd.csv").write_text("path,label\na.mkv,x;y\nb.mkv,z\n", encoding="utf-8")
    odd = read_labelled(tmp_path / "odd.csv", ["z", "x;y"])  # a class name that holds `;` is one label
    assert not odd.multi_label and odd.labels.tolist() == [1, 0]


def test_every_unknown_part_of_several_labels_is_named_with_its_line(own_videos, exported, tmp_path, decodes):
    classes = exported("demo").class_names
    listing = write_list(tmp_path / "bad.txt", own_videos, ["1;12", "3", "99;4;x"])
    with pytest.raises(AdaFocusError, match=r"3 labels are not a class.*line 1: '12', line 3: '99', line 3: 'x'"):
        read_labelled(listing, classes)
    (tmp_path / "bad.csv").write_text("path,label\nval/val-000000.mkv,glyph-1;cat\n", encoding="utf-8")
    with pytest.raises(AdaFocusError, match=r"(?s)1 label is not a class.*line 2: 'cat'.*class names"):
        read_labelled(tmp_path / "bad.csv", classes, root=own_videos["root"])
    assert decodes == []


@pytest.mark.parametrize(
    ("field", "problem"),
    [("1;", "'1;' has an empty label"), (";", "';' has an empty label"), ("1;;2", "has an empty label")]
    + [("3;3", "'3;3' gives 'glyph-3' twice"), ("glyph-3;3", "gives 'glyph-3' twice")],
)
def test_an_empty_part_or_a_class_twice_is_an_error_naming_the_line(
    own_videos, exported, tmp_path, decodes, field, problem
):
    classes = exported("demo").class_names
    if field.startswith("glyph"):  # by name: a CSV
        listing = tmp_path / "bad.csv"
        listing.write_text(f"path,label\nval/val-000000.mkv,4\nval/val-000001.mkv,{field}\n", encoding="utf-8")
        number = 3
    else:
        listing, number = write_list(tmp_path / "bad.txt", own_videos, ["4", field]), 2
    with pytest.raises(AdaFocusError) as raised:
        read_labelled(listing, classes, root=own_videos["root"] if str(listing).endswith(".csv") else None)
    assert f"{listing}: 1 field of several labels is malformed (line {number}: " in raised.value.what
    assert problem in raised.value.what and "each class once and no part empty" in raised.value.fix
    assert decodes == []


def test_malformed_fields_are_all_named_and_a_space_after_the_separator_is_refused(own_videos, exported, tmp_path):
    classes = exported("demo").class_names
    listing = write_list(tmp_path / "bad.txt", own_videos, ["2;", "5", "6;6;1"])
    with pytest.raises(AdaFocusError, match=r"2 fields .* are malformed \(line 1: '2;' .*, line 3: '6;6;1' gives"):
        read_labelled(listing, classes)
    (tmp_path / "spaced.txt").write_text(f"{own_videos['val'].parent}/val-000000.mkv 2; 5\n", encoding="utf-8")
    with pytest.raises(AdaFocusError, match=r"spaced\.txt:1: a space after `;`"):
        read_labelled(tmp_path / "spaced.txt", classes)


def test_decoded_batches_of_a_multi_label_set_give_bool_rows(own_videos, exported, tmp_path):
    preset, classes = exported("demo").preset, exported("demo").class_names
    broken = tmp_path / "notes.mp4"
    broken.write_text("not a video\n", encoding="utf-8")
    listing = write_list(tmp_path / "multi.txt", own_videos, ["1;7", "3", "0;2;9", "5", "4;8"])
    with open(listing, "a", encoding="utf-8") as f:
        f.write(f"{broken} 6;2\n")
    videos = read_labelled(listing, classes)
    left_out = []
    batches = list(DecodedBatches(videos, preset, batch_size=2, max_bad=0.5, progress=False, log=left_out.append))
    assert [tuple(labels.shape) for _, labels in batches] == [(2, 10), (2, 10), (1, 10)]
    assert all(labels.dtype == torch.bool for _, labels in batches) and len(left_out) == 1
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in batches]), videos.labels[:5])
    assert [frames.shape[0] for frames, _ in batches] == [2, 2, 1]

    single = read_labelled(write_list(tmp_path / "single.txt", own_videos, ["1", "3", "0"]), classes)
    (_, labels), *_ = DecodedBatches(single, preset, batch_size=4, progress=False)
    assert labels.dtype == torch.int64 and labels.tolist() == [1, 3, 0]


def old_digest(paths, labels) -> str:
    """What digest() computes, written out: `abspath<TAB>label<TAB>size mtime_ns` per video."""
    h = hashlib.sha256()
    for path, label in zip(paths, labels):
        stat = os.stat(path)
        h.update(f"{os.path.abspath(path)}\t{label}\t{stat.st_size} {stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def test_digest_is_unchanged_for_single_labels_and_follows_a_rows_label_set(own_videos, exported, tmp_path):
    classes = exported("demo").class_names
    single = read_labelled(own_videos["val"], classes)
    assert single.digest() == old_digest(single.paths, single.labels.tolist())
    multi = read_labelled(write_list(tmp_path / "a.txt", own_videos, ["7;1", "3", "2;0;9"]), classes)
    assert multi.digest() == old_digest(multi.paths, ["1;7", "3", "0;2;9"])
    reordered = read_labelled(write_list(tmp_path / "b.txt", own_videos, ["1;7", "3", "9;2;0"]), classes)
    changed = read_labelled(write_list(tmp_path / "c.txt", own_videos, ["1;7", "3", "0;2"]), classes)
    assert reordered.digest() == multi.digest() != changed.digest()


def test_training_refuses_a_multi_label_set_before_decoding(own_videos, exported, tmp_path, decodes):
    preset, classes = exported("demo").preset, exported("demo").class_names
    listing = write_list(tmp_path / "multi.txt", own_videos, ["1;7", "3", "0;2;9"])
    multi, single = read_labelled(listing, classes), read_labelled(own_videos["val"], classes)
    said = rf"{re.escape(listing)}: a multi-label set, 2 of its 3 videos with several classes.*one label per video"
    with pytest.raises(AdaFocusError, match=said):
        FileSource(multi, None, preset, seed=0)
    with pytest.raises(AdaFocusError, match=said):
        FileSource(single, multi, preset, seed=0)
    heldout = read_labelled(own_videos["test"], classes)
    assert FileSource(single, heldout, preset, seed=0).class_names == list(classes)
    result = CliRunner().invoke(main, ["train", "--data", listing, "--out", str(tmp_path / "run"), "--steps", "1"])
    assert result.exit_code != 0 and "training takes one label per video" in result.output
    assert decodes == [] and not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.parametrize(
    "name, text",
    [
        ("set.csv", "path,label\nclips/a.mp4,dog\nclips/b.mp4,cat\n"),
        ("set.txt", "path,label\nclips/a.mp4,dog\nclips/b.mp4,cat\n"),  # a CSV by its header
        ("set.txt", "clips/a.mp4 1\nclips/b.mp4 0\n"),
    ],
)
def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path, name, text):
    """Windows editors and Excel's "CSV UTF-8" start the file with one (U+FEFF)."""
    (tmp_path / name).write_text(text, encoding="utf-8-sig")
    assert (tmp_path / name).read_bytes()[:3] == b"\xef\xbb\xbf", "precondition: the file starts with a BOM"
    videos = read_labelled(tmp_path / name, ("cat", "dog"))
    assert videos.paths == (str(tmp_path / "clips" / "a.mp4"), str(tmp_path / "clips" / "b.mp4"))
    assert videos.labels.tolist() == [1, 0]


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_a_video_listed_twice_is_an_error_naming_the_lines(tmp_path, suffix):
    # the same file twice (here once relative, once absolute) with two different labels
    again = tmp_path / "v" / "a.mp4"
    if suffix == ".txt":
        text = f"v/a.mp4 0\nv/b.mp4 1\n{again} 1\n"
    else:
        text = f"path,label\nv/a.mp4,0\nv/b.mp4,1\n{again},1\n"
    listing = tmp_path / f"set{suffix}"
    listing.write_text(text, encoding="utf-8")
    with pytest.raises(
        AdaFocusError,
        match=r"1 video is listed more than once \(line 4 repeats line 2: .*a\.mp4\)"
        if suffix == ".csv"
        else r"1 video is listed more than once \(line 3 repeats line 1: .*a\.mp4\)",
    ):
        read_labelled(listing, ["x", "y"])
