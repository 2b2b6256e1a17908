"""INT8: explicitly quantised (Q/DQ) ONNX graphs, calibrated on the inputs each graph really sees.

    export = quantize_export("exports/demo", TaskVideos(task, "val", 128))   # writes <graph>.int8.onnx
    runtime = Runtime.load("exports/demo", "onnxruntime", precision="int8")

Calibration data flows through the real pipeline: the fp32 ONNX graphs of the export run in the
runtime's own cube loop (`Runtime.predict`, every exit threshold at -inf so that every video runs all
K cubes) behind a backend that records what each graph is fed. The local encoder is therefore
calibrated on the cubes the policy chose for cube steps 1..K, cropped by the crop graph, and the
classifier (when quantised) on its real (features, local_state, global_state, step) along the loop.
Never exiting early covers every step for every video: the ranges hold whatever thresholds or budget
are chosen at run time (early exit only removes videos from later steps).

Quantisation is ONNX Runtime's static quantisation (`quantize_static`) in the QDQ format with int8
weights, symmetric and per channel, and activation ranges by MinMax over the recorded inputs.

Weights use 7 bits (`weight_bits=7`, ONNX Runtime's `reduce_range`: values in [-64, 64]) so that the
graphs mean the same on every x86 CPU. On CPUs without VNNI (SSE4.1, AVX2, AVX-512 without VNNI)
ONNX Runtime's fast uint8 × int8 kernels add pairs of products into a saturating int16
(`adafocus.machine`); with 8-bit weights that clips, and on the demo it changed 35 % of the classes
on an AVX2-only CPU against 21 % on a VNNI one. With 7-bit weights a pair is at most
2 · 255 · 64 = 32640 < 32767: nothing clips, the integer arithmetic is exact on every kernel, and
the same graph gives the same integers on AVX2, AVX-512 and VNNI/AMX CPUs, with no session option
for any reader to remember. Measured on an AVX2-only EPYC (256 held-out demo videos, glance + local
in int8): 7-bit weights agree with fp32 on 78.9 % of the classes and 86.7 % of the exit steps, and
their outputs are bit-identical with and without ONNX Runtime's exact U8U8 mode
(`session.x64quantprecision`), which shows that the fast kernels do not clip; 8-bit weights agree on
65.2 % / 75.8 % there, 79.3 % / 86.7 % on a VNNI CPU or with the exact U8U8 mode (which made int8
slower than fp32 on that CPU). `weight_bits=8` stays available for VNNI-only fleets; `Runtime`
then runs such graphs in the exact U8U8 mode on CPUs that would clip, and warns once.

Two forms of activations (`activations=`):

- "uint8" (default): asymmetric uint8 activations (U8S8), what ONNX Runtime recommends for x86 with
  VNNI. A ReLU/ReLU6 before a QuantizeLinear folds into its range, so every Conv becomes one int8
  QLinearConv: the fast form on the CPU here. TensorRT cannot build it (it needs zero points 0).
- "int8": symmetric int8 activations (S8S8, zero points 0), the explicitly quantised form TensorRT
  builds engines from. ONNX Runtime's CPU runs it, but the ReLUs must stay between Conv and
  QuantizeLinear, which blocks most of its int8 fusions: slower than fp32 here (0.74-0.80x end to end on the demo).

Why MinMax: on the demo it agreed with fp32 as well as Percentile (99.99 / 99.999 %) and far better
than KL-entropy ranges, which clip the ReLU outputs (a 2048-bin Entropy calibration changed 41 % of the
classes with the glance quantised, 62 % with the local encoder, against 20 % and 3 % for MinMax).
`quantize_static` offers no way to set the Entropy calibrator's bin count, and at its default (128
bins for 128 quantised bins) Entropy has a single candidate range, the full one: identical to MinMax.

See `DEFAULT_GRAPHS` / `KEPT_FP32` for which graphs are quantised and why.

The manifest records, per graph, the file its int8 variant uses (`graphs.<name>.variants.int8`: the
quantised file, or the graph's fp32 file where it is deliberately kept in fp32), and the calibration
facts under the top-level key `int8`.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from adafocus.errors import AdaFocusError, InternalError
from adafocus.export.graphs import GRAPH_NAMES
from adafocus.export.manifest import Export, open_export, update_manifest
from adafocus.files import partial_path, remove_stale_partials
from adafocus.machine import cpu_name, cpu_record
from adafocus.runtime import Runtime
from adafocus.runtime.backends import EXACT_U8U8, OnnxRuntimeBackend

PRECISION = "int8"
DEFAULT_GRAPHS = ("glance", "local")
QUANTISABLE = ("glance", "policy", "local", "classifier")  # the loop graphs with weights
KEPT_FP32 = {  # why the other loop graphs stay fp32 (the cost is filled in from the manifest)
    "crop": "no weights: an exact integer gather, nothing to quantise",
    "policy": "{cost}: little to gain, and its outputs are the integer cube positions, which quantisation would move",
    "classifier": "{cost}: little to gain, and its entropy is what the exit rule compares with thresholds "
    "calibrated on fp32 outputs",
}
METHODS = {"minmax": "MinMax", "percentile": "Percentile"}  # Entropy via quantize_static = MinMax (see above)
DEFAULT_METHOD = "minmax"
WEIGHT_BITS = {7: "int8 holding 7-bit values [-64, 64] (reduce_range): exact on every x86 CPU", 8: "full int8"}
ACTIVATIONS = {
    "uint8": "activations uint8 per tensor, asymmetric (ONNX Runtime on the CPU; TensorRT needs zero points 0)",
    "int8": "activations int8 per tensor, symmetric, zero points 0 (the form TensorRT builds engines from)",
}


def int8_file(graph: str) -> str:
    return f"{graph}.int8.onnx"


# recording the real inputs -----------------------------------------------------------------------
class _RecordingBackend(OnnxRuntimeBackend):
    """The fp32 ONNX Runtime backend, keeping a copy of every feed of the graphs in `graphs`."""

    def __init__(self, export: Export, graphs: Iterable[str], threads: int | None = None):
        # parts in turn (call_workers=1): every feed passes through _run, in the loop's order
        super().__init__(export, "cpu", threads=threads, call_workers=1)
        self.recorded: dict[str, list[dict[str, np.ndarray]]] = {g: [] for g in graphs}

    def _run(self, graph: str, feeds: dict) -> dict:
        if graph in self.recorded:
            self.recorded[graph].append({name: np.array(value, copy=True) for name, value in feeds.items()})
        return super()._run(graph, feeds)


@dataclass
class CalibrationInputs:
    """What each graph was fed, batch by batch, while the fp32 graphs ran the loop on `videos` videos
    without early exit; `cube_starts` (videos, K, 3) is the policy's plan for each video."""

    feeds: dict[str, list[dict[str, np.ndarray]]]
    videos: int
    cube_starts: np.ndarray

    def rows(self, graph: str) -> int:
        return sum(len(next(iter(f.values()))) for f in self.feeds[graph])


def _video_batches(videos) -> Iterable[np.ndarray]:
    """(videos, labels) batches (TaskVideos), bare video batches, or one (N, T, 3, H, W) array."""
    if isinstance(videos, np.ndarray | torch.Tensor | tuple):
        videos = [videos]
    for batch in videos:
        if isinstance(batch, tuple | list):
            batch = batch[0]
        if isinstance(batch, torch.Tensor):
            batch = batch.numpy()
        yield np.ascontiguousarray(batch, dtype=np.float32)


def record_inputs(
    export: Export | str | os.PathLike,
    videos,
    graphs: Sequence[str] = QUANTISABLE,
    *,
    threads: int | None = None,
) -> CalibrationInputs:
    """Run the export's fp32 graphs through the runtime's cube loop on `videos` (every video runs
    all K cubes) and record the feeds of `graphs`, in loop order."""
    export = export if isinstance(export, Export) else open_export(export)
    backend = _RecordingBackend(export, graphs, threads)
    runtime = Runtime(export, backend)
    runtime.set_thresholds([-math.inf] * export.preset.num_exits)  # never exit: every step, every video
    starts, count = [], 0
    for batch in _video_batches(videos):
        result = runtime.predict(batch)
        starts.append(result.cube_starts)
        count += len(batch)
    if count == 0:
        raise AdaFocusError("no calibration videos", "give at least one video")
    return CalibrationInputs(backend.recorded, count, np.concatenate(starts))


class _Feeds:
    """An onnxruntime CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds, self.position = feeds, 0

    def get_next(self) -> dict | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0

    def __len__(self) -> int:
        return len(self.feeds)


def _reader(feeds):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Feeds, CalibrationDataReader):
        pass

    return Reader(feeds)


# quantising ---------------------------------------------------------------------------------------
def quantize_graph(
    source: Path,
    target: Path,
    feeds: list[dict[str, np.ndarray]],
    *,
    method: str = DEFAULT_METHOD,
    preprocess: bool = True,
    activations: str = "uint8",
    weight_bits: int = 7,
) -> dict:
    """Static QDQ quantisation of one fp32 graph with `feeds` as calibration data; checks the result
    (onnx.checker, an ORT session, Q/DQ nodes present) and says what it did."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise AdaFocusError(f"unknown calibration method {method!r}", f"use one of {', '.join(METHODS)}")
    if activations not in ACTIVATIONS:
        raise AdaFocusError(f"unknown activation type {activations!r}", f"use one of {', '.join(ACTIVATIONS)}")
    if weight_bits not in WEIGHT_BITS:
        raise AdaFocusError(
            f"weights of {weight_bits} bits are not offered", f"use {' or '.join(map(str, WEIGHT_BITS))}"
        )
    symmetric = activations == "int8"
    with tempfile.TemporaryDirectory(prefix="adafocus-int8-") as tmp:
        model_input = source
        if preprocess:  # symbolic shape inference + ORT's basic fusions; a no-op on the dynamo graphs
            from onnxruntime.quantization.shape_inference import quant_pre_process

            model_input = Path(tmp) / "preprocessed.onnx"
            quant_pre_process(str(source), str(model_input), skip_symbolic_shape=False)
        quantize_static(
            str(model_input),
            str(target),
            _reader(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=weight_bits == 7,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, METHODS[method]),
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )
    onnx.checker.check_model(str(target), full_check=True)
    ops = [node.op_type for node in onnx.load(str(target)).graph.node]
    qdq = {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear")}
    if not all(qdq.values()):
        raise AdaFocusError(f"quantising {source.name} produced no Q/DQ nodes", "report this with the export")
    exact = kernels_exact(target, feeds[:EXACTNESS_BATCHES])
    if weight_bits == 7 and not exact:
        raise InternalError(
            f"{source.name} in int8 with 7-bit weights gives different outputs in ONNX Runtime's fast and exact "
            f"kernels on this CPU ({cpu_name()}): 7-bit weights were meant to rule saturation out"
        )
    return {
        "file": target.name,
        "quantized": True,
        "nodes": qdq,
        "bytes": target.stat().st_size,
        "fast_kernels_exact_here": exact,
    }


EXACTNESS_BATCHES = 2  # recorded batches a quantised graph is checked on, fast vs exact kernels


def kernels_exact(path: Path, feeds: list[dict[str, np.ndarray]]) -> bool:
    """Whether ONNX Runtime's default (fast) CPU kernels give bit-identical outputs to its exact U8U8
    mode (`session.x64quantprecision`) on `feeds`: False means the fast ones saturate on this CPU."""
    import onnxruntime as ort

    def outputs(exact_mode: bool) -> list[np.ndarray]:
        options = ort.SessionOptions()
        if exact_mode:
            options.add_session_config_entry(EXACT_U8U8, "1")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return [y for feed in feeds for y in session.run(None, feed)]

    return all(np.array_equal(a, b) for a, b in zip(outputs(False), outputs(True)))


def quantize_export(
    export_dir: str | os.PathLike,
    videos,
    *,
    graphs: Sequence[str] = DEFAULT_GRAPHS,
    method: str = DEFAULT_METHOD,
    preprocess: bool = True,
    activations: str = "uint8",
    weight_bits: int = 7,
    threads: int | None = None,
    info: dict | None = None,
) -> Export:
    """Write `<graph>.int8.onnx` for `graphs`, calibrated on `videos` through the real loop, and record
    every loop graph's int8 file in the manifest (the fp32 file for graphs kept in fp32).

    `videos`: (videos, labels) batches such as `TaskVideos`, video batches, or one array. `method`:
    activation ranges by "minmax" or "percentile" (ONNX Runtime's calibrators); `activations`: "uint8"
    (CPU) or "int8" (TensorRT), and `weight_bits` 7 (exact on every x86 CPU) or 8, see the module
    docstring; `preprocess`: run ONNX Runtime's `quant_pre_process` first. `info` goes into the
    manifest's `int8` record (e.g. where the videos came from). Returns the re-sealed export.
    """
    export = open_export(export_dir)  # verified before anything is written next to it
    if bad := [g for g in graphs if g not in QUANTISABLE]:
        raise AdaFocusError(f"cannot quantise {bad}", f"choose among {', '.join(QUANTISABLE)} (crop has no weights)")
    if not graphs:
        raise AdaFocusError("no graphs to quantise", f"choose among {', '.join(QUANTISABLE)}")
    started = time.perf_counter()
    inputs = record_inputs(export, videos, graphs, threads=threads)
    remove_stale_partials(export.path)  # staged graphs of a quantisation that was killed
    staged = {int8_file(g): partial_path(export.path / int8_file(g)) for g in graphs}  # hidden until committed
    try:
        records = {}
        for graph in graphs:
            records[graph] = quantize_graph(
                export.graph_path(graph),
                staged[int8_file(graph)],
                inputs.feeds[graph],
                method=method,
                preprocess=preprocess,
                activations=activations,
                weight_bits=weight_bits,
            )
            records[graph] |= {"file": int8_file(graph), "calibration_rows": inputs.rows(graph)}
        settings = {"method": method, "preprocess": preprocess, "activations": activations, "weight_bits": weight_bits}
        record = _int8_record(export, records, settings, inputs.videos, time.perf_counter() - started, info)
        # int8 files of graphs that stay fp32 this time (an earlier quantisation's) go
        stale = [v for g, v in _int8_variants(export).items() if g not in graphs and v != export.graph(g).file]

        def change(manifest: dict) -> None:
            for graph in GRAPH_NAMES:
                manifest["graphs"][graph].setdefault("variants", {})[PRECISION] = record["graphs"][graph]["file"]
            manifest["int8"] = record

        return update_manifest(export.path, change, new_files=staged, drop_files=stale)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)


def _int8_variants(export: Export) -> dict[str, str]:
    return {g: export.graph(g).variants[PRECISION] for g in GRAPH_NAMES if PRECISION in export.graph(g).variants}


def _int8_record(export: Export, records: dict, settings: dict, videos: int, seconds: float, info) -> dict:
    """The manifest's `int8` key: how the graphs were made, per graph what its int8 file is."""
    import onnxruntime as ort

    for graph in GRAPH_NAMES:
        if graph not in records:
            records[graph] = {"file": export.graph(graph).file, "quantized": False, "reason": _why_fp32(export, graph)}
    bits, activations = settings["weight_bits"], settings["activations"]
    return {
        "format": "QDQ (QuantizeLinear/DequantizeLinear); weights per channel, symmetric, "
        + WEIGHT_BITS[bits]
        + "; "
        + ACTIVATIONS[activations],
        "activations": activations,
        "weight_bits": bits,
        # 7-bit weights cannot saturate ONNX Runtime's x86 U8S8 kernels; 8-bit ones need VNNI
        # (or the exact U8U8 mode, which Runtime then switches on)
        "exact_on_every_x86_cpu": bits == 7,
        "made_on": cpu_record(),
        "tensorrt_ready": activations == "int8",
        "method": METHODS[settings["method"]],
        "preprocessed": settings["preprocess"],
        "inputs_from": "the export's fp32 ONNX graphs run by the runtime's cube loop, no early exit "
        "(every video runs cubes 1..K; the local encoder sees the policy's cubes)",
        "calibration_videos": videos,
        "graphs": {g: records[g] for g in GRAPH_NAMES},
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "seconds": round(seconds, 1),
        **(info or {}),
    }


def _why_fp32(export: Export, graph: str) -> str:
    gflops = export.graph(graph).gflops
    share = gflops / export.graph("glance").gflops
    cost = f"{1e3 * gflops:.3g} MMAC per {'cube' if graph == 'classifier' else 'video'}, {share:.1%} of the glance"
    return KEPT_FP32.get(graph, "not asked to quantise ({cost})").format(cost=cost)


# comparing fp32 and int8 --------------------------------------------------------------------------
def compare_precisions(export_dir, videos, *, threads: int | None = 2) -> dict:
    """fp32 vs int8 ONNX Runtime with the manifest's thresholds on `videos` ((videos, labels) batches):
    accuracy of each, and the share of videos whose exit step / predicted class changes."""
    fp32 = Runtime.load(export_dir, "onnxruntime", threads=threads, precision="fp32")
    int8 = Runtime.load(export_dir, "onnxruntime", threads=threads, precision=PRECISION)
    rows = {"labels": [], "fp32_class": [], "int8_class": [], "fp32_exit": [], "int8_exit": []}
    for batch, labels in videos:
        batch = np.ascontiguousarray(batch.numpy() if isinstance(batch, torch.Tensor) else batch, np.float32)
        a, b = fp32.predict(batch), int8.predict(batch)
        rows["labels"].append(np.asarray(labels))
        rows["fp32_class"].append(a.prediction)
        rows["int8_class"].append(b.prediction)
        rows["fp32_exit"].append(a.exit_step)
        rows["int8_exit"].append(b.exit_step)
    r = {k: np.concatenate(v) for k, v in rows.items()}
    if len(r["labels"]) == 0:
        raise AdaFocusError("no videos to compare on")
    exits = fp32.preset.num_exits
    gflops = np.asarray(fp32.export.exit_gflops)
    return {
        "videos": len(r["labels"]),
        "thresholds": fp32.thresholds.tolist() if np.isfinite(fp32.thresholds).all() else None,
        "fp32_accuracy": float((r["fp32_class"] == r["labels"]).mean()),
        "int8_accuracy": float((r["int8_class"] == r["labels"]).mean()),
        "exit_step_changed": float((r["fp32_exit"] != r["int8_exit"]).mean()),
        "class_changed": float((r["fp32_class"] != r["int8_class"]).mean()),
        "fp32_exit_counts": np.bincount(r["fp32_exit"], minlength=exits).tolist(),
        "int8_exit_counts": np.bincount(r["int8_exit"], minlength=exits).tolist(),
        "fp32_gflops": float(gflops[r["fp32_exit"]].mean()),
        "int8_gflops": float(gflops[r["int8_exit"]].mean()),
        "validated_on": cpu_record(),
    }


def measure_speed(export_dir, videos, *, threads: int | None = 2, runs: int = 5, warmup: int = 2) -> dict:
    """Videos/s of `Runtime.predict` on one batch, fp32 vs int8 (manifest thresholds), the median of
    `runs` timed calls each after `warmup` untimed ones; the two precisions alternate so that a change
    in machine load hits both."""
    batch = np.ascontiguousarray(videos.numpy() if isinstance(videos, torch.Tensor) else videos, np.float32)
    runtimes = {p: Runtime.load(export_dir, "onnxruntime", threads=threads, precision=p) for p in ("fp32", PRECISION)}
    for runtime in runtimes.values():
        for _ in range(warmup):
            runtime.predict(batch)
    seconds: dict[str, list[float]] = {p: [] for p in runtimes}
    for _ in range(runs):
        for precision, runtime in runtimes.items():
            started = time.perf_counter()
            runtime.predict(batch)
            seconds[precision].append(time.perf_counter() - started)
    rate = {p: len(batch) / statistics.median(s) for p, s in seconds.items()}
    return {
        "batch": len(batch),
        "threads": threads,
        "runs": runs,
        "fp32_videos_per_s": rate["fp32"],
        "int8_videos_per_s": rate[PRECISION],
        "speedup": rate[PRECISION] / rate["fp32"],
        "seconds": seconds,
        "load_average": list(os.getloadavg()),
        "cpus": os.cpu_count(),
    }


def record_report(export_dir, report: dict) -> Export:
    """Store the fp32-vs-int8 comparison (held-out accuracy, changes, speed) in the manifest's `int8`."""

    def change(manifest: dict) -> None:
        if "int8" not in manifest:
            raise AdaFocusError(f"{export_dir} has no int8 graphs", "run adafocus-calibrate --int8")
        manifest["int8"].update(report)

    return update_manifest(export_dir, change)


def describe(record: dict) -> str:
    """The manifest's `int8` record as text."""
    quantised = [g for g, r in record["graphs"].items() if r["quantized"]]
    lines = [
        f"INT8: {', '.join(f'{g}.int8.onnx' for g in quantised)} ({record['format']}; {record['method']} ranges "
        f"from {record['calibration_videos']} {_videos_of(record)} through the fp32 loop; "
        f"onnxruntime {record['onnxruntime']}); other graphs stay fp32",
    ]
    made = record.get("made_on", {})
    lines.append(
        f"  {record.get('weight_bits', 8)}-bit weights; made on {made.get('cpu', '?')} "
        f"(flags {' '.join(made.get('flags') or []) or 'unknown'})"
        + ("; exact on every x86 CPU" if record.get("exact_on_every_x86_cpu") else "; needs VNNI for its fast kernels")
    )
    if held := record.get("heldout"):
        lines.append(
            f"  held-out ({held['videos']} {_videos_of(held)}, manifest thresholds): accuracy "
            f"fp32 {100 * held['fp32_accuracy']:.1f}% -> int8 {100 * held['int8_accuracy']:.1f}%; "
            f"exit step changed for {100 * held['exit_step_changed']:.1f}%, "
            f"class for {100 * held['class_changed']:.1f}%; "
            f"GFLOPs/video {held['fp32_gflops']:.4f} -> {held['int8_gflops']:.4f}"
        )
        if not held["accuracy_meaningful"]:
            lines.append("  (this model was not trained on the synthetic task: its accuracies mean nothing)")
    speed = record["speed"]
    lines.append(
        f"  CPU speed (Runtime.predict, batch {speed['batch']}, {speed['threads']} threads, median of "
        f"{speed['runs']}): fp32 {speed['fp32_videos_per_s']:.0f} videos/s, int8 {speed['int8_videos_per_s']:.0f} "
        f"videos/s ({speed['speedup']:.2f}x); load average {speed['load_average'][0]:.1f} on {speed['cpus']} CPUs"
    )
    return "\n".join(lines)


def _videos_of(record: dict) -> str:
    """Where a record's videos came from: a synthetic split, or the user's list (`set`/`list`)."""
    listed = record.get("list") or record.get("set")
    return f"videos of {listed}" if listed else f"'{record.get('split', '?')}' videos"
