"""Every export ends here: ONNX Runtime against PyTorch on the same inputs.

Cases: random inputs and real ones (generated videos passed through the preceding sub-networks), each
at batch 1 and a larger batch. Per output we record the largest absolute error and the relative
error `max|onnx - torch| / max|torch|` (relative to the output's scale: element-wise ratios explode
where a value crosses zero). Past the tolerance the export fails, naming the graph and the output.

Integer outputs (the policy's `cube_starts`) are checked exactly against the crop rule applied to the
graph's own `centres`: a 1e-7 difference in a sigmoid may legitimately move a start across an integer
boundary, but the graph must apply the rule exactly. For Uni-AdaFocus the rule is that of its frames
(floors of the graph's own `frame_positions`, made distinct) and boxes (the corner's floor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from adafocus.data.synthetic import SyntheticTask
from adafocus.errors import AdaFocusError
from adafocus.export.graphs import GraphSpec, graph_specs, real_inputs
from adafocus.model.cubes import plan_cubes
from adafocus.model.families import Model
from adafocus.model.presets import Preset
from adafocus.model.uni import frames_at, plan_starts

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


def validation_cases(model: Model, batch: int) -> dict[str, list[Case]]:
    """Random and real inputs at batch 1 and `batch`, per graph: what every engine of a graph is
    checked on (ONNX graphs, AOTInductor packages)."""
    videos, _ = SyntheticTask.for_preset(model.preset, seed=0).batch("test", range(batch))
    generator = torch.Generator().manual_seed(0)
    specs = graph_specs(model)
    cases: dict[str, list[Case]] = {name: [] for name in specs}
    for size in (1, batch):
        for name, inputs in real_inputs(model, videos[:size], generator).items():
            cases[name].append(Case(f"real, batch {size}", inputs))
        for name, spec in specs.items():
            cases[name].append(Case(f"random, batch {size}", spec.random_inputs(size, generator)))
    return cases


def validate_graph(
    spec: GraphSpec, path: Path, cases: list[Case], preset: Preset, rtol: float = FP32_RTOL
) -> dict[str, dict]:
    """Run every case through ONNX Runtime and PyTorch; returns {output: {max_abs_error, max_rel_error}}."""
    session = cpu_session(path)

    def run(inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)}
        return session.run(list(spec.outputs), feeds)

    return compare_outputs(spec, run, cases, preset, rtol, engine="ONNX Runtime")


def compare_outputs(
    spec: GraphSpec, run: Callable, cases: list[Case], preset: Preset, rtol: float, *, engine: str
) -> dict[str, dict]:
    """`run(inputs) -> outputs` (numpy, in `spec.outputs` order) against `spec.module` on every case.
    Integer `cube_starts` must follow the crop rule for the engine's own centres exactly; the rest
    must be within `rtol` of the output's scale. Returns the worst errors per output."""
    worst = {name: {"max_abs_error": 0.0, "max_rel_error": 0.0} for name in spec.outputs}
    for case in cases:
        with torch.no_grad():
            expected = spec.module(*case.inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = dict(zip(spec.outputs, run(case.inputs)))
        for name, want in zip(spec.outputs, expected):
            want = want.detach().cpu().numpy()
            if got[name].shape != want.shape or got[name].dtype != want.dtype:
                raise AdaFocusError(
                    f"{spec.name} graph, output {name!r} ({case.label}): {engine} gives "
                    f"{got[name].dtype}{list(got[name].shape)}, PyTorch {want.dtype}{list(want.shape)}",
                    "the export is broken; report this with the preset",
                )
            max_abs, max_rel = _errors(got[name], want)
            if name == "cube_starts":
                rule = _starts_rule(got, preset)
                if not np.array_equal(got[name], rule):
                    raise AdaFocusError(
                        f"{spec.name} graph, output 'cube_starts' ({case.label}) does not follow the crop rule "
                        f"for its own centres (off by up to {int(np.abs(got[name] - rule).max())})",
                        "the export is broken; report this with the preset",
                    )
            elif not max_rel <= rtol:  # NaN too: `nan > rtol` is False, and max() below would drop it
                raise AdaFocusError(
                    f"{spec.name} graph, output {name!r} ({case.label}): relative error {max_rel:.2e} "
                    f"(max abs {max_abs:.2e}) is past the {'fp32' if rtol == FP32_RTOL else 'fp16'} tolerance "
                    f"{rtol:.0e} ({engine})",
                    "the export does not reproduce PyTorch; report this with the preset and opset",
                )
            worst[name]["max_abs_error"] = max(worst[name]["max_abs_error"], max_abs)
            worst[name]["max_rel_error"] = max(worst[name]["max_rel_error"], max_rel)
    return worst


def _starts_rule(got: dict[str, np.ndarray], preset: Preset) -> np.ndarray:
    """The integer plan the rule gives for the graph's own real-valued outputs."""
    centres = torch.from_numpy(got["centres"])
    if preset.family == "uni":
        frames = frames_at(torch.from_numpy(got["frame_positions"]), preset.num_frames)
        return plan_starts(centres, frames).numpy()
    return plan_cubes(centres, preset).numpy()
