"""What every backend is, and the registry that names them.

A backend runs the graphs of one export on one device, Polygraphy-style: the base class checks each
call's inputs against the manifest's declaration once, and a backend fills in only `_run`. The array
operations the loop needs come from the backend's `arrays` (numpy or torch, `runtime.arrays`), not
from inheritance. The cube loop (`runtime.loop`) drives every backend the same way.

A backend declares the devices it runs on and the precisions of each; `make_backend` and the command
line read those declarations from the registry, so adding a backend is one class and one
`@register` (docs/architecture.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from adafocus.errors import AdaFocusError
from adafocus.export.graphs import BATCH, GRAPH_NAMES
from adafocus.export.manifest import Export, GraphRecord
from adafocus.export.onnx_flops import largest_activation_bytes
from adafocus.runtime.arrays import NumpyArrays, TorchArrays

BACKENDS: dict[str, type[Backend]] = {}  # name -> class, in the order they were registered
# The most multiply-adds one graph call does on the CPU, by default: larger calls are split into parts
# along the batch axis (every graph is row-independent, so the results are the same). A call's memory
# grows with its batch (activations, ONNX Runtime's arena): Something-Something V1 at batch 128 needs
# more than this 24 GB machine has as one call per graph. MACs are a proxy for memory (MobileNetV2
# holds ~7x more activation per MAC than ResNet-50), chosen so that the glance, its most memory-hungry
# graph, stays near 60 videos a call; smaller calls cost nothing measurable here (benchmarks/
# memory_vs_batch.py). On GPUs nothing is split unless asked (max_call_gflops=).
CPU_CALL_GFLOPS = 150.0
# INT8 graphs hold their activations in one byte where fp32 graphs use four, so on the CPU the same
# memory holds more work a call: int8 backends bound calls at 4x. Fewer, larger parts ran faster
# (Something-Something V1, AMD EPYC, 2 threads, paired in one process: the int8 loop 1.06x as fast
# at batch 32, median of 9; 1.03x at batch 128, median of 5; the int8 dense graph alone 0.99x, 6 runs),
# and memory stayed below fp32's: the int8 loop at batch 128 peaked at 6.6 GiB (4.5 GiB at the fp32
# bound), the fp32 loop and dense graph of the same benchmark at 11 GB.
CPU_CALL_GFLOPS_INT8 = 4 * CPU_CALL_GFLOPS
# On the CPU a call is also cut into parts whose largest tensor stays near this many MiB, so that one
# layer's output is still in the caches when the next layer reads it: a layer of a whole batch of 128
# writes tens of MB, more than any cache, and MobileNetV2's early layers are bound by that traffic.
# Measured on the demo (AMD EPYC, 32 MiB L3; benchmarks/paired_settings.py call_cache_mib): its glance (0.75 MiB
# a video) and dense graph (2 MiB) run fastest at 4-16 videos a call; the adaptive loop at batch 128
# became 1.13x as fast (median of five paired runs, 1.05-1.14), the dense graph 1.09x. A graph of which
# fewer than two rows fit gets parts of one row: no cache holds a video of Something-Something V1's
# glance (38 MB in its largest fp32 layer), yet one video a part ran its adaptive loop 1.02-1.10x as
# fast as the work bound's parts (fp32 and int8, batch 32 and 128; AMD EPYC, paired) and the loop's peak
# memory at batch 128 fell from 9.9 to 3.7 GiB (benchmarks/README.md, "One video a part").
CPU_CALL_CACHE_MIB = 8.0


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


class Backend:
    """Runs graphs of one export. Subclasses set `name`, `devices` (device -> precisions, the first
    the default) and `default_device`, make `arrays`, and fill in `_run`."""

    name: ClassVar[str]
    devices: ClassVar[dict[str, tuple[str, ...]]]
    default_device: ClassVar[str] = "cpu"
    max_batch: int | None = None  # the largest batch a graph takes (TensorRT profiles); None = any
    arrays: NumpyArrays | TorchArrays

    def __init__(self, export: Export, device: str, precision: str | None, graphs: Sequence[str] = GRAPH_NAMES):
        kind = device.split(":")[0]
        if kind not in self.devices:
            raise AdaFocusError(
                f"backend {self.name!r} runs on {' or '.join(self.devices)}, not {device!r}",
                f"use --device {' or '.join(self.devices)}, or another backend",
            )
        precision = precision or self.devices[kind][0]
        if precision not in self.devices[kind]:
            raise AdaFocusError(
                f"backend {self.name!r} on {kind} runs {' or '.join(self.devices[kind])}, not {precision!r}",
                "pick one of those precisions, or another backend or device",
            )
        self.export = export
        self.precision = precision
        self.graphs = tuple(graphs)  # the loop's five; the benchmark opens the dense baseline alone
        self.specs: dict[str, GraphRecord] = {g: export.graph(g) for g in self.graphs}
        self.inputs = {g: spec.input_names for g, spec in self.specs.items()}
        self.outputs = {g: spec.output_names for g, spec in self.specs.items()}
        # what make_backend needs to open the same kind of backend again (e.g. on other graphs)
        self.settings: dict[str, Any] = {"device": device, "precision": precision}
        cpu_bound = CPU_CALL_GFLOPS_INT8 if precision == "int8" else CPU_CALL_GFLOPS
        self.max_call_gflops: float | None = cpu_bound if kind == "cpu" else None
        self.call_cache_mib: float | None = CPU_CALL_CACHE_MIB if kind == "cpu" else None
        self.call_workers = 1  # parts of a split call that run at once (backends that can set more)
        self._activation_bytes: dict[str, int] = {}  # graph -> its largest tensor per row, read once

    @classmethod
    def recorded_max_batch(cls, export: Export, kind: str, precision: str) -> int | None:
        """`max_batch` as the export's manifest records it for `kind` (a device without its index)
        and `precision`, read without opening anything: the engines of a GPU backend are built for
        workers' GPUs, which a driver may not have. None: any batch, or not recorded for every graph
        (opening the backend then refuses it with its own error)."""
        return None

    @property
    def device(self):
        return self.arrays.device

    def videos(self, videos):
        """The caller's batch as this backend's array, without a copy where it already fits."""
        return self.arrays.videos(videos)

    def run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        """One graph call: its inputs checked against the manifest, then the backend's own `_run`, in
        parts of at most `rows_per_call(graph)` rows when the call would be larger."""
        self._check_feeds(graph, feeds)
        spec = self.specs[graph]
        batched = [t.name for t in spec.inputs if t.shape and t.shape[0] == BATCH]  # not the crop's pool
        rows = int(feeds[batched[0]].shape[0]) if batched else 0
        limit = self.rows_per_call(graph)
        count = 1 if limit is None else -(-rows // limit)  # parts
        workers = self.call_workers
        if workers > 1 and spec.gflops > 0 and rows >= workers:
            count = -(-max(count, workers) // workers) * workers  # every worker busy to the end
        if count == 1:
            return self._run(graph, feeds)
        size = -(-rows // count)  # even parts: 128 rows in two make 64 + 64, not 120 + 8
        cut = [{k: v[s : s + size] if k in batched else v for k, v in feeds.items()} for s in range(0, rows, size)]
        parts = self._run_parts(graph, cut)
        return {name: self.arrays.concat([part[name] for part in parts]) for name in spec.output_names}

    def _run_parts(self, graph: str, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The parts of one split call, in order; a backend with `call_workers` > 1 runs them at once."""
        return [self._run(graph, part) for part in parts]

    def rows_per_call(self, graph: str) -> int | None:
        """How many rows one call of `graph` may take under `max_call_gflops` and `call_cache_mib`
        (None: no limit). Graphs that only move data (the crop) are never split: a part's output would
        be copied once more into the whole."""
        per_row = self.specs[graph].gflops
        if per_row <= 0:
            return None
        limits = []
        if self.max_call_gflops is not None:  # shared by the parts that run at once
            limits.append(max(1, int(self.max_call_gflops / self.call_workers // per_row)))
        if self.call_cache_mib is not None:
            if graph not in self._activation_bytes:
                self._activation_bytes[graph] = largest_activation_bytes(self.export.graph_path(graph))
            fits = int(self.call_cache_mib * 2**20 // max(self._activation_bytes[graph], 1))
            limits.append(max(fits, 1))
        return min(limits, default=None)

    def _run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work (GPU backends), so that timings are honest."""
        self.arrays.synchronize()

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "device": str(self.device),
            "precision": self.precision,
            "max_call_gflops": self.max_call_gflops,
            "call_cache_mib": self.call_cache_mib,
            "call_workers": self.call_workers,
        }

    def _check_feeds(self, graph: str, feeds: dict[str, Any]) -> None:
        spec = self.specs.get(graph)
        if spec is None:
            raise AdaFocusError(f"this {self.name} backend holds {', '.join(self.graphs)}, not the {graph} graph")
        if set(feeds) != set(spec.input_names):
            raise AdaFocusError(f"the {graph} graph takes {spec.input_names}, got {sorted(feeds)}")
        sizes: dict[str, int] = {}  # a symbolic axis has one size across the call's inputs
        for tensor in spec.inputs:
            value = feeds[tensor.name]
            dtype = _dtype_name(value.dtype)
            on = value.device if isinstance(value, torch.Tensor) else "cpu"
            if dtype != tensor.dtype or not isinstance(value, np.ndarray | torch.Tensor) or str(on) != str(self.device):
                raise AdaFocusError(
                    f"{graph} input {tensor.name} is {value.dtype} on {on}, "
                    f"the graph takes {tensor.dtype} on {self.device}"
                )
            shape = tuple(value.shape)
            fits = len(shape) == len(tensor.shape)
            for size, want in zip(shape, tensor.shape):
                fits = fits and (size == sizes.setdefault(want, size) if isinstance(want, str) else size == want)
            if not fits:
                raise AdaFocusError(
                    f"{graph} input {tensor.name} has shape {list(shape)}, the graph takes {list(tensor.shape)} "
                    f"(symbolic axes so far: {sizes})"
                )


@functools.cache
def _dtype_name(dtype) -> str:
    """ "float32" for numpy's and torch's float32 alike; cached: str() of a numpy dtype costs
    microseconds, paid on every input of every graph call (the serving loop makes thousands a second)."""
    return str(dtype).removeprefix("torch.")


def make_backend(export: Export, backend: str, device: str | None = None, **options) -> Backend:
    """The registered backend `backend` on `device` (None: the backend's default). `options` go to
    its constructor: precision=, graphs=, and its own (threads=, io_binding=); `max_call_gflops=`
    (every backend) bounds one graph call's work, hence its memory, and `call_cache_mib=` its largest
    tensor, to stay in the caches (None: no limit; "default": the backend's, set on the CPU only)."""
    cls = BACKENDS.get(backend)
    if cls is None:
        raise AdaFocusError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    limits = {key: options.pop(key, "default") for key in ("max_call_gflops", "call_cache_mib")}
    opened = cls(export, device or cls.default_device, **options)
    for key, limit in limits.items():
        if limit != "default":
            if limit is not None and not limit > 0:
                raise AdaFocusError(f"{key} must be positive or None, got {limit!r}")
            setattr(opened, key, limit)
            opened.settings[key] = limit
    return opened


def largest_batch(export: Export, backend: str, device: str | None = None) -> int | None:
    """The largest batch `backend` on `device` (None: its default), at its default precision, will
    take once opened (`Backend.max_batch`), from the export's manifest alone."""
    cls = BACKENDS.get(backend)
    if cls is None:
        return None  # make_backend names the unknown backend when it is opened
    kind = (device or cls.default_device).split(":")[0]
    if kind not in cls.devices:
        return None  # the same: opening it refuses the device
    return cls.recorded_max_batch(export, kind, cls.devices[kind][0])


def backend_names() -> list[str]:
    return list(BACKENDS)


def device_names() -> list[str]:
    """Every device some backend runs on, for command-line choices."""
    return list(dict.fromkeys(d for cls in BACKENDS.values() for d in cls.devices))
