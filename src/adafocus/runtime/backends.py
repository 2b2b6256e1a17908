"""Backends: each knows how to run one graph of an export and a handful of array operations on its
device. The cube loop (`loop.py`) knows the method and drives any of them the same way.

Arrays are whatever the backend computes on: numpy for ONNX Runtime on the CPU, torch tensors (CPU
or CUDA) for PyTorch and TensorRT. Host-side values the loop needs (entropies, row indices, cube
starts) cross with `to_host` / `from_host` and are small.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from adafocus.errors import AdaFocusError
from adafocus.export.graphs import GRAPH_NAMES, graph_specs
from adafocus.export.manifest import Export
from adafocus.machine import cpu_name, u8s8_may_saturate

BACKENDS = ("onnxruntime", "pytorch", "tensorrt")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}  # manifest dtype names
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


class Backend:
    """Runs the graphs of one export. Subclasses fill in `_run` and the array operations."""

    name = "?"
    device = "cpu"
    max_batch: int | None = None  # the largest batch a graph takes (TensorRT profiles); None = any

    def __init__(self, export: Export, graphs: Sequence[str] = GRAPH_NAMES):
        self.export = export
        self.graphs = tuple(graphs)  # the loop's five; the benchmark opens the dense baseline alone
        self.inputs = {g: [t["name"] for t in export.manifest["graphs"][g]["inputs"]] for g in self.graphs}
        self.outputs = {g: [t["name"] for t in export.manifest["graphs"][g]["outputs"]] for g in self.graphs}
        self.graph_seconds: dict[str, float] | None = None  # per graph, when profiling

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        if self.graph_seconds is None:
            return self._run(graph, feeds)
        started = time.perf_counter()
        out = self._run(graph, feeds)
        self.synchronize()
        self.graph_seconds[graph] = self.graph_seconds.get(graph, 0.0) + time.perf_counter() - started
        return out

    def _run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work (GPU backends), so that timings are honest."""

    # array operations the loop needs -------------------------------------------------------------
    def videos(self, videos) -> Any:
        """The caller's batch as this backend's array, without a copy where it already fits."""
        raise NotImplementedError

    def from_host(self, values: np.ndarray) -> Any:
        raise NotImplementedError

    def to_host(self, array) -> np.ndarray:
        raise NotImplementedError

    def take(self, array, rows: np.ndarray) -> Any:
        raise NotImplementedError

    def zeros(self, rows: int, width: int) -> Any:
        raise NotImplementedError

    def concat(self, arrays: list) -> Any:
        raise NotImplementedError

    def empty_pool(self, capacity: int, shape: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def put(self, pool, slots: np.ndarray, values) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device)}


class _TorchArrays(Backend):
    """Array operations on torch tensors of one device."""

    device: torch.device

    def videos(self, videos) -> torch.Tensor:
        if isinstance(videos, np.ndarray):
            videos = torch.from_numpy(videos)
        return videos.to(self.device)  # no copy when already there

    def from_host(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(self.device)

    def to_host(self, array: torch.Tensor) -> np.ndarray:
        return array.detach().cpu().numpy()

    def take(self, array: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        return array.index_select(0, torch.from_numpy(rows).to(self.device))

    def zeros(self, rows: int, width: int) -> torch.Tensor:
        return torch.zeros(rows, width, device=self.device)

    def concat(self, arrays: list) -> torch.Tensor:
        return torch.cat(arrays)

    def empty_pool(self, capacity: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(capacity, *shape, device=self.device)

    def put(self, pool: torch.Tensor, slots: np.ndarray, values: torch.Tensor) -> None:
        pool[torch.from_numpy(slots).to(self.device)] = values

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class PyTorchBackend(_TorchArrays):
    """The export's own weights (`model.pt`) in eager PyTorch; fp16 autocast on CUDA if asked."""

    name = "pytorch"

    def __init__(self, export: Export, device: str = "cpu", precision: str = "fp32"):
        super().__init__(export)
        from adafocus.model.checkpoint import load_checkpoint

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise AdaFocusError("device 'cuda' asked for, but torch sees no CUDA GPU", "use --device cpu")
        if precision not in ("fp32", "fp16") or (precision == "fp16" and self.device.type != "cuda"):
            raise AdaFocusError(f"the PyTorch backend runs fp32, or fp16 on CUDA; not {precision} on {device}")
        self.precision = precision
        model = load_checkpoint(export.path / export.manifest["pytorch"]).model.to(self.device).eval()
        self.modules = {name: spec.module for name, spec in graph_specs(model).items()}

    @torch.inference_mode()
    def _run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        args = [feeds[name] for name in self.inputs[graph]]
        with strict_fp32(), torch.autocast("cuda", dtype=torch.float16, enabled=self.precision == "fp16"):
            out = self.modules[graph](*args)
        out = out if isinstance(out, tuple) else (out,)
        return {name: y.float() if y.is_floating_point() else y for name, y in zip(self.outputs[graph], out)}

    def describe(self) -> dict:
        return super().describe() | {"precision": self.precision, "threads": torch.get_num_threads()}


@contextlib.contextmanager
def strict_fp32():
    """fp32 means fp32: by default cuDNN runs fp32 convolutions in TF32 (a 10-bit mantissa) on
    Ampere and newer GPUs, which moves logits by ~1e-3. The user's own settings come back after."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
ORT_PRECISIONS = {"cpu": ("fp32", "int8"), "cuda": ("fp32", "int8"), "tensorrt": ("fp32", "fp16", "int8")}
TRT_EP_MAX_BATCH = 128  # the TensorRT execution provider builds one engine for batches 1..this


def open_ort_sessions(
    export: Export, graphs: Sequence[str], device: str, threads: int | None, precision: str
) -> dict[str, Any]:
    """One ONNX Runtime session per graph on `device` ('cpu', 'cuda' or 'tensorrt': the execution
    provider). Providers are named explicitly and read back: a GPU provider that fails to load falls
    back to the CPU silently, which we refuse."""
    import onnxruntime as ort

    if device not in ORT_PROVIDERS:
        raise AdaFocusError(f"unknown ONNX Runtime device {device!r}", f"use one of {', '.join(ORT_PROVIDERS)}")
    if precision not in ORT_PRECISIONS[device]:
        choices = " or ".join(ORT_PRECISIONS[device])
        raise AdaFocusError(f"ONNX Runtime on {device} runs {choices}, not {precision!r}")
    # fp16 on the TensorRT provider: the fp32 graphs, built in fp16 by the provider
    stored = "fp32" if precision == "fp16" else precision
    # int8: the file the manifest names for each graph (quantised, or the fp32 one it keeps on purpose)
    lacking = [g for g in graphs if stored != "fp32" and stored not in export.manifest["graphs"][g].get("variants", {})]
    if lacking:
        raise AdaFocusError(
            f"{export.path} has no {stored} graphs (none for {', '.join(lacking)})",
            "run adafocus-calibrate --int8 on it",
        )
    wanted = ORT_PROVIDERS[device][0]
    if wanted not in ort.get_available_providers():
        raise AdaFocusError(
            f"ONNX Runtime on {device} needs {wanted}, which this onnxruntime ({ort.__version__}) lacks "
            f"(it offers {', '.join(ort.get_available_providers())})",
            "install onnxruntime-gpu on a GPU host (README, 'GPU hosts'), or use device cpu",
        )
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if stored == "int8" and device == "cpu" and _int8_needs_exact_kernels(export):
        options.add_session_config_entry(EXACT_U8U8, "1")
    sessions = {}
    for graph in graphs:
        providers = _ort_providers(export, graph, device, precision)
        session = ort.InferenceSession(str(export.graph_path(graph, stored)), options, providers=providers)
        if session.get_providers()[0] != wanted:
            raise AdaFocusError(
                f"ONNX Runtime runs {graph} on {session.get_providers()}, not {wanted} "
                f"(this onnxruntime offers {ort.get_available_providers()})",
                "install the onnxruntime build for it (onnxruntime-gpu, README 'GPU hosts'), or use device cpu",
            )
        sessions[graph] = session
    return sessions


# ONNX Runtime's session option for exact uint8 x uint8 kernels where its fast x86 U8S8 ones saturate
EXACT_U8U8 = "session.x64quantprecision"
_warned_exact: set[str] = set()


def _int8_needs_exact_kernels(export: Export) -> bool:
    """int8 graphs with full 8-bit weights (`weight_bits` 8; exports from before it was recorded
    have them too) clip in ONNX Runtime's fast kernels on x86 CPUs without VNNI. There they run in
    the exact U8U8 mode instead: the answers the graphs were validated with, more slowly. Said once
    per export and process; 7-bit graphs (the default) are exact everywhere and need nothing."""
    if export.manifest.get("int8", {}).get("weight_bits", 8) == 7 or not u8s8_may_saturate():
        return False
    key = str(export.path)
    if key not in _warned_exact:
        _warned_exact.add(key)
        warnings.warn(
            f"{export.path}: its int8 graphs have 8-bit weights, which ONNX Runtime's fast kernels clip on "
            f"this CPU ({cpu_name()}, no VNNI); running them in the exact, slower U8U8 mode. "
            "Fix: re-quantise with 7-bit weights (adafocus-calibrate --int8, the default), exact on every x86 CPU",
            Int8PrecisionWarning,
            stacklevel=3,
        )
    return True


class Int8PrecisionWarning(UserWarning):
    """int8 graphs that this CPU's fast kernels would run wrongly; see `_int8_needs_exact_kernels`."""


def _ort_providers(export: Export, graph: str, device: str, precision: str) -> list:
    if device != "tensorrt":
        return ORT_PROVIDERS[device]
    # One optimisation profile over batches 1..TRT_EP_MAX_BATCH (the loop's batch shrinks every step;
    # without a profile the provider rebuilds its engine for every new shape). Engines are cached
    # outside the sealed export directory.
    from adafocus.export.builtin import cache_root

    inputs = export.manifest["graphs"][graph]["inputs"]

    def shapes(batch: int) -> str:
        return ",".join(
            t["name"] + ":" + "x".join(str(batch if isinstance(d, str) else d) for d in t["shape"]) for t in inputs
        )

    cache = cache_root() / "ort-tensorrt" / export.manifest["manifest_sha256"][:16]
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


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU over numpy arrays (no copies: numpy is what the CPU provider reads)."""

    name = "onnxruntime"

    def __init__(
        self,
        export: Export,
        device: str = "cpu",
        threads: int | None = None,
        precision: str = "fp32",
        graphs: Sequence[str] = GRAPH_NAMES,
    ):
        super().__init__(export, graphs)
        if device != "cpu":
            raise AdaFocusError(f"the numpy ONNX Runtime backend runs on the CPU, not {device!r}")
        self.sessions = open_ort_sessions(export, self.graphs, device, threads, precision)
        self.device, self.threads, self.precision = device, threads, precision

    def _run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        out = self.sessions[graph].run(self.outputs[graph], feeds)
        return dict(zip(self.outputs[graph], out))

    def videos(self, videos) -> np.ndarray:
        if isinstance(videos, torch.Tensor):
            if videos.device.type != "cpu":
                raise AdaFocusError("videos are on a GPU; the ONNX Runtime backend runs on the CPU", "pass CPU arrays")
            videos = videos.numpy()  # shares memory
        return np.ascontiguousarray(videos)

    def from_host(self, values: np.ndarray) -> np.ndarray:
        return values

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return array

    def take(self, array: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return array[rows]

    def zeros(self, rows: int, width: int) -> np.ndarray:
        return np.zeros((rows, width), dtype=np.float32)

    def concat(self, arrays: list) -> np.ndarray:
        return np.concatenate(arrays)

    def empty_pool(self, capacity: int, shape: tuple[int, ...]) -> np.ndarray:
        return np.empty((capacity, *shape), dtype=np.float32)

    def put(self, pool: np.ndarray, slots: np.ndarray, values: np.ndarray) -> None:
        pool[slots] = values

    def describe(self) -> dict:
        import onnxruntime as ort

        return super().describe() | {
            "onnxruntime": ort.__version__,
            "precision": self.precision,
            "threads": self.threads or "default",
        }


class OnnxRuntimeBoundBackend(_TorchArrays):
    """ONNX Runtime over torch tensors through IO binding: every graph reads its inputs and writes its
    outputs in place on the session's device, so between graphs nothing crosses to the host. The GPU
    form of the ONNX Runtime backend (device 'cuda' or 'tensorrt': that execution provider); on the
    CPU the same code runs with `io_binding=True` (that is how the tests check it without a GPU)."""

    name = "onnxruntime"

    def __init__(
        self,
        export: Export,
        device: str = "cuda",
        threads: int | None = None,
        precision: str = "fp32",
        graphs: Sequence[str] = GRAPH_NAMES,
    ):
        super().__init__(export, graphs)
        self.sessions = open_ort_sessions(export, self.graphs, device, threads, precision)
        self.provider_device, self.threads, self.precision = device, threads, precision
        self.device = torch.device("cpu") if device == "cpu" else torch.device("cuda", torch.cuda.current_device())
        self.specs = {g: export.manifest["graphs"][g] for g in self.graphs}

    def _run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        kind, index = self.device.type, self.device.index or 0
        binding = self.sessions[graph].io_binding()
        sizes: dict[str, int] = {}  # symbolic axis -> its size in this call
        kept = []  # contiguous inputs must outlive the run
        for spec in self.specs[graph]["inputs"]:
            tensor = feeds[spec["name"]].contiguous()
            if str(tensor.dtype).removeprefix("torch.") != spec["dtype"] or tensor.device != self.device:
                raise AdaFocusError(
                    f"{graph} input {spec['name']} is {tensor.dtype} on {tensor.device}, "
                    f"the graph takes {spec['dtype']} on {self.device}"
                )
            sizes.update((d, n) for d, n in zip(spec["shape"], tensor.shape) if isinstance(d, str))
            binding.bind_input(
                spec["name"], kind, index, NUMPY_DTYPES[spec["dtype"]], tuple(tensor.shape), tensor.data_ptr()
            )
            kept.append(tensor)
        outputs = {}
        for spec in self.specs[graph]["outputs"]:
            shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec["shape"])
            out = torch.empty(shape, dtype=TORCH_DTYPES[spec["dtype"]], device=self.device)
            binding.bind_output(spec["name"], kind, index, NUMPY_DTYPES[spec["dtype"]], shape, out.data_ptr())
            outputs[spec["name"]] = out
        if kind == "cuda":
            # ONNX Runtime computes on its own CUDA stream: what torch queued (the inputs) must be done
            torch.cuda.current_stream(self.device).synchronize()
        self.sessions[graph].run_with_iobinding(binding)  # returns once the provider's stream is done
        return outputs

    def describe(self) -> dict:
        import onnxruntime as ort

        return super().describe() | {
            "onnxruntime": ort.__version__,
            "providers": next(iter(self.sessions.values())).get_providers(),
            "precision": self.precision,
            "io_binding": True,
            "threads": self.threads or "default",
        }


class TensorRTBackend(_TorchArrays):
    """The export's TensorRT engines, on torch CUDA tensors and one stream."""

    name = "tensorrt"

    def __init__(self, export: Export, device: str = "cuda", precision: str = "fp16"):
        super().__init__(export)
        from adafocus.export.tensorrt import unavailable_reason
        from adafocus.runtime.tensorrt_engine import TensorRTEngine

        if reason := unavailable_reason():
            raise AdaFocusError(f"backend 'tensorrt': {reason}", "use backend 'onnxruntime' or 'pytorch'")
        self.device = torch.device(device)
        self.precision = precision
        self.engines = {g: TensorRTEngine(export.engine_path(g, precision), device=self.device) for g in GRAPH_NAMES}
        self.max_batch = min(self.engines[g].profile_range(self.inputs[g][0])[2][0] for g in GRAPH_NAMES)

    def _run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        feeds = {k: v.contiguous() for k, v in feeds.items()}
        return self.engines[graph].run(feeds)

    def describe(self) -> dict:
        return super().describe() | {"precision": self.precision, "gpu": torch.cuda.get_device_name(self.device)}


def make_backend(export: Export, backend: str, device: str | None = None, **options) -> Backend:
    if backend == "onnxruntime":
        device, io_binding = device or "cpu", options.pop("io_binding", False)
        bound = io_binding or device != "cpu"
        return (OnnxRuntimeBoundBackend if bound else OnnxRuntimeBackend)(export, device, **options)
    if backend == "pytorch":
        return PyTorchBackend(export, device or "cpu", **options)
    if backend == "tensorrt":
        return TensorRTBackend(export, device or "cuda", **options)
    raise AdaFocusError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
