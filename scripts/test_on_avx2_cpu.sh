#!/usr/bin/env bash
# Run tests as on an x86 CPU with AVX2 only (no AVX-512, no VNNI), on whatever x86 machine this is.
#
#     bash scripts/test_on_avx2_cpu.sh                      # the INT8 tests (~20 min on 2 cores)
#     bash scripts/test_on_avx2_cpu.sh tests/test_int8.py -k exactly
#
# The development machines' CPU changes between sessions (AVX2 only, AVX-512, VNNI, AMX), and INT8
# kernels differ between them (ONNX Runtime's U8S8 kernels saturate without VNNI). qemu's user-mode
# emulator runs this process on an emulated AMD EPYC-Rome, whose CPUID offers AVX2 and FMA but no
# AVX-512 and no VNNI, so ONNX Runtime and PyTorch pick their AVX2 kernels here whatever the host has;
# `adafocus.machine` reads the CPU's features through CPUID too (the /proc/cpuinfo that qemu passes
# through is the host's). About 20x slower than running natively: pick the tests.
# Needs qemu-user (Debian/Ubuntu: `apt-get install qemu-user`).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v qemu-x86_64 >/dev/null; then
    echo "error: qemu-x86_64 not found; install it with: apt-get install qemu-user" >&2
    exit 2
fi
if [ "$(uname -m)" != x86_64 ]; then
    echo "error: this emulates an x86 CPU on an x86_64 host; this host is $(uname -m)" >&2
    exit 2
fi
python_bin=$(python -c "import sys; print(sys.executable)")
# TCG cannot give an EPYC-Rome a few of its security and xsave features: those warnings say nothing here
emulate() { qemu-x86_64 -cpu EPYC-Rome "$python_bin" "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2); }

# Refuse to run if the emulated CPU is not what this script promises (the kernels would be the host's).
emulate - <<'EOF'
import sys
import torch
from adafocus.machine import cpu_record
record = cpu_record()
print(f"emulated CPU: flags {record['flags']} (read from {record['flags_from']}), "
      f"torch kernels {torch.backends.cpu.get_cpu_capability()}")
if record["flags_from"] != "cpuid" or "avx512f" in record["flags"] or record["vnni"] or "avx2" not in record["flags"]:
    sys.exit("error: the emulated CPU is not AVX2-only; is this qemu older than 7.2 (no AVX2 in TCG)?")
EOF

if [ $# -eq 0 ]; then
    set -- tests/test_int8.py "tests/test_labelled.py::test_int8_ranges_from_your_videos"
fi
emulate -m pytest -q -p no:cacheprovider "$@"
