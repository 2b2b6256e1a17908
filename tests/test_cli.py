import json

import pytest
from click.testing import CliRunner

from adafocus.cli import main


def test_presets_lists_every_preset_and_alias():
    result = CliRunner().invoke(main, ["presets"])
    assert result.exit_code == 0, result.output
    assert "sthsth-v1-t12" in result.output and "demo" in result.output
    assert "sthsth-v1 = sthsth-v1-t12" in result.output
    data = json.loads(CliRunner().invoke(main, ["presets", "--json"]).stdout)
    assert {p["name"] for p in data["presets"]} >= {"activitynet-p96", "diving48-t16", "demo"}


def test_flops_json_has_the_agreed_keys():
    result = CliRunner().invoke(main, ["flops", "sthsth-v1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"glance", "policy", "cube", "exit_cumulative", "dense_baseline"} <= set(data)
    assert len(data["exit_cumulative"]) == 3
    assert 34.4 < data["dense_baseline"] < 35.8


def test_flops_table_and_unknown_preset():
    result = CliRunner().invoke(main, ["flops", "demo"])
    assert result.exit_code == 0 and "exit after 4 cubes" in result.output
    bad = CliRunner().invoke(main, ["flops", "kinetics400"])
    assert bad.exit_code == 1
    assert "unknown preset 'kinetics400'" in bad.output and "Traceback" not in bad.output


def test_calibrate_with_one_heldout_video_prints_a_dash_for_its_spread(exported, tmp_path):
    """One held-out video is a legal set with no standard error of its mean cost."""
    import shutil

    from adafocus.cli.calibrate import calibrate

    target = shutil.copytree(exported("demo").path, tmp_path / "demo")
    result = CliRunner().invoke(calibrate, [str(target), "--videos", "20", "--heldout", "1"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "%" in line and line[:1] in ("*", " ")]
    assert rows and all("—" in row for row in rows)


def test_calibrate_int8_options_need_int8(exported, tmp_path):
    import shutil

    from adafocus.cli.calibrate import calibrate
    from adafocus.export.manifest import open_export

    target = shutil.copytree(exported("demo").path, tmp_path / "demo")
    base = [str(target), "--videos", "8", "--heldout", "0"]
    for option in (["--int8-videos", "16"], ["--int8-videos", "128"], ["--int8-weight-bits", "8"]):
        result = CliRunner().invoke(calibrate, [*base, *option])
        assert result.exit_code == 1, result.output
        assert f"{option[0]} is an option of --int8" in result.output and "add --int8" in result.output
    assert open_export(target).calibration is None  # refused before any work


def test_evaluate_refuses_options_of_the_other_mode(tmp_path):
    """Options that only one of evaluate's two modes reads are refused in the other, before any work
    (the files here are empty: reading one would fail otherwise), even given at their default."""
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "videos.txt").write_text("", encoding="utf-8")
    cases = [
        (["--backend", "pytorch"], "--backend does nothing without --export or --data", "give --export"),
        (["--backend", "onnxruntime"], "--backend does nothing without --export", "give --export"),
        (
            ["--device", "cpu", "--precision", "fp32", "--plot", str(tmp_path / "front.png")],
            "--device, --precision and --plot do nothing without --export",
            "give --export",
        ),
        (
            ["--export", str(tmp_path), "--checkpoint", str(tmp_path / "model.pt")],
            "--checkpoint does nothing with --export or --data",
            "without --export and --data",
        ),
        (
            ["--data", str(tmp_path / "videos.txt"), "--pixel-checkpoint", str(tmp_path / "model.pt")],
            "--pixel-checkpoint does nothing with --export or --data",
            "without --export and --data",
        ),
        (
            ["--data", str(tmp_path / "videos.txt"), "--videos", "10"],
            "--videos does nothing with --data",
            "leave --videos out",
        ),
    ]
    for args, what, fix in cases:
        result = CliRunner().invoke(main, ["evaluate", *args])
        assert result.exit_code == 1, (args, result.output)
        assert what in result.output and fix in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "front.png").exists()


def test_predict_refuses_the_options_of_the_engine_it_does_not_run(tmp_path, monkeypatch):
    """Ray's sizing options without --engine ray, --workers with it, --in-flight without --server: each is
    refused before any work (the built-in export is not even built), not accepted and ignored."""
    import adafocus.builtin

    monkeypatch.setattr(adafocus.builtin, "demo_export", lambda *a, **k: pytest.fail("the refusal came too late"))
    video = tmp_path / "a.mp4"
    video.write_bytes(b"")
    cases = [
        (["--actors", "4", "--decoders", "3"], "--actors and --decoders do nothing without --engine ray"),
        (
            ["--address", "auto", "--gpus-per-actor", "1"],
            "--address and --gpus-per-actor do nothing without --engine ray",
        ),
        (["--cpus-per-actor", "0.5"], "--cpus-per-actor does nothing without --engine ray"),
        (
            ["--engine", "ray", "--workers", "4"],
            "--workers does nothing with --engine ray, whose decoders are Ray tasks",
        ),
        (["--in-flight", "3"], "--in-flight does nothing without --server"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["predict", str(video), *args])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    # the server decodes and batches with its own engine (no server listens at port 1: refused before)
    server = ["--server", "127.0.0.1:1", "--backend", "onnxruntime", "--workers", "2", "--batch-size", "8"]
    result = CliRunner().invoke(main, ["predict", str(video), *server])
    assert result.exit_code == 2 and "not with --backend, --workers, --batch-size" in result.output, result.output


def test_python_m_adafocus_runs_the_command_and_importing_it_runs_nothing():
    import subprocess
    import sys

    ran = subprocess.run([sys.executable, "-m", "adafocus", "presets"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and "sthsth-v1-t12" in ran.stdout, ran.stderr
    imported = subprocess.run(
        [sys.executable, "-c", "import adafocus.__main__; print('imported')"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.returncode == 0 and imported.stdout == "imported\n", (imported.stdout, imported.stderr)


def test_options_for_your_videos_are_refused_without_them_even_at_their_default_values(tmp_path):
    """--workers, --max-bad (and --root, --val-data) do nothing without your videos: refused when given,
    also at the default value (compared with the defaults, `--workers 2` passed unnoticed)."""
    cases = [
        (["train", "--out", str(tmp_path / "run"), "--workers", "2"], "--workers does nothing without --data"),
        (["evaluate", "--max-bad", "0.05"], "--max-bad does nothing without --data"),
        (["calibrate", "--workers", "2", "--max-bad", "0.05"], "--workers and --max-bad do nothing without your"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
    assert not (tmp_path / "run").exists()
