import pytest
import torch
from click.testing import CliRunner

from adafocus import cli
from adafocus.machine import cpu_flags, cpu_record
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
    export = exported("demo")
    budget = (export.exit_gflops[1] + export.exit_gflops[3]) / 2
    out = tmp_path / "bench.json"
    args = [str(export.path), "--batch", "16", "--repeats", "1", "--warmup", "0", "--no-reference"]
    result = CliRunner().invoke(cli.bench, [*args, "--budget", str(budget), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = strict_loads(out.read_text(encoding="utf-8"))
    assert report["thresholds_from"].startswith(f"solved for budget {budget}")
    assert "torch_eager" not in report["backends"][0]["videos_per_s"]
    assert report["backends"][0]["exits_per_step"][-1] < 16  # some videos left early


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
