"""One model -> one export directory: five validated ONNX graphs, optional TensorRT engines, and the
sealed manifest. Everything is written into a temporary sibling directory that is renamed into place
at the end, so a failed export leaves nothing behind."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import onnx
import torch

from adafocus import flops
from adafocus.errors import AdaFocusError
from adafocus.export.graphs import DENSE, GraphSpec, graph_specs, real_inputs
from adafocus.export.manifest import (
    FORMAT,
    PROTOCOL_VERSION,
    SCHEMA_FILE,
    SCHEMA_VERSION,
    Export,
    open_export,
    schema,
    write_manifest,
)
from adafocus.export.onnx_export import export_graph
from adafocus.export.onnx_flops import count_gmacs
from adafocus.export.validate import FP32_RTOL, Case, validate_graph
from adafocus.files import partial_path, remove_stale_partials
from adafocus.model.checkpoint import save_checkpoint
from adafocus.model.networks import AdaFocusV3
from adafocus.preprocess import MEAN, STD

DEFAULT_OPSET = 18
PYTORCH_FILE = "model.pt"
PRECISIONS = ("fp32", "fp16")
GFLOPS_AGREEMENT = 1e-3  # ONNX count vs PyTorch count, relative
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}


def _tensors(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type))})
    return out


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("adafocus-deploy", "torch", "onnx", "onnxscript", "onnxruntime", "numpy", "tensorrt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _validation_cases(model: AdaFocusV3, batch: int) -> dict[str, list[Case]]:
    """Random and real inputs at batch 1 and `batch`, per graph."""
    from adafocus.train.synthetic import SyntheticTask  # generated videos; the task caps its class count

    preset = model.preset
    task = SyntheticTask(dataclasses.replace(preset, num_classes=min(preset.num_classes, 10)), seed=0)
    videos, _ = task.batch("test", range(batch))
    generator = torch.Generator().manual_seed(0)
    specs = graph_specs(model)
    cases: dict[str, list[Case]] = {name: [] for name in specs}
    for size in (1, batch):
        for name, inputs in real_inputs(model, videos[:size], generator).items():
            cases[name].append(Case(f"real, batch {size}", inputs))
        for name, spec in specs.items():
            cases[name].append(Case(f"random, batch {size}", spec.random_inputs(size, generator)))
    return cases


class _Fp16Graph(torch.nn.Module):
    """A graph computing in float16 with the fp32 interface: TensorRT's strong typing takes precision
    from the graph's own dtypes, so an fp16 engine needs an fp16 graph."""

    def __init__(self, spec: GraphSpec):
        super().__init__()
        self.inner = copy.deepcopy(spec.module).half()  # a copy: the fp32 model stays as it is

    def forward(self, *inputs):
        inputs = [x.half() if x.is_floating_point() else x for x in inputs]
        outputs = self.inner(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return tuple(y.float() if y.is_floating_point() else y for y in outputs)


def _fp16_spec(spec: GraphSpec) -> GraphSpec:
    return dataclasses.replace(spec, module=_Fp16Graph(spec))


def export_model(
    model: AdaFocusV3,
    out: str | os.PathLike,
    *,
    class_names: list[str],
    weights: dict,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    validate_batch: int = 5,
    trt: bool = False,
    precisions: tuple[str, ...] = ("fp16",),
    batch_range: tuple[int, int, int] = (1, 128, 128),
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Export:
    """Export, validate and seal `model` into the directory `out`; returns the opened export."""
    out = Path(out)
    if out.exists() and not force:
        raise AdaFocusError(f"{out} already exists", "pass --force to replace it, or choose another --out")
    if opset < 18:
        raise AdaFocusError(f"opset {opset} is too old", "use --opset 18 or newer")
    if trt:
        from adafocus.export import tensorrt as trt_build  # its tensorrt import is lazy too

        if reason := trt_build.unavailable_reason():
            raise AdaFocusError(f"--trt: {reason}", "drop --trt to write the ONNX graphs only")
    if bad := [p for p in precisions if p not in PRECISIONS]:
        raise AdaFocusError(f"unknown precision {bad}", f"use {' or '.join(PRECISIONS)}")
    if not 1 <= batch_range[0] <= batch_range[1] <= batch_range[2]:
        raise AdaFocusError(f"batch range {batch_range} is not min <= opt <= max", "e.g. --batch-range 1:128:128")

    preset = model.preset
    model = model.eval()
    specs = graph_specs(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_partials(out.parent):
        log(f"removed {stale}, left by an export that was killed")
    work = partial_path(out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        log(f"exporting preset {preset.name} ({weights['source']}) to {out}")
        cases = _validation_cases(model, validate_batch)
        torch_count = flops.count_flops(preset)
        expected = {
            "glance": torch_count.glance + torch_count.classifier_glance,
            "policy": torch_count.policy,
            "crop": 0.0,
            "local": torch_count.cube,
            "classifier": torch_count.classifier_step,
            # the dense graph has no p0 head: the baseline's cost less that one linear layer
            DENSE: torch_count.dense_baseline - preset.hidden_dim * preset.num_classes / 1e9,
        }
        graphs, validation = {}, {}
        for name, spec in specs.items():
            started = time.perf_counter()
            used = export_graph(spec, work / spec.file, opset=opset, exporter=exporter)
            gmacs = count_gmacs(work / spec.file)
            if abs(gmacs - expected[name]) > GFLOPS_AGREEMENT * max(expected[name], 1e-9):
                raise AdaFocusError(
                    f"the {name} graph counts {gmacs:.6f} GMACs from ONNX but {expected[name]:.6f} from PyTorch",
                    "the export changed the network; report this with the preset",
                )
            validation[name] = validate_graph(spec, work / spec.file, cases[name], preset)
            proto = onnx.load(str(work / spec.file), load_external_data=False)
            graphs[name] = {
                "file": spec.file,
                "exporter": used,
                "opset": opset,
                "inputs": _tensors(proto.graph.input),
                "outputs": _tensors(proto.graph.output),
                "gflops": gmacs,
                "gflops_pytorch": expected[name],
            }
            worst = max(v["max_rel_error"] for k, v in validation[name].items() if k != "cube_starts")
            log(
                f"  {name:<10} {used} export, {gmacs:8.4f} GFLOPs, validated "
                f"(max rel error {worst:.1e}) in {time.perf_counter() - started:.1f} s"
            )

        # the PyTorch backend of the runtime runs these weights, so the directory is self-contained
        save_checkpoint(work / PYTORCH_FILE, model, list(class_names), meta={"weights": weights})
        # and a reader in any language finds the manifest's JSON Schema beside it (sealed like the rest)
        (work / SCHEMA_FILE).write_text(json.dumps(schema(), indent=2) + "\n")

        engines = {}
        if trt:
            engines = _build_engines(specs, graphs, work, precisions, batch_range, opset, exporter, log)

        first = graphs["glance"]["gflops"]
        per_cube = graphs["local"]["gflops"] + graphs["classifier"]["gflops"]
        k = preset.max_cubes
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "preset": preset.to_dict(),
            "class_names": list(class_names),
            "weights": weights,
            "input": {
                "name": "videos",
                "layout": "B, T, C, H, W (RGB)",
                "shape": ["batch", *preset.video_shape],
                "dtype": "float32",
                "sampling": f"TSN: frame floor((i + 0.5) * L / {preset.num_frames}) of a video of L frames",
                "resize_shorter_side": round(preset.frame_size * 256 / 224),
                "crop": f"centre {preset.frame_size}x{preset.frame_size}",
                "scale": 1 / 255,
                "mean": [float(m) for m in MEAN],
                "std": [float(s) for s in STD],
                "glance_frames": model.glance_index.tolist(),
            },
            "graphs": graphs,
            "gflops": {
                "per_exit_step": [first] + [first + graphs["policy"]["gflops"] + t * per_cube for t in range(1, k + 1)],
                "per_exit_step_pytorch": torch_count.exit_cumulative,
                "dense_baseline": graphs[DENSE]["gflops"],
                "dense_baseline_pytorch": torch_count.dense_baseline,
            },
            "validation": validation,
            "tolerance": {
                "max_rel_error": FP32_RTOL,
                "definition": "max |onnx - torch| / max |torch| per output; cube_starts exactly by the crop rule",
                "cases": [c.label for c in cases["glance"]],
            },
            "thresholds": None,
            "budgets": [],
            "protocol": PROTOCOL | {"max_cubes": k},
            "engines": engines,
            "pytorch": PYTORCH_FILE,
            "packages": _package_versions(),
        }
        write_manifest(work, manifest)
        export = open_export(work)  # the directory must pass the same checks every reader applies
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        log(f"wrote {out} ({len(export.manifest['files'])} files, manifest sealed)")
        return open_export(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_engines(specs, graphs, work, precisions, batch_range, opset, exporter, log) -> dict:
    from adafocus.export import tensorrt as trt_build

    engines: dict[str, dict] = {}
    cache = work / "timing.cache"
    for precision in precisions:
        engines[precision] = {}
        for name, spec in specs.items():
            source = work / spec.file
            if precision == "fp16":
                source = work / f"{name}.fp16.onnx"
                export_graph(_fp16_spec(spec), source, opset=opset, exporter=exporter)
                graphs[name].setdefault("variants", {})["fp16"] = source.name
            engine = work / f"{name}.{precision}.engine"
            log(f"  building TensorRT {precision} engine for {name} (batch {batch_range[0]}..{batch_range[2]})")
            engines[precision][name] = trt_build.build_engine(
                source, engine, batch_range=batch_range, timing_cache=cache
            )
    return engines


PROTOCOL = {
    "version": PROTOCOL_VERSION,
    "document": "docs/runtime-protocol.md",
    "exit_rule": "a video exits after step t (t = 0 after the glance, t = k after cube k) when "
    "entropy <= thresholds[t]; after cube max_cubes every remaining video exits; "
    "thresholds null = never exit early",
    "feeds": {
        "glance.videos": "the preprocessed videos (B, T, 3, H, W)",
        "policy.maps": "glance.maps of the videos that did not exit at step 0",
        "crop.pool": "the same videos tensor that went into the glance (uncompacted)",
        "crop.rows": "indices into crop.pool of the videos still running",
        "crop.starts": "policy.cube_starts[:, k - 1] of those videos, for cube k",
        "local.cubes": "crop.cubes",
        "classifier.features": "local.features",
        "classifier.local_state": "zeros (B, hidden) for cube 1, then classifier.next_local_state",
        "classifier.global_state": "glance.global_state of those videos",
        "classifier.step": "k (int64, one per row; rows at different steps may share a call)",
    },
}
