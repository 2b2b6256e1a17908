"""scripts/as_avx2_cpu.sh: a process that sees an AVX2-only CPU (or, with --amx-only, this one less AMX), natively,
and still dies of its own faults."""

import json
import os
import subprocess
import sys

import pytest
import torch

from adafocus.machine import cpu_flags, hidden_flags
from conftest import run_as_avx2_cpu

SEEN = """
import json, torch
from numpy.core._multiarray_umath import __cpu_features__ as numpy_features
from adafocus.machine import cpu_record
print(json.dumps({"cpu": cpu_record(), "torch": torch.backends.cpu.get_cpu_capability(),
                  "numpy": [f for f in ("AVX2", "AVX512F", "AVX512_SKX") if numpy_features[f]]}))
"""


def test_the_process_and_its_libraries_see_avx2_and_nothing_newer():
    done = run_as_avx2_cpu(["-c", SEEN])
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["cpu"]["flags"] == ["sse4_1", "avx2", "fma"] and got["cpu"]["vnni"] is False
    assert got["torch"] == "AVX2" and got["numpy"] == ["AVX2"]
    if "avx512f" in cpu_flags() + hidden_flags():  # this CPU has more: the record says it was hidden
        assert "avx512f" in got["cpu"]["flags_hidden"]


def test_amx_only_hides_amx_and_keeps_avx512_and_vnni():
    """--amx-only: the process sees this CPU's features less AMX (on a CPU without AMX, all of them)."""
    if hidden_flags():  # e.g. these tests run under scripts/test_on_avx2_cpu.sh: the child would see more
        pytest.skip(f"this process runs with CPU features hidden already: {hidden_flags()}")
    done = run_as_avx2_cpu(["-c", SEEN], amx_only=True)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    amx = [f for f in cpu_flags() if f.startswith("amx")]
    assert got["cpu"]["flags"] == [f for f in cpu_flags() if f not in amx]
    assert got["cpu"].get("flags_hidden", []) == amx
    assert got["cpu"]["vnni"] == any(f in cpu_flags() for f in ("avx512_vnni", "avx_vnni"))
    assert got["torch"] == torch.backends.cpu.get_cpu_capability()  # AVX-512 kernels stay where they were


def test_the_library_refuses_an_unknown_feature_set_before_the_program_runs(tmp_path):
    shown = run_as_avx2_cpu(["-c", "import os; print(os.environ['LD_PRELOAD'])"], env={"TMPDIR": str(tmp_path)})
    assert shown.returncode == 0, shown.stderr
    library = shown.stdout.split()[-1].split(":")[0]
    assert library.startswith(str(tmp_path))  # built where it was told, not in the checkout
    env = {**os.environ, "ADAFOCUS_CPUID_HIDE": "avx", "LD_PRELOAD": library}
    stray = subprocess.run([sys.executable, "-c", "print('ran')"], capture_output=True, text=True, env=env, timeout=120)
    assert stray.returncode == 2 and "ran" not in stray.stdout, (stray.returncode, stray.stdout)
    assert "ADAFOCUS_CPUID_HIDE=avx is neither avx512" in stray.stderr


@pytest.mark.parametrize("faulthandler", [False, True])
def test_a_real_segmentation_fault_still_kills_the_process(faulthandler):
    """The library answers SIGSEGV for CPUID; any other fault reaches the program's own handler (Python's
    faulthandler, which pytest enables) or the default action."""
    args = ["-X", "faulthandler"] if faulthandler else []
    done = run_as_avx2_cpu([*args, "-c", "import ctypes; ctypes.string_at(0)"], timeout=60)
    assert done.returncode == -11, (done.returncode, done.stderr)
    assert ("Fatal Python error: Segmentation fault" in done.stderr) == faulthandler, done.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="planting another user's file needs root")
def test_a_library_another_user_left_in_the_temporary_folder_is_never_preloaded(tmp_path):
    """In a shared /tmp, another user can put a file where the script looks for its library: it would run their
    code in every program the script starts (here it is junk, which the loader would skip with a warning, leaving
    the features silently shown). Refused, with exit status 2, under the name of before and the per-user one."""
    import hashlib

    from conftest import AS_AVX2_CPU

    digest = hashlib.sha256((AS_AVX2_CPU.parent / "avx2_cpuid.c").read_bytes()).hexdigest()[:16]
    for name in (f"adafocus-avx2-cpuid-{digest}.so", f"adafocus-avx2-cpuid-{os.getuid()}-{digest}.so"):
        planted = tmp_path / name
        planted.write_bytes(b"not a library")
        os.chown(planted, 65534, 65534)
    done = run_as_avx2_cpu(["-c", "print('ran')"], env={"TMPDIR": str(tmp_path)}, timeout=120)
    assert done.returncode == 2 and "ran" not in done.stdout, (done.returncode, done.stdout, done.stderr)
    assert "is not a file of yours" in done.stderr
