"""ONNX Runtime: the CPU provider over numpy arrays, or any provider (CPU, CUDA, TensorRT) through IO
binding on torch tensors, so that between graphs nothing crosses to the host.

Providers are named explicitly and read back: a GPU provider that fails to load makes ONNX Runtime
fall back to the CPU silently, which is refused here with what to install.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from adafocus.errors import AdaFocusError
from adafocus.export.graphs import GRAPH_NAMES
from adafocus.export.manifest import Export
from adafocus.files import cache_root
from adafocus.machine import cpu_name, u8s8_may_saturate, usable_cores
from adafocus.runtime.arrays import NumpyArrays, TorchArrays
from adafocus.runtime.backends.base import Backend, register

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
TRT_EP_MAX_BATCH = 128  # the TensorRT execution provider builds one engine for batches 1..this
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}  # manifest dtype names
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
# ONNX Runtime's session option for exact uint8 x uint8 kernels where its fast x86 U8S8 ones saturate
EXACT_U8U8 = "session.x64quantprecision"
# Each session has its own intra-op thread pool, whose threads spin for a while after a call. The loop
# calls five sessions in turn, so the pools of the graph just run spin on the cores the next graph
# needs: measured on the 2-core demo at batch 128, 206 videos/s spinning vs 343-358 not (and the
# local graph 3x slower inside the loop than alone). A backend of one graph (the dense baseline)
# keeps ONNX Runtime's default, which is ~6 % faster for it.
SPINNING = "session.intra_op.allow_spinning"


class Int8PrecisionWarning(UserWarning):
    """int8 graphs that this CPU's fast kernels would run wrongly; see `_int8_needs_exact_kernels`."""


@register
class OnnxRuntimeBackend(Backend):
    """The export's ONNX graphs in ONNX Runtime. device: the execution provider ('cpu', 'cuda',
    'tensorrt'). On the CPU the graphs read and write numpy arrays; on a GPU provider, or on the CPU
    with `io_binding=True` (how the GPU path is tested without a GPU), torch tensors in place.

    On the CPU over numpy arrays, the parts of a split call run at once, one per core, each in a
    single-threaded session of its graph (`call_workers`, default: `threads` or the usable cores; 1:
    in turn in the multi-threaded session). One ONNX Runtime call shares each layer among its
    threads, which then wait for each other at the layer's end; at the demo's sizes (a 16-channel
    32x32 map for ten videos is one layer) that wait is a large share of the work, and without
    spinning (SPINNING, below) each wait also wakes a sleeping thread. Parts side by side share
    nothing until the call's end. On the demo at batch 128 (2-core AMD EPYC, paired in one process:
    benchmarks/paired_settings.py call_workers; five runs) the adaptive loop ran 1.11-1.41x as fast
    (median 1.16), streaming 0.96-1.31x, the dense graph 1.01-1.17x; on Something-Something V1 at
    batch 16 1.11x, 1.07x, 1.06x. The same results to the tolerance of a row's place in a call."""

    name = "onnxruntime"
    devices = {"cpu": ("fp32", "int8"), "cuda": ("fp32", "int8"), "tensorrt": ("fp32", "fp16", "int8")}

    @classmethod
    def recorded_max_batch(cls, export: Export, kind: str, precision: str) -> int | None:
        # the TensorRT provider's one optimisation profile ends there (_providers), as a TensorRT engine's
        return TRT_EP_MAX_BATCH if kind == "tensorrt" else None

    def __init__(
        self,
        export: Export,
        device: str = "cpu",
        *,
        precision: str | None = None,
        threads: int | None = None,
        io_binding: bool = False,
        call_workers: int | None = None,
        graphs: Sequence[str] = GRAPH_NAMES,
    ):
        super().__init__(export, device, precision, graphs)
        self.max_batch = self.recorded_max_batch(export, device.split(":")[0], self.precision)
        self.provider_device, self.threads = device, threads
        self.io_binding = io_binding or device != "cpu"
        self.settings |= {"threads": threads, "io_binding": io_binding, "call_workers": call_workers}
        if call_workers is not None and call_workers < 1:
            raise AdaFocusError(f"call_workers must be 1 or more, got {call_workers!r}")
        if self.io_binding and (call_workers or 1) > 1:
            raise AdaFocusError(
                "call_workers > 1 runs parts of a call at once on the CPU over numpy arrays, not with io_binding",
                "leave call_workers unset (or 1) with io_binding or a GPU provider",
            )
        # sessions first: a missing GPU provider is named before any CUDA call could fail less clearly
        self.sessions = _open_sessions(export, self.graphs, device, threads, self.precision)
        self.part_sessions: dict = {}  # graph -> its single-threaded session, for parts run at once
        if not self.io_binding:
            self.call_workers = call_workers or threads or usable_cores()
        if self.call_workers > 1:
            splittable = [g for g in self.graphs if self.specs[g].gflops > 0]  # the crop is never split
            self.part_sessions = _open_sessions(export, splittable, device, 1, self.precision)
            self._workers = ThreadPoolExecutor(self.call_workers, thread_name_prefix="adafocus-part")
        if self.io_binding:
            self.arrays = TorchArrays(
                torch.device("cpu") if device == "cpu" else torch.device("cuda", torch.cuda.current_device())
            )
        else:
            self.arrays = NumpyArrays()

    def _run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        if not self.io_binding:
            return dict(zip(self.outputs[graph], self.sessions[graph].run(self.outputs[graph], feeds)))
        return self._run_bound(graph, feeds)

    def _run_parts(self, graph: str, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.call_workers == 1 or len(parts) < self.call_workers:  # each part gets every core, in turn
            return super()._run_parts(graph, parts)
        session, names = self.part_sessions[graph], self.outputs[graph]
        # ONNX Runtime releases the GIL while it computes, and one session may run on several threads
        return list(self._workers.map(lambda feeds: dict(zip(names, session.run(names, feeds))), parts))

    def _run_bound(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        """Inputs read from and outputs written to torch memory on the session's device."""
        device = self.arrays.device
        kind, index = device.type, device.index or 0
        binding = self.sessions[graph].io_binding()
        sizes: dict[str, int] = {}  # symbolic axis -> its size in this call
        kept = []  # contiguous inputs must outlive the run
        for spec in self.specs[graph].inputs:
            tensor = feeds[spec.name].contiguous()
            sizes.update((d, n) for d, n in zip(spec.shape, tensor.shape) if isinstance(d, str))
            binding.bind_input(spec.name, kind, index, NUMPY_DTYPES[spec.dtype], tuple(tensor.shape), tensor.data_ptr())
            kept.append(tensor)
        outputs = {}
        for spec in self.specs[graph].outputs:
            shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)
            out = torch.empty(shape, dtype=TORCH_DTYPES[spec.dtype], device=device)
            binding.bind_output(spec.name, kind, index, NUMPY_DTYPES[spec.dtype], shape, out.data_ptr())
            outputs[spec.name] = out
        if kind == "cuda":
            # ONNX Runtime computes on its own CUDA stream: what torch queued (the inputs) must be done
            torch.cuda.current_stream(device).synchronize()
        self.sessions[graph].run_with_iobinding(binding)  # returns once the provider's stream is done
        return outputs

    def describe(self) -> dict:
        import onnxruntime as ort

        described = super().describe() | {
            "onnxruntime": ort.__version__,
            "threads": self.threads or "default",
            "thread_spinning": "default" if len(self.sessions) == 1 else "off",
        }
        if self.io_binding:
            described |= {"providers": next(iter(self.sessions.values())).get_providers(), "io_binding": True}
        return described


def _open_sessions(export: Export, graphs: Sequence[str], device: str, threads: int | None, precision: str) -> dict:
    """One ONNX Runtime session per graph on `device`'s execution provider."""
    import onnxruntime as ort

    # fp16 on the TensorRT provider: the fp32 graphs, built in fp16 by the provider
    stored = "fp32" if precision == "fp16" else precision
    # int8: the file the manifest names for each graph (quantised, or the fp32 one it keeps on purpose)
    lacking = [g for g in graphs if stored != "fp32" and stored not in export.graph(g).variants]
    if lacking:
        raise AdaFocusError(
            f"{export.path} has no {stored} graphs (none for {', '.join(lacking)})",
            "run adafocus-calibrate --int8 on it",
        )
    wanted = PROVIDERS[device][0]
    if wanted not in ort.get_available_providers():
        raise AdaFocusError(
            f"ONNX Runtime on {device} needs {wanted}, which this onnxruntime ({ort.__version__}) lacks "
            f"(it offers {', '.join(ort.get_available_providers())})",
            "install onnxruntime-gpu on a GPU host (README, 'GPU hosts'), or use device cpu",
        )
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if len(graphs) > 1:
        options.add_session_config_entry(SPINNING, "0")
    if stored == "int8" and device == "cpu" and _int8_needs_exact_kernels(export):
        options.add_session_config_entry(EXACT_U8U8, "1")
    sessions = {}
    for graph in graphs:
        providers = _providers(export, graph, device, precision)
        session = ort.InferenceSession(str(export.graph_path(graph, stored)), options, providers=providers)
        if session.get_providers()[0] != wanted:
            raise AdaFocusError(
                f"ONNX Runtime runs {graph} on {session.get_providers()}, not {wanted} "
                f"(this onnxruntime offers {ort.get_available_providers()})",
                "install the onnxruntime build for it (onnxruntime-gpu, README 'GPU hosts'), or use device cpu",
            )
        sessions[graph] = session
    return sessions


_warned_exact: set[str] = set()


def _int8_needs_exact_kernels(export: Export) -> bool:
    """int8 graphs with full 8-bit weights (`weight_bits` 8; exports from before it was recorded
    have them too) clip in ONNX Runtime's fast kernels on x86 CPUs without VNNI. There they run in
    the exact U8U8 mode instead: the answers the graphs were validated with, more slowly. Said once
    per export and process; 7-bit graphs (the default) are exact everywhere and need nothing."""
    if (export.int8 or {}).get("weight_bits", 8) == 7 or not u8s8_may_saturate():
        return False
    key = str(export.path)
    if key not in _warned_exact:
        _warned_exact.add(key)
        warnings.warn(
            f"{export.path}: its int8 graphs have 8-bit weights, which ONNX Runtime's fast kernels clip on "
            f"this CPU ({cpu_name()}, no VNNI); running them in the exact, slower U8U8 mode. "
            "Fix: re-quantise with 7-bit weights (adafocus-calibrate --int8, the default), exact on every x86 CPU",
            Int8PrecisionWarning,
            stacklevel=5,
        )
    return True


def _providers(export: Export, graph: str, device: str, precision: str) -> list:
    if device != "tensorrt":
        return PROVIDERS[device]
    # One optimisation profile over batches 1..TRT_EP_MAX_BATCH (the loop's batch shrinks every step;
    # without a profile the provider rebuilds its engine for every new shape). Engines are cached
    # outside the sealed export directory.
    inputs = export.graph(graph).inputs

    def shapes(batch: int) -> str:
        return ",".join(
            t.name + ":" + "x".join(str(batch if isinstance(d, str) else d) for d in t.shape) for t in inputs
        )

    cache = cache_root() / "ort-tensorrt" / export.sha256[:16]
    cache.mkdir(parents=True, exist_ok=True)
    trt = {
        "trt_fp16_enable": precision == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_profile_min_shapes": shapes(1),
        "trt_profile_opt_shapes": shapes(TRT_EP_MAX_BATCH),
        "trt_profile_max_shapes": shapes(TRT_EP_MAX_BATCH),
    }
    return [("TensorrtExecutionProvider", trt), "CUDAExecutionProvider", "CPUExecutionProvider"]
