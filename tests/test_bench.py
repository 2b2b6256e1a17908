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
