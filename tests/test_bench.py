import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adafocus import cli
from adafocus.bench import bench_videos
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


def test_bench_refuses_videos_that_do_not_fill_whole_batches(exported):
    result = CliRunner().invoke(cli.bench, [str(exported("demo").path), "--batch", "8", "--videos", "12"])
    assert result.exit_code == 2 and "12 is not a multiple of --batch 8" in result.output


def test_bench_refuses_wrong_thresholds(exported):
    result = CliRunner().invoke(cli.bench, [str(exported("demo").path), "--thresholds", "1,2"])
    assert result.exit_code == 2 and "needs 5 values" in result.output


def test_cpu_flags_are_read_from_the_cpu_as_the_kernels_see_it():
    """CPUID, not /proc/cpuinfo (an emulator passes the host's file through): the flags agree with the
    kernels PyTorch picked on this CPU."""
    record = cpu_record()
    assert record["flags_from"] == "cpuid"  # the pinned torch asks the CPU
    kernels = torch.backends.cpu.get_cpu_capability()
    assert ("avx512f" in record["flags"]) == (kernels == "AVX512"), (kernels, record["flags"])
    assert ("avx2" in record["flags"]) == (kernels in ("AVX2", "AVX512")), (kernels, record["flags"])
