"""The export's TensorRT engines (`adafocus-export --trt`), on torch CUDA tensors and one stream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adafocus.errors import AdaFocusError
from adafocus.export.graphs import GRAPH_NAMES
from adafocus.export.manifest import Export
from adafocus.runtime.arrays import TorchArrays
from adafocus.runtime.backends.base import Backend, register


@register
class TensorRTBackend(Backend):
    """One TensorRT engine per graph; batches past the engines' profile are split by the runtime."""

    name = "tensorrt"
    devices = {"cuda": ("fp16", "fp32")}
    default_device = "cuda"

    @classmethod
    def recorded_max_batch(cls, export: Export, kind: str, precision: str) -> int | None:
        # the profile of each engine's first input, as build_engine records it (the open backend reads
        # the same from the engines themselves)
        records = export.manifest["engines"].get(precision, {})
        profiles = [
            records[g].get("profile", {}).get(export.graph(g).input_names[0]) for g in GRAPH_NAMES if g in records
        ]
        ends = [p["max"][0] for p in profiles if p]
        return min(ends) if len(ends) == len(GRAPH_NAMES) else None

    def __init__(
        self,
        export: Export,
        device: str = "cuda",
        *,
        precision: str | None = None,
        graphs: Sequence[str] = GRAPH_NAMES,
    ):
        from adafocus.export.tensorrt import unavailable_reason
        from adafocus.runtime.backends.tensorrt_engine import TensorRTEngine

        if reason := unavailable_reason():
            raise AdaFocusError(f"backend 'tensorrt': {reason}", "use backend 'onnxruntime' or 'pytorch'")
        super().__init__(export, device, precision, graphs)
        self.arrays = TorchArrays(torch.device(device))
        self.engines = {
            g: TensorRTEngine(export.engine_path(g, self.precision), device=self.device) for g in self.graphs
        }
        profiles = {g: self.engines[g].profile_range(self.inputs[g][0]) for g in self.graphs}
        if low := sorted(g for g, (smallest, _, _) in profiles.items() if smallest[0] != 1):
            raise AdaFocusError(
                f"the {self.precision} TensorRT engines of {', '.join(low)} in {export.path} refuse batches below "
                f"{profiles[low[0]][0][0]}; the early-exit loop calls every graph with as few as one video",
                "rebuild them with adafocus-export --trt and a --batch-range from 1 (the default)",
            )
        self.max_batch = min(largest[0] for _, _, largest in profiles.values())

    def _run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        return self.engines[graph].run({k: v.contiguous() for k, v in feeds.items()})

    def describe(self) -> dict:
        return super().describe() | {"gpu": torch.cuda.get_device_name(self.device)}
