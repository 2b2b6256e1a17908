"""Eager PyTorch on the export's own weights (`model.pt`): the reference's arithmetic, on the CPU or a
CUDA GPU (fp16 autocast there if asked)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adafocus.errors import AdaFocusError
from adafocus.export.graphs import GRAPH_NAMES, graph_specs
from adafocus.export.manifest import Export
from adafocus.model.numerics import strict_fp32
from adafocus.runtime.arrays import TorchArrays
from adafocus.runtime.backends.base import Backend, register


@register
class PyTorchBackend(Backend):
    """The graphs' PyTorch modules, run eagerly."""

    name = "pytorch"
    devices = {"cpu": ("fp32",), "cuda": ("fp32", "fp16")}

    def __init__(
        self,
        export: Export,
        device: str = "cpu",
        *,
        precision: str | None = None,
        graphs: Sequence[str] = GRAPH_NAMES,
    ):
        super().__init__(export, device, precision, graphs)
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():  # before any CUDA call
            raise AdaFocusError("device 'cuda' asked for, but torch sees no CUDA GPU", "use --device cpu")
        self.arrays = TorchArrays(torch.device(device))
        model = export.load_model().to(self.device)
        self.modules = {name: spec.module for name, spec in graph_specs(model).items() if name in self.graphs}

    @torch.inference_mode()
    def _run(self, graph: str, feeds: dict[str, Any]) -> dict[str, Any]:
        args = [feeds[name] for name in self.inputs[graph]]
        with strict_fp32(), torch.autocast("cuda", dtype=torch.float16, enabled=self.precision == "fp16"):
            out = self.modules[graph](*args)
        out = out if isinstance(out, tuple) else (out,)
        return {name: y.float() if y.is_floating_point() else y for name, y in zip(self.outputs[graph], out)}

    def describe(self) -> dict:
        return super().describe() | {"threads": torch.get_num_threads()}
