from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adafocus import cli
from adafocus.bench import STREAM_BATCHES, _adaptive_methods, bench_videos
from adafocus.calibration.thresholds import thresholds_from_json
from adafocus.machine import cpu_flags, cpu_record
from adafocus.runtime import Runtime
from conftest import strict_loads


def test_bench_reports_every_method_and_the_realisation(exported, tmp_path):
    out = tmp_path / "bench.json"
    args = [str(exported("demo").path), "--batch", "8", "--repeats", "2", "--warmup", "0", "--out", str(out)]
    result = CliRunner().invoke(cli.bench, [*args, "--thresholds", "1.6,1.6,1.6,1.6,1.6"])
    assert result.exit_code == 0, result.output
    report = strict_loads(out.read_text(encoding="utf-8"))
    assert out.with_suffix(".png").stat().st_size > 0
    assert report["machine"]["cpu"] and report["machine"]["onnxruntime"]
    assert report["machine"]["flags"] == cpu_flags()  # the CPU kind, not only its model name
    (b,) = report["backends"]
    assert set(b["videos_per_s"]) == {"adaptive", "adaptive_stream", "adaptive_stream_batches", "dense", "torch_eager"}
    v, g = b["videos_per_s"], b["gflops_per_video"]
    assert b["realisation"] == pytest.approx((v["adaptive"] / v["dense"]) / (g["dense"] / g["adaptive"]))
    assert b["speedup_vs_torch_eager"] == pytest.approx(v["adaptive"] / v["torch_eager"])
    assert 0 <= b["loop_overhead"] < 1
    assert sum(b["exits_per_step"]) == 8
    assert g["dense"] == pytest.approx(exported("demo").manifest["gflops"]["dense_baseline"])
    assert "realisation" in result.stdout and "dense" in result.stdout


def test_bench_solves_thresholds_for_a_budget_without_a_calibrated_table(exported, tmp_path):
    """Also times several batches (--videos): compute and exits are those of all the videos."""
    export = exported("demo")
    budget = (export.exit_gflops[1] + export.exit_gflops[3]) / 2
    out = tmp_path / "bench.json"
    args = [str(export.path), "--batch", "8", "--videos", "24", "--repeats", "1", "--warmup", "0", "--no-reference"]
    result = CliRunner().invoke(cli.bench, [*args, "--budget", str(budget), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = strict_loads(out.read_text(encoding="utf-8"))
    assert report["thresholds_from"].startswith(f"solved for budget {budget}")
    (b,) = report["backends"]
    assert "torch_eager" not in b["videos_per_s"]
    assert report["videos"] == b["videos"] == 24 and report["batch"] == b["batch"] == 8
    assert sum(b["exits_per_step"]) == 24 and b["exits_per_step"][-1] < 24  # some videos left early
    runtime = Runtime.load(export.path, "onnxruntime")
    runtime.set_thresholds(thresholds_from_json(report["thresholds"]))
    every = runtime.predict(bench_videos(export, 24))  # the same 24 videos in one call
    assert b["gflops_per_video"]["adaptive"] == pytest.approx(float(every.gflops.mean()))
    assert b["exits_per_step"] == np.bincount(every.exit_step, minlength=len(b["exits_per_step"])).tolist()
    assert "(24 videos)" in result.stdout


def test_streaming_runs_whole_passes_over_the_videos_whose_gflops_it_reports(exported, monkeypatch):
    """Three batches, fewer than STREAM_BATCHES: the streaming modes run every video twice (not the
    first batch once more), so the per-batch mode's GFLOPs they report are those of what they ran."""
    export = exported("demo")
    runtime = Runtime.load(export.path)
    runtime.set_thresholds([1.6] * 5)  # the first batch's videos exit later than the others
    batches = bench_videos(export, 24).split(8)
    assert len(batches) < STREAM_BATCHES
    streamed, stream = [], runtime.stream

    def recording(items, batch_size):  # the real stream, its results kept
        results = list(stream(items, batch_size=batch_size))
        streamed.append(results)
        return results

    monkeypatch.setattr(runtime, "stream", recording)
    methods = _adaptive_methods(runtime, batches, repeats=1, warmup=0, log=lambda _: None)
    assert len(streamed) == 2  # one run of each streaming mode
    for method, results in zip(("adaptive_stream", "adaptive_stream_batches"), streamed):
        assert np.bincount([r.index % 24 for r in results]).tolist() == [2] * 24, method
        gflops = [r.gflops for r in results]
        assert len(set(gflops)) > 1  # videos exit at different steps, so which ones ran matters
        assert methods[method]["gflops_per_video"] == pytest.approx(np.mean(gflops), rel=1e-9), method


def test_bench_refuses_videos_that_do_not_fill_whole_batches(exported):
    result = CliRunner().invoke(cli.bench, [str(exported("demo").path), "--batch", "8", "--videos", "12"])
    assert result.exit_code == 2 and "12 is not a multiple of --batch 8" in result.output


def test_bench_refuses_wrong_thresholds(exported):
    result = CliRunner().invoke(cli.bench, [str(exported("demo").path), "--thresholds", "1,2"])
    assert result.exit_code == 2 and "needs 5 values" in result.output


def test_bench_refuses_a_nan_threshold_and_takes_infinities(exported, tmp_path):
    """NaN is refused as the option is read, before any video is generated; inf (always exit) and
    -inf (never) are thresholds."""
    export = str(exported("demo").path)
    for nan in ("nan", "NaN", "-nan"):
        result = CliRunner().invoke(cli.bench, [export, "--thresholds", f"{nan},1,1,1,1"])
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--thresholds'" in result.output
        assert f"{nan!r} is no threshold" in result.output and "-inf or none (never)" in result.output
    out = tmp_path / "bench.json"
    args = ["--batch", "2", "--repeats", "1", "--warmup", "0", "--no-reference", "--out", str(out)]
    taken = CliRunner().invoke(cli.bench, [export, "--thresholds", "-inf,1,-inf,1,inf", *args])
    assert taken.exit_code == 0, taken.output
    assert strict_loads(out.read_text(encoding="utf-8"))["backends"][0]["exits_per_step"][0] == 0


def test_cpu_flags_are_read_from_the_cpu_as_the_kernels_see_it():
    """CPUID, not /proc/cpuinfo (an emulator passes the host's file through): the flags agree with the
    kernels PyTorch picked on this CPU."""
    record = cpu_record()
    assert record["flags_from"] == "cpuid"  # the pinned torch asks the CPU
    kernels = torch.backends.cpu.get_cpu_capability()
    assert ("avx512f" in record["flags"]) == (kernels == "AVX512"), (kernels, record["flags"])
    assert ("avx2" in record["flags"]) == (kernels in ("AVX2", "AVX512")), (kernels, record["flags"])


def test_ray_vs_local_counts_no_failed_video_as_throughput():
    """benchmarks/ray_vs_local.py: adafocus-predict exits 0 with some videos failed (their lines carry
    "error"); such a run is refused, not timed as if every video had been classified."""
    import importlib.util
    import os
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ray_vs_local.py"
    spec = importlib.util.spec_from_file_location("ray_vs_local", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ok, bad = '{"path": "a.mp4", "class": "x"}', '{"path": "b.mp4", "error": "b.mp4: truncated"}'
    command = [sys.executable, "-c", f"print({ok!r}); print({bad!r})"]
    with pytest.raises(SystemExit, match="1 of 2 videos failed, e.g. b.mp4: b.mp4: truncated"):
        module.run(command, dict(os.environ))
    assert module.run([sys.executable, "-c", f"print({ok!r})"], dict(os.environ))["videos"] == 1


def test_memory_vs_batch_refuses_a_preset_its_recorded_thresholds_are_not_for(tmp_path):
    """benchmarks/memory_vs_batch.py times the loop at thresholds recorded for sthsth-v1: with another
    --preset every adaptive row failed and the run still ended with status 0. Refused up front now."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_vs_batch.py"
    out = tmp_path / "memory.json"
    command = [sys.executable, str(script), "--preset", "demo", "--batches", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert done.returncode != 0
    assert "the thresholds this script uses were recorded for sthsth-v1-t12" in done.stderr
    assert not out.exists()


def test_gpu_host_dry_run_leaves_the_recorded_results_alone_and_says_what_failed(tmp_path):
    """benchmarks/gpu_host.sh with DRY_RUN=1 (its CPU check) wrote its logs and report into
    benchmarks/results/, beside the recorded GPU results, and ended with status 0 whatever its steps
    did. Here every step is cut off at once (a budget of a few seconds): nothing goes to
    benchmarks/results, and the status and the last line name the steps."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_host.sh"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env |= {"DRY_RUN": "1", "BUDGET_S": "4", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    env["ADAFOCUS_CACHE"] = str(tmp_path / "cache")  # nothing cached: the export step is cut off too
    work = tmp_path / "checkout"
    work.mkdir()
    done = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert not (work / "benchmarks").exists()
    assert (work / "adafocus-results" / "gpu-host-dry-run" / "gpu-tests.log").is_file()
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1].startswith("failed or cut off: export")


def test_serve_load_refuses_an_export_without_budgets_before_starting_servers(exported, tmp_path):
    """benchmarks/serve_load.py serves a latency-target model in every table, which steers along the
    calibrated budgets: an uncalibrated export is refused up front (it went on to time an unloaded
    server first, then failed as Triton refused to load that model)."""
    import subprocess
    import sys

    export = exported("demo")  # exported, not calibrated
    assert not export.budgets
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    out = tmp_path / "load.json"
    command = [sys.executable, str(script), "--export", str(export.path), "--no-cheap", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert done.returncode != 0
    assert f"{export.path} has no calibrated budgets; run adafocus-calibrate on it first" in done.stderr
    assert "latency target" not in done.stderr  # refused before the unloaded probe
    assert not out.exists()
