#!/usr/bin/env bash
# Run tests as on an x86 CPU with AVX2 only (no AVX-512, no VNNI), on whatever x86 machine this is.
#
#     bash scripts/test_on_avx2_cpu.sh                      # the INT8 tests
#     bash scripts/test_on_avx2_cpu.sh tests/test_int8.py -k exactly
#     bash scripts/test_on_avx2_cpu.sh --qemu               # emulated: where CPUID cannot fault
#
# The development machines' CPU changes between sessions (AVX2 only, AVX-512, VNNI, AMX), and INT8
# kernels differ between them (ONNX Runtime's U8S8 kernels saturate without VNNI). By default the
# tests run natively with AVX-512, VNNI and AMX hidden from CPUID (scripts/as_avx2_cpu.sh), so ONNX
# Runtime and PyTorch pick their AVX2 kernels at full speed. With --qemu, qemu's user-mode emulator
# runs them on an emulated AMD EPYC-Rome, whose CPUID offers AVX2 and FMA but no AVX-512 and no VNNI
# (about 20x slower: pick the tests; needs qemu-user: `apt-get install qemu-user`). Either way
# `adafocus.machine` reads the CPU's features through CPUID, and the run stops unless they are AVX2's.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin=$(python -c "import sys; print(sys.executable)")
if [ "${1:-}" = --qemu ]; then
    shift
    if ! command -v qemu-x86_64 >/dev/null; then
        echo "error: qemu-x86_64 not found; install it with: apt-get install qemu-user" >&2
        exit 2
    fi
    if [ "$(uname -m)" != x86_64 ]; then
        echo "error: this emulates an x86 CPU on an x86_64 host; this host is $(uname -m)" >&2
        exit 2
    fi
    # TCG cannot give an EPYC-Rome a few of its security and xsave features: those warnings say nothing here
    run() { qemu-x86_64 -cpu EPYC-Rome "$python_bin" "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2); }
    how="emulated (qemu, EPYC-Rome)"
else
    run() { bash scripts/as_avx2_cpu.sh "$python_bin" "$@"; }
    how="native, AVX-512/VNNI/AMX hidden from CPUID"
fi

# Refuse to run if the CPU the tests see is not what this script promises (the kernels would be the host's).
run - "$how" <<'EOF_CHECK'
import sys
import torch
from adafocus.machine import cpu_record
record = cpu_record()
print(f"{sys.argv[1]}: flags {record['flags']} (read from {record['flags_from']}), "
      f"torch kernels {torch.backends.cpu.get_cpu_capability()}")
if record["flags_from"] != "cpuid" or "avx512f" in record["flags"] or record["vnni"] or "avx2" not in record["flags"]:
    sys.exit("error: the CPU the tests see is not AVX2-only; with --qemu: is this qemu older than 7.2 (no AVX2 in TCG)?")
EOF_CHECK

if [ $# -eq 0 ]; then
    set -- tests/test_int8.py "tests/test_labelled.py::test_int8_ranges_from_your_videos"
fi
run -m pytest -q -p no:cacheprovider "$@"
