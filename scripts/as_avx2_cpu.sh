#!/usr/bin/env bash
# Run a command as on an x86 CPU with AVX2 only (no AVX-512, no VNNI, no AMX), natively on this one.
#
#     bash scripts/as_avx2_cpu.sh adafocus-bench --preset sthsth-v1 --precision int8 --batch 32
#     bash scripts/as_avx2_cpu.sh python -m pytest tests/test_int8.py
#     bash scripts/as_avx2_cpu.sh --amx-only adafocus-bench ...   # an AMX CPU seen as AVX-512 + VNNI
#
# The command and every program it starts see AVX-512, VNNI and AMX hidden from CPUID
# (scripts/avx2_cpuid.c, loaded with LD_PRELOAD), so ONNX Runtime, PyTorch and numpy pick their AVX2
# kernels, at full speed: timings show the AVX2 code paths on this machine's cores, not an AVX2-only
# CPU's. --amx-only hides AMX alone (ONNX Runtime's int8 GEMMs then take their VNNI kernels).
# Needs Linux's CPUID faulting (the cpuid_fault flag in /proc/cpuinfo: Intel CPUs, and virtual
# machines under KVM) and gcc; where it is missing, scripts/test_on_avx2_cpu.sh --qemu emulates the CPU.
# Exit status 3: this machine cannot make CPUID fault. The library is built once per version of its
# source, in the temporary directory, never in the checkout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if [ $# -eq 0 ] || [ "$1" = --help ] || [ "$1" = -h ]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    [ $# -eq 0 ] && exit 2 || exit 0
fi
# set in every case, so that a run nested in another one hides what it says
export ADAFOCUS_CPUID_HIDE=avx512
if [ "$1" = --amx-only ]; then
    export ADAFOCUS_CPUID_HIDE=amx
    shift
    [ $# -gt 0 ] || { echo "error: --amx-only needs a command to run" >&2; exit 2; }
fi
if [ "$(uname -s)/$(uname -m)" != Linux/x86_64 ]; then
    echo "error: hiding x86 features from CPUID needs Linux on x86_64; this is $(uname -s)/$(uname -m)" >&2
    exit 2
fi
if ! command -v gcc >/dev/null; then
    echo "error: gcc not found; install it (Debian/Ubuntu: apt-get install gcc)" >&2
    exit 2
fi

source_file="$here/avx2_cpuid.c"
# one per user (the uid in its name): in a shared /tmp, a library found there is preloaded into every
# program this runs, so one that another user put there (or could have) is refused, never used
library="${TMPDIR:-/tmp}/adafocus-avx2-cpuid-$(id -u)-$(sha256sum "$source_file" | cut -c1-16).so"
if [ -e "$library" ] && { [ ! -O "$library" ] || [ -L "$library" ] || [ -n "$(find "$library" -perm /022)" ]; }; then
    echo "error: $library is not a file of yours that only you can write; preloading it would run" \
        "someone else's code in this command: remove it, or set TMPDIR to a folder of your own" >&2
    exit 2
fi
if [ ! -f "$library" ]; then
    partial=$(mktemp "$library.XXXXXX")  # renamed into place: runs side by side never see half a file
    if ! gcc -O2 -Wall -Werror -shared -fPIC -o "$partial" "$source_file" -ldl; then
        rm -f "$partial"
        echo "error: could not build $source_file" >&2
        exit 2
    fi
    mv "$partial" "$library"
fi
export LD_PRELOAD="$library${LD_PRELOAD:+:$LD_PRELOAD}"
exec "$@"
