"""What machine this is: CPU name and the instruction-set features that change results or speed.

INT8 needs this. ONNX Runtime's fast x86 kernels for uint8 × int8 products (U8S8) use VPMADDUBSW
on CPUs without VNNI (SSE4.1, AVX2, AVX-512 without VNNI): it adds two u8·s8 products into a
*saturating* int16, so with full 8-bit weights a dot product can clip. With VNNI (AVX512-VNNI,
AVX-VNNI, and AMX CPUs, which have it too) the products go straight into int32 and nothing clips.
The same int8 graph can therefore give different answers on two x86 CPUs; see
`adafocus.quantize.int8` for how the project's graphs avoid it.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

# the flags that matter for the kernels ONNX Runtime and Inductor pick: named as in /proc/cpuinfo
# (what manifests and reports record), each with its name in torch.cpu.get_capabilities()
RELEVANT_FLAGS = {
    "sse4_1": "sse4_1",
    "avx2": "avx2",
    "fma": "fma3",
    "avx512f": "avx512_f",
    "avx512bw": "avx512_bw",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "amx_int8": "amx_int8",
    "amx_tile": "amx_tile",
}
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def _cpuinfo() -> tuple[str | None, frozenset[str] | None]:
    """(model name, flags) from /proc/cpuinfo; None where this system has no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return None, None
    name, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name is None:
            name = value.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
    return name, flags


@functools.cache
def _features() -> tuple[list[str] | None, str | None]:
    """(the RELEVANT_FLAGS this CPU has, where they were read).

    First choice: the CPUID instruction, through `torch.cpu.get_capabilities()` (torch 2.14 has it),
    because that is what the kernels of ONNX Runtime and PyTorch read when they pick their code.
    /proc/cpuinfo is the kernel's view, which is the same on a real machine or a VM but not under a
    user-mode emulator (`qemu-x86_64 -cpu EPYC-Rome` runs AVX2 kernels while the file it passes
    through still lists the host's avx512_vnni) or under scripts/as_avx2_cpu.sh, which hides AVX-512,
    VNNI and AMX from CPUID (`hidden_flags` names what the file lists and CPUID does not).
    /proc/cpuinfo is read only where this torch cannot ask the CPU, and the record says so."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None and is_x86():
        capabilities = get_capabilities()
        return [f for f, name in RELEVANT_FLAGS.items() if capabilities.get(name)], "cpuid"
    flags = _cpuinfo()[1]
    if flags is None:
        return None, None
    return [f for f in RELEVANT_FLAGS if f in flags], "/proc/cpuinfo"


def cpu_name() -> str:
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def cpu_flags() -> list[str] | None:
    """The RELEVANT_FLAGS this CPU has, or None when they cannot be read."""
    return _features()[0]


def has_vnni() -> bool | None:
    """Whether this x86 CPU multiplies int8 into int32 without saturation; None if unknown."""
    flags = cpu_flags()
    return None if flags is None else any(f in flags for f in VNNI_FLAGS)


def u8s8_may_saturate() -> bool:
    """True where ONNX Runtime's U8S8 kernels may clip 8-bit weights: x86 without VNNI, or an x86
    CPU whose features cannot be read (assumed the worst)."""
    return is_x86() and not has_vnni()


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity: a container's or taskset's share, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def hidden_flags() -> list[str]:
    """RELEVANT_FLAGS the kernel lists in /proc/cpuinfo that CPUID does not report to this process:
    hidden by an emulator or by scripts/as_avx2_cpu.sh, so results show fewer features than the
    machine has (its name in the record is still the real CPU's)."""
    flags, source = _features()
    listed = _cpuinfo()[1]
    if source != "cpuid" or flags is None or listed is None:
        return []
    return [f for f in RELEVANT_FLAGS if f in listed and f not in flags]


def cpu_record() -> dict:
    """This CPU as a manifest or report records it (`flags_hidden` only where some are)."""
    record = {
        "cpu": cpu_name(),
        "machine": platform.machine(),
        "flags": cpu_flags(),
        "flags_from": _features()[1],
        "vnni": has_vnni(),
        "cores": os.cpu_count(),
    }
    hidden = hidden_flags()
    if hidden:
        record["flags_hidden"] = hidden
    return record


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory since it started or since `reset_peak_rss` (Linux VmHWM;
    unlike ru_maxrss it is not inherited across fork), or None where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start this process's VmHWM afresh (Linux: `5` into /proc/self/clear_refs), so that a stage can
    report its own peak; False where that is not allowed (the peak is then the whole process's).
    ru_maxrss reads the same counter: it too starts afresh."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


PACKAGES = ("adafocus-deploy", "torch", "onnx", "onnxscript", "onnxruntime", "numpy", "tensorrt")


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages whose behaviour an export or a measurement depends on
    (those installed)."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
