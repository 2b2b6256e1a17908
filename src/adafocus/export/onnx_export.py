"""torch -> ONNX for one declared graph.

The current exporter (`torch.onnx.export(..., dynamo=True)`, via torch.export) is tried first. If it
fails, the TorchScript exporter (`dynamo=False`, deprecated but still shipped) is the documented
fallback, used only when asked for (`exporter="torchscript"`) or when the dynamo export raised; the
manifest records which one wrote each graph. Either way the file must pass `onnx.checker` and
carries every weight inside it (no external data), so one sha256 covers the graph.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import torch

from adafocus.errors import AdaFocusError
from adafocus.export.graphs import GraphSpec

EXPORTERS = ("dynamo", "torchscript")
EXAMPLE_BATCH = 3  # > 1: torch.export specialises dims whose example size is 0 or 1


def _example_inputs(spec: GraphSpec) -> tuple[torch.Tensor, ...]:
    return spec.random_inputs(EXAMPLE_BATCH, torch.Generator().manual_seed(0))


def _dynamo_export(spec: GraphSpec, path: Path, opset: int) -> None:
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {}
    for t in spec.inputs:
        axes = {}
        for axis, d in enumerate(t.shape):
            if isinstance(d, str):
                axes[axis] = dims.setdefault(d, torch.export.Dim(d, min=1, max=1 << 16))
        dynamic_shapes[t.name] = axes
    torch.onnx.export(
        spec.module,
        _example_inputs(spec),
        str(path),
        dynamo=True,
        opset_version=opset,
        input_names=[t.name for t in spec.inputs],
        output_names=list(spec.outputs),
        dynamic_shapes=dynamic_shapes,
        external_data=False,
        optimize=True,
        verbose=False,
    )


def _torchscript_export(spec: GraphSpec, path: Path, opset: int) -> None:
    dynamic_axes = {t.name: {axis: d for axis, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs} | {
        name: {0: "batch"} for name in spec.outputs
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice: the fallback is chosen knowingly
        torch.onnx.export(
            spec.module,
            _example_inputs(spec),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[t.name for t in spec.inputs],
            output_names=list(spec.outputs),
            dynamic_axes=dynamic_axes,
        )


def export_graph(spec: GraphSpec, path: Path, *, opset: int, exporter: str = "dynamo") -> str:
    """Write `spec` to `path` and check it; returns the exporter that wrote it."""
    if exporter not in EXPORTERS:
        raise AdaFocusError(f"unknown exporter {exporter!r}", f"use one of {', '.join(EXPORTERS)}")
    used = exporter
    spec.module.eval()
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()) as chatter, warnings.catch_warnings():
        # two inputs sharing the declared `batch` axis make the exporter say it keeps one name
        warnings.filterwarnings("ignore", message="# The axis name")
        try:
            if exporter == "dynamo":
                try:
                    _dynamo_export(spec, path, opset)
                except Exception as first:  # the exporter raises many types; the fallback is documented
                    used = "torchscript"
                    try:
                        _torchscript_export(spec, path, opset)
                    except Exception as second:
                        raise AdaFocusError(
                            f"exporting the {spec.name} graph failed with both exporters: "
                            f"dynamo: {type(first).__name__}: {str(first)[:300]}; "
                            f"torchscript: {type(second).__name__}: {str(second)[:300]}",
                            "report this with the preset and the torch version",
                        ) from None
            else:
                _torchscript_export(spec, path, opset)
        except AdaFocusError:
            raise
        except Exception as e:
            raise AdaFocusError(
                f"exporting the {spec.name} graph failed: {type(e).__name__}: {str(e)[:300]}\n{chatter.getvalue()}",
                "report this with the preset and the torch version",
            ) from None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise AdaFocusError(f"{path.name} fails onnx.checker: {str(e)[:500]}", "report this with the preset") from None
    _name_symbolic_axes(path, spec)
    return used


def _name_symbolic_axes(path: Path, spec: GraphSpec) -> None:
    """Give every dynamic axis of the graph's inputs and outputs a stable name (`batch`, `pool`) so
    the manifest and a C++ program can read them; exporters name them `s0`, `batch_size`, ..."""
    model = onnx.load(str(path))
    names = {}
    for value, declared in zip(model.graph.input, spec.inputs):
        for dim, want in zip(value.type.tensor_type.shape.dim, declared.shape):
            if isinstance(want, str):
                if dim.dim_param:
                    names[dim.dim_param] = want
                dim.ClearField("dim_value")
                dim.dim_param = want
    for value in list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    onnx.save(model, str(path))
