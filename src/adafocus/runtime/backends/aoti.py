"""AOTInductor packages (`adafocus-export --aoti`): the graphs compiled ahead of time by Inductor,
on torch tensors, CPU or CUDA. The same packages run from C++ (cpp/)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adafocus.export.aoti import PRECISIONS, packages_for
from adafocus.export.graphs import GRAPH_NAMES
from adafocus.export.manifest import Export
from adafocus.model.numerics import strict_fp32
from adafocus.runtime.arrays import TorchArrays
from adafocus.runtime.backends.base import Backend, register


@register
class AotiBackend(Backend):
    """One loaded package per graph. Batches past the packages' batch range are split by the runtime."""

    name = "aoti"
    devices = PRECISIONS

    @classmethod
    def recorded_max_batch(cls, export: Export, kind: str, precision: str) -> int | None:
        records = export.manifest["engines"].get("aoti", {}).get(kind, {}).get(precision, {})
        ends = [records[g]["batch_range"][2] for g in GRAPH_NAMES if g in records]
        return min(ends) if len(ends) == len(GRAPH_NAMES) else None

    def __init__(
        self,
        export: Export,
        device: str = "cpu",
        *,
        precision: str | None = None,
        graphs: Sequence[str] = GRAPH_NAMES,
    ):
        super().__init__(export, device, precision, graphs)
        kind = device.split(":")[0]
        records = packages_for(export, kind, self.precision, self.graphs)  # refuses packages that cannot run here
        self.arrays = TorchArrays(torch.device(device))
        self.packages = {
            g: torch._inductor.aoti_load_package(str(export.path / records[g]["file"])) for g in self.graphs
        }
        self.max_batch = min(records[g]["batch_range"][2] for g in self.graphs)

    @torch.inference_mode()
    def _run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        with strict_fp32():  # the packages call cuDNN/cuBLAS, which read these switches when they run
            out = self.packages[graph](*[feeds[name].contiguous() for name in self.inputs[graph]])
        out = [out] if isinstance(out, torch.Tensor) else out  # a package with one output returns it bare
        return dict(zip(self.outputs[graph], out))

    def describe(self) -> dict:
        return super().describe() | {"threads": torch.get_num_threads(), "torch": torch.__version__}
