"""Every export ends here: ONNX Runtime against PyTorch on the same inputs.

Cases: random inputs and real ones (generated videos passed through the preceding sub-networks), each
at batch 1 and a larger batch. Per output we record the largest absolute error and the relative
error `max|onnx - torch| / max|torch|` (relative to the output's scale: element-wise ratios explode
where a value crosses zero). Past the tolerance the export fails, naming the graph and the output.

Integer outputs (the policy's `cube_starts`) are checked exactly against the crop rule applied to the
graph's own `centres`: a 1e-7 difference in a sigmoid may legitimately move a start across an integer
boundary, but the graph must apply the rule exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from adafocus.errors import AdaFocusError
from adafocus.export.graphs import GraphSpec
from adafocus.model.cubes import plan_cubes
from adafocus.model.presets import Preset

FP32_RTOL = 1e-4


@dataclass
class Case:
    label: str  # e.g. "random, batch 5"
    inputs: tuple[torch.Tensor, ...]


def cpu_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if session.get_providers()[0] != "CPUExecutionProvider":  # read back: ORT may silently pick another
        raise AdaFocusError(f"ONNX Runtime ran {path.name} on {session.get_providers()}, not the CPU")
    return session


def _errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(want).max()) if want.size else 0.0
    return max_abs, (max_abs / scale if scale > 0 else max_abs)


def validate_graph(
    spec: GraphSpec, path: Path, cases: list[Case], preset: Preset, rtol: float = FP32_RTOL
) -> dict[str, dict]:
    """Run every case through ONNX Runtime and PyTorch; returns {output: {max_abs_error, max_rel_error}}."""
    session = cpu_session(path)
    worst = {name: {"max_abs_error": 0.0, "max_rel_error": 0.0} for name in spec.outputs}
    for case in cases:
        with torch.no_grad():
            expected = spec.module(*case.inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, case.inputs)}
        got = dict(zip(spec.outputs, session.run(list(spec.outputs), feeds)))
        for name, want in zip(spec.outputs, expected):
            want = want.numpy()
            if got[name].shape != want.shape or got[name].dtype != want.dtype:
                raise AdaFocusError(
                    f"{spec.name} graph, output {name!r} ({case.label}): ONNX Runtime gives "
                    f"{got[name].dtype}{list(got[name].shape)}, PyTorch {want.dtype}{list(want.shape)}",
                    "the export is broken; report this with the preset",
                )
            max_abs, max_rel = _errors(got[name], want)
            if name == "cube_starts":
                rule = plan_cubes(torch.from_numpy(got["centres"]), preset).numpy()
                if not np.array_equal(got[name], rule):
                    raise AdaFocusError(
                        f"{spec.name} graph, output 'cube_starts' ({case.label}) does not follow the crop rule "
                        f"for its own centres (off by up to {int(np.abs(got[name] - rule).max())})",
                        "the export is broken; report this with the preset",
                    )
            elif max_rel > rtol:
                raise AdaFocusError(
                    f"{spec.name} graph, output {name!r} ({case.label}): relative error {max_rel:.2e} "
                    f"(max abs {max_abs:.2e}) is past the fp32 tolerance {rtol:.0e}",
                    "the export does not reproduce PyTorch; report this with the preset and opset",
                )
            worst[name]["max_abs_error"] = max(worst[name]["max_abs_error"], max_abs)
            worst[name]["max_rel_error"] = max(worst[name]["max_rel_error"], max_rel)
    return worst
