"""One model -> one export directory: five validated ONNX graphs, optional TensorRT engines, and the
sealed manifest. Everything is written into a temporary sibling directory that is renamed into place
at the end, so a failed export leaves nothing behind."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from adafocus.errors import AdaFocusError, InternalError
from adafocus.export.graphs import DENSE, GraphSpec, check_batch_range, graph_specs
from adafocus.export.manifest import (
    FORMAT,
    MANIFEST,
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
from adafocus.export.validate import FP32_RTOL, validate_graph, validation_cases
from adafocus.files import partial_path, remove_stale_partials
from adafocus.machine import package_versions
from adafocus.model import flops
from adafocus.model.checkpoint import save_checkpoint
from adafocus.model.families import Model
from adafocus.model.preprocess import MEAN, STD

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


class Fp16Graph(torch.nn.Module):
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
    return dataclasses.replace(spec, module=Fp16Graph(spec))


def export_model(
    model: Model,
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
    dense: bool = True,
    log: Callable[[str], None] = print,
) -> Export:
    """Export, validate and seal `model` into the directory `out`; returns the opened export.

    `dense=False` leaves out the dense baseline graph: only adafocus-bench's comparison runs it (the
    loop, calibration, INT8 and serving do not), and on a paper preset it is half the export's time."""
    out = Path(os.path.abspath(out))  # `--out .` has no name to build a sibling `.NAME.partial-PID` from
    _check_arguments(out, force, opset, trt, precisions, batch_range)
    preset = model.preset
    model = model.eval()
    specs = graph_specs(model, dense=dense)
    work = partial_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_partials(out.parent):
            log(f"removed {stale}, left by an export that was killed")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    except OSError as e:  # a parent that is a file, a read-only folder: before any work, not a traceback
        raise AdaFocusError(
            f"cannot create the export directory {out}: {e.strerror or e}", "choose an --out in a writable folder"
        ) from None
    try:
        log(f"exporting preset {preset.name} ({weights['source']}) to {out}")
        cases = validation_cases(model, validate_batch)
        expected = _pytorch_gflops(preset)
        graphs, validation = {}, {}
        for name, spec in specs.items():
            graphs[name], validation[name] = _export_one(
                spec, preset, work, cases[name], expected[name], opset, exporter, log
            )
        # the PyTorch backend of the runtime runs these weights, so the directory is self-contained
        save_checkpoint(work / PYTORCH_FILE, model, list(class_names), meta={"weights": weights})
        # and a reader in any language finds the manifest's JSON Schema beside it (sealed like the rest)
        (work / SCHEMA_FILE).write_text(json.dumps(schema(), indent=2) + "\n", encoding="utf-8")
        engines = _build_engines(specs, graphs, work, precisions, batch_range, opset, exporter, log) if trt else {}
        manifest = _manifest(model, class_names, weights, graphs, validation, engines, cases)
        write_manifest(work, manifest)
        export = open_export(work)  # the directory must pass the same checks every reader applies
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        log(f"wrote {out} ({len(export.files)} files, manifest sealed)")
        return open_export(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_arguments(out: Path, force: bool, opset: int, trt: bool, precisions, batch_range) -> None:
    """Every refusal that needs no work, before any."""
    if out.exists() and not force:
        raise AdaFocusError(f"{out} already exists", "pass --force to replace it, or choose another --out")
    # --force replaces an export (or an empty folder, or a damaged export: the built-in cache rebuilds
    # those), never whatever else the path names: a mistyped --out (a home or project folder) would
    # otherwise be deleted with everything in it
    if out.exists() and (foreign := _not_of_an_export(out)):
        raise AdaFocusError(
            f"{out} is not an adafocus export (it holds {foreign}); --force replaces only exports or empty folders",
            "choose another --out, or remove it yourself if it is really to go",
        )
    if opset < 18:
        raise AdaFocusError(f"opset {opset} is too old", "use --opset 18 or newer")
    if trt:
        from adafocus.export import tensorrt as trt_build  # its tensorrt import is lazy too

        if reason := trt_build.unavailable_reason():
            raise AdaFocusError(f"--trt: {reason}", "drop --trt to write the ONNX graphs only")
    if bad := [p for p in precisions if p not in PRECISIONS]:
        raise AdaFocusError(f"unknown precision {bad}", f"use {' or '.join(PRECISIONS)}")
    check_batch_range(batch_range)


_EXPORT_FILES = (MANIFEST, SCHEMA_FILE, PYTORCH_FILE, "timing.cache", "*.onnx", "*.engine", "*.pt2")


def _not_of_an_export(out: Path) -> str | None:
    """The first entry of `out` that no export writes (or `out` itself, when it is no folder); None if none."""
    if not out.is_dir():
        return "a file, not a folder"
    for entry in sorted(out.iterdir()):
        if entry.name.startswith("."):  # partial and temporary files of the writers
            continue
        if entry.is_dir() or not any(entry.match(pattern) for pattern in _EXPORT_FILES):
            return entry.name
    return None


def _pytorch_gflops(preset) -> dict[str, float]:
    """What each graph must cost, counted from the PyTorch modules."""
    count = flops.count_flops(preset)
    return {
        "glance": count.glance + count.classifier_glance,
        "policy": count.policy,
        "crop": 0.0,
        "local": count.cube,
        "classifier": count.classifier_step + count.classifier_step_unused,  # the graph computes every head
        # the dense graph has no p0 head: the baseline's cost less that one linear layer
        DENSE: count.dense_baseline - preset.hidden_dim * preset.num_classes / 1e9,
    }


def _export_one(spec: GraphSpec, preset, work: Path, cases, expected_gflops, opset, exporter, log) -> tuple[dict, dict]:
    """One graph: export, count its MACs against PyTorch's count, validate; its manifest record."""
    started = time.perf_counter()
    path = work / spec.file
    used = export_graph(spec, path, opset=opset, exporter=exporter)
    gmacs = count_gmacs(path)
    if abs(gmacs - expected_gflops) > GFLOPS_AGREEMENT * max(expected_gflops, 1e-9):
        raise InternalError(
            f"the {spec.name} graph counts {gmacs:.6f} GMACs from ONNX but {expected_gflops:.6f} from PyTorch: "
            "the export changed the network; report this with the preset"
        )
    validation = validate_graph(spec, path, cases, preset)
    proto = onnx.load(str(path), load_external_data=False)
    record = {
        "file": spec.file,
        "exporter": used,
        "opset": opset,
        "inputs": _tensors(proto.graph.input),
        "outputs": _tensors(proto.graph.output),
        "gflops": gmacs,
        "gflops_pytorch": expected_gflops,
    }
    worst = max(v["max_rel_error"] for k, v in validation.items() if k != "cube_starts")
    log(
        f"  {spec.name:<10} {used} export, {gmacs:8.4f} GFLOPs, validated "
        f"(max rel error {worst:.1e}) in {time.perf_counter() - started:.1f} s"
    )
    return record, validation


def _manifest(model: Model, class_names, weights, graphs, validation, engines, cases) -> dict:
    """The manifest before sealing (write_manifest adds the file list and the hashes)."""
    preset = model.preset
    k = preset.max_cubes
    count = flops.count_flops(preset)
    # a Uni-AdaFocus step is costed with the one head it uses (the official accounting); the other
    # heads the classifier graph computes are said separately
    per_cube = graphs["local"]["gflops"] + graphs["classifier"]["gflops"] - count.classifier_step_unused
    return {
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
            "preprocessing": preset.preprocessing,
            "resize_shorter_side": preset.resize_shorter_side,  # null: frames are cropped as they are
            "crop": f"centre {preset.frame_size}x{preset.frame_size}",
            "scale": 1 / 255,
            "mean": [float(m) for m in MEAN],
            "std": [float(s) for s in STD],
            "glance_frames": model.glance_index.tolist(),
        },
        "graphs": graphs,
        "gflops": {
            "per_exit_step": flops.exit_costs(graphs["glance"]["gflops"], graphs["policy"]["gflops"], per_cube, k),
            "per_exit_step_pytorch": count.exit_cumulative,
            **({"dense_baseline": graphs[DENSE]["gflops"]} if DENSE in graphs else {}),
            "dense_baseline_pytorch": count.dense_baseline,
            "classifier_step_unused": count.classifier_step_unused,
        },
        "plan": PLANS[preset.family],
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
        "packages": package_versions(),
    }


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


# What the policy graph's plan means, per family (predict's JSONL and the server carry it under these names).
PLANS = {
    "adafocusv3": {
        "family": "adafocusv3",
        "centres": "(K, 3) cube centres (x, y, t) in [0, 1]",
        "cube_starts": "(K, 3) int64 (x0, y0, t0): the cube covers [x0, x0 + w'), [y0, y0 + h'), [t0, t0 + T')",
    },
    "uni": {
        "family": "uni",
        "centres": "(K, 4) patch boxes (x0, y0, width, height) in frame pixels: the window resampled "
        "(bilinear, affine_grid + grid_sample, align_corners=False) to the patch",
        "cube_starts": "(K, 3) int64 (floor x0, floor y0, frame): t0 is the frame the patch is taken from",
        "frame_positions": "(K,) float: the policy graph's real-valued frame positions (frames are their floors, "
        "made distinct and increasing)",
    },
}

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
        "crop.boxes": "Uni-AdaFocus only: policy.centres[:, k - 1] of those videos (the patch boxes)",
        "local.cubes": "crop.cubes",
        "classifier.features": "local.features",
        "classifier.local_state": "zeros (B, hidden) for cube 1, then classifier.next_local_state",
        "classifier.global_state": "glance.global_state of those videos",
        "classifier.step": "k (int64, one per row; rows at different steps may share a call)",
    },
}
