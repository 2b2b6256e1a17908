"""benchmarks/paired_cpu_features.py: the same graphs timed natively and with CPU features hidden, in
alternating processes, on a real export (no timing is asserted, only what each side saw and ran)."""

import subprocess
import sys
from pathlib import Path

import pytest

from adafocus.bench import bench_videos
from adafocus.machine import cpu_flags, hidden_flags
from adafocus.runtime.runtime import Runtime
from conftest import near_thresholds, run_as_avx2_cpu, strict_loads

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_cpu_features.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_each_side_runs_in_its_own_process_and_sees_its_own_cpu(calibrated_demo, tmp_path):
    """(On the session's calibrated demo export, not the built-in one: a fresh machine would first build
    that, a minute and a half, and nothing else in the tests needs it.)"""
    run_as_avx2_cpu(["-c", "pass"])  # skips, saying why, where features cannot be hidden here
    if "avx512f" not in cpu_flags():
        pytest.skip(f"this process sees no AVX-512 to hide (hidden from it: {hidden_flags()})")
    out = tmp_path / "paired.json"
    options = ("--precision", "fp32", "--batch", "4", "--rounds", "2", "--repeats", "1", "--out", str(out))
    done = _run("avx512", str(calibrated_demo.path), *options)
    assert done.returncode == 0, done.stderr
    report = strict_loads(out.read_text(encoding="utf-8"))
    native, hidden = report["machine"]["native"], report["machine"]["hidden"]
    assert "avx512f" in native["flags"] and "avx512f" not in hidden["flags"]
    assert "avx512f" in hidden["flags_hidden"] and "flags_hidden" not in native
    assert [len(report["seconds"][side]) for side in ("native", "hidden")] == [2, 2]
    assert set(report["speedup"]) == {"adaptive", "dense"} and all(v > 0 for v in report["speedup"].values())
    # fp32 on two kernel sets differs by float noise (~1e-6): the same exits, none of the videos being near an edge
    runtime = Runtime.load(calibrated_demo.path, "onnxruntime")
    assert not near_thresholds(runtime, bench_videos(runtime.export, 4).numpy(), runtime.thresholds, tol=1e-3).any()
    assert report["exits_per_step"]["native"] == report["exits_per_step"]["hidden"]
    assert sum(report["exits_per_step"]["native"]) == 4


def test_nothing_to_hide_is_refused_before_any_work():
    if "amx_tile" in cpu_flags():
        pytest.skip("this CPU has AMX: there is something to hide")
    done = _run("amx", "--rounds", "1")
    assert done.returncode == 1
    assert "this CPU has none of amx_int8, amx_tile to hide" in done.stderr
    assert "round" not in done.stdout


def test_a_side_gets_thresholds_that_start_with_a_minus(exported):
    """`--thresholds=-inf,...` (never exit at those steps) reaches each side's process as given: passed
    as two words, the child's argparse took the value for an option and refused the run."""
    import importlib.util
    from argparse import Namespace

    spec = importlib.util.spec_from_file_location("paired_cpu_features", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    export = exported("demo")  # given thresholds, an uncalibrated export will do
    k = export.preset.num_exits
    args = Namespace(
        hide="avx512",
        export=str(export.path),
        precision="fp32",
        batch=2,
        threads=1,
        repeats=1,
        thresholds="-inf," * (k - 1) + "1e9",
    )
    side = script.run_side("native", args)  # the native side: no CPU feature hidden, runs on any CPU
    assert side["exits_per_step"] == [0] * (k - 1) + [2]  # the thresholds were applied: every video ran every cube
