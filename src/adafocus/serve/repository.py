"""A Triton model repository for an export: the server's contract as declarations (config.pbtxt), and
a one-line model.py that hands every request to `adafocus.serve.triton_model`.

    REPOSITORY/
      adafocus/               continuous batching: each video answered when it exits (max_batch_size 0)
        config.pbtxt  labels.txt  1/model.py  [1/export/: the export itself, with carry_export]
      adafocus_per_batch/     Triton's dynamic batcher + one Runtime.predict per batch: the baseline
      adafocus_dense/         (optional) the dense graph per Triton batch: what one deploys without AdaFocus

Inputs, outputs and request parameters are documented in docs/serving.md. The same repository runs
under `adafocus serve` and in NVIDIA's Triton containers (with adafocus-deploy installed there).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from adafocus.errors import AdaFocusError
from adafocus.export.manifest import Export, open_export
from adafocus.files import atomic_write
from adafocus.serve.service import ServeOptions, plan_outputs

CONTINUOUS, PER_BATCH, DENSE = "adafocus", "adafocus_per_batch", "adafocus_dense"
MODEL_PY = '''"""Written by adafocus-deploy (docs/serving.md): this model is adafocus.serve.triton_model."""

from adafocus.serve.triton_model import TritonPythonModel  # noqa: F401
'''
CARRIED = "1/export"  # where a carried export lies, relative to the continuous model's folder


@dataclass(frozen=True)
class ModelEntry:
    """One model of the repository: its name, serving mode (service.MODES), options, instances, and
    for the batched modes Triton's dynamic-batching delay."""

    name: str
    mode: str
    options: ServeOptions
    instances: int = 1
    max_queue_delay_us: int = 0


def standard_models(
    options: ServeOptions, *, instances: int = 1, per_batch_delay_us: int = 0, dense: bool = False
) -> list[ModelEntry]:
    """The continuous model `adafocus`, the baseline `adafocus_per_batch` (same backend, threads,
    batch size and instances) and, with `dense`, `adafocus_dense`."""
    models = [
        ModelEntry(CONTINUOUS, "continuous", options, instances),
        ModelEntry(PER_BATCH, "per_batch", options, instances, per_batch_delay_us),
    ]
    if dense:
        models.append(ModelEntry(DENSE, "dense", options, instances, per_batch_delay_us))
    return models


def write_repository(root: str | os.PathLike, models: list[ModelEntry], *, carry_export: bool = False) -> Path:
    """Write the models' folders into `root` (created; it must not hold other models). With
    `carry_export`, the export is copied inside the repository and referred to by a relative path, so
    the folder can be moved into a container as it is."""
    root = Path(root)
    if not models:
        raise AdaFocusError("a repository of no models", "name at least one model")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise AdaFocusError(f"model names repeat: {names}", "give each model its own name")
    if root.exists() and any(root.iterdir()):
        raise AdaFocusError(f"{root} is not empty", "write the repository into a new or empty folder")
    export = open_export(models[0].options.export)  # verified once, before anything is written
    if any(Path(m.options.export).resolve() != export.path.resolve() for m in models):
        raise AdaFocusError("the models name different exports", "write one repository per export")
    root.mkdir(parents=True, exist_ok=True)
    carried_by = models[0].name
    for model in models:
        folder = root / model.name
        (folder / "1").mkdir(parents=True)
        options = model.options
        if carry_export:
            relative = CARRIED if model.name == carried_by else f"../{carried_by}/{CARRIED}"
            options = replace(options, export=relative)
        else:
            options = replace(options, export=str(export.path.resolve()))
        atomic_write(folder / "config.pbtxt", model_config(model, options, export))
        atomic_write(folder / "labels.txt", "\n".join(export.class_names) + "\n")
        atomic_write(folder / "1" / "model.py", MODEL_PY)
    if carry_export:
        shutil.copytree(export.path, root / carried_by / CARRIED)
    return root


def model_config(model: ModelEntry, options: ServeOptions, export: Export) -> str:
    """config.pbtxt of one model (Triton's protobuf text format)."""
    p = export.preset
    frames = [p.num_frames, 3, p.frame_size, p.frame_size]
    batched = model.mode != "continuous"
    inputs = [
        _tensor("FRAMES", "TYPE_UINT8", frames, optional=True),
        _tensor("VIDEO", "TYPE_FP32", frames, optional=True),
        _tensor("VIDEO_FILE", "TYPE_STRING", [1], optional=True),
    ]
    outputs = [
        _tensor("CLASS_INDEX", "TYPE_INT64", [1]),
        _tensor("PROBABILITIES", "TYPE_FP32", [p.num_classes], labels=True),
        _tensor("GFLOPS", "TYPE_FP32", [1]),
        _tensor("FRAME_INDICES", "TYPE_INT32", [p.num_frames]),
        _tensor("DECODED_BY", "TYPE_STRING", [1]),
    ]
    if model.mode != "dense":
        outputs += [
            _tensor("EXIT_STEP", "TYPE_INT32", [1]),
            *(_tensor(name, kind, shape) for name, kind, shape in plan_outputs(p.family, p.max_cubes)),
            _tensor("BUDGET_GFLOPS", "TYPE_FP32", [1]),
        ]
    parameters = options.to_parameters() | {
        "mode": json.dumps(model.mode),
        "class_names": json.dumps(export.class_names, ensure_ascii=False),
    }
    lines = [
        f'name: "{model.name}"',
        'backend: "python"',
        f"max_batch_size: {options.batch_size if batched else 0}",
        "input [\n" + ",\n".join(inputs) + "\n]",
        "output [\n" + ",\n".join(outputs) + "\n]",
        f"instance_group [ {{ count: {model.instances} kind: KIND_CPU }} ]",
    ]
    if batched:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {model.max_queue_delay_us} }}")
    # No queue policy on the continuous model, although under overload requests wait in Triton's queue
    # in front of it, out of a latency target's sight (2.1 s on average at 1.5x saturation): with one
    # (a dynamic_batching block holding a timeout REJECT policy) p99 fell to 1.2-2.9x the target, but
    # in a load run tritonserver 2.51 aborted ("malloc(): unaligned fastbin chunk detected"), its
    # models hanging, and an earlier run with it lost the metrics endpoint mid-run (docs/serving.md).
    lines += [
        f"parameters {{ key: {_quoted(key)} value: {{ string_value: {_quoted(value)} }} }}"
        for key, value in parameters.items()
    ]
    return "\n".join(lines) + "\n"


def _tensor(name: str, dtype: str, dims: list[int], *, optional: bool = False, labels: bool = False) -> str:
    extra = (" optional: true" if optional else "") + (' label_filename: "labels.txt"' if labels else "")
    return f'  {{ name: "{name}" data_type: {dtype} dims: {dims}{extra} }}'


def _quoted(text: str) -> str:
    """A protobuf text-format string: UTF-8 as it is, backslashes, quotes and newlines escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
