"""scripts/as_avx2_cpu.sh: a process that sees an AVX2-only CPU, natively, and still dies of its own faults."""

import json

import pytest

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


@pytest.mark.parametrize("faulthandler", [False, True])
def test_a_real_segmentation_fault_still_kills_the_process(faulthandler):
    """The library answers SIGSEGV for CPUID; any other fault reaches the program's own handler (Python's
    faulthandler, which pytest enables) or the default action."""
    args = ["-X", "faulthandler"] if faulthandler else []
    done = run_as_avx2_cpu([*args, "-c", "import ctypes; ctypes.string_at(0)"], timeout=60)
    assert done.returncode == -11, (done.returncode, done.stderr)
    assert ("Fatal Python error: Segmentation fault" in done.stderr) == faulthandler, done.stderr
