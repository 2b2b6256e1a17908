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

Memory does not grow with the calibration videos. The loop records a few videos at a time
(`videos_per_pass`), each graph's feeds go to a spill folder in the temporary directory (deleted
afterwards; one left by a killed run is deleted by the next, see `record_inputs`), and ONNX Runtime's
calibrator replays them one recorded call at a time in a memory-bounded execution order
(`activation_ranges`); the ranges are MinMax's min and max over everything, as before. On sthsth-v1
(TSM ResNet-50 at 128²×12, 224² glance) the INT8 stage went from killed at 24 GB for 64 videos to a
peak of 3.6 GB for 64 videos and 4.2 GB for 128 or 256 (benchmarks/README.md, "INT8 at paper scale").

See `DEFAULT_GRAPHS` / `KEPT_FP32` for which graphs are quantised and why; the dense baseline can be
quantised too (`graphs=(..., "dense")`), on the videos the glance is fed, for benchmarks.

The manifest records, per graph, the file its int8 variant uses (`graphs.<name>.variants.int8`: the
quantised file, or the graph's fp32 file where it is deliberately kept in fp32), and the calibration
facts under the top-level key `int8`.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import secrets
import shutil
import statistics
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from adafocus.data.labelled import top1_hits
from adafocus.errors import AdaFocusError, InternalError
from adafocus.export.graphs import DENSE, GRAPH_NAMES
from adafocus.export.manifest import Export, open_export, update_manifest
from adafocus.files import partial_path, remove_stale_partials
from adafocus.machine import cpu_name, cpu_record, peak_rss_bytes, reset_peak_rss
from adafocus.model.checks import check_finite_in_set
from adafocus.runtime import Runtime
from adafocus.runtime.backends import EXACT_U8U8, OnnxRuntimeBackend

PRECISION = "int8"
DEFAULT_GRAPHS = ("glance", "local")
QUANTISABLE = ("glance", "policy", "local", "classifier")  # the loop graphs with weights
FEEDS_OF = {DENSE: "glance"}  # the dense baseline is calibrated on what the glance is fed: the videos
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
# Memory must not grow with the calibration videos (a paper preset's 64 videos took 24 GB before):
# the loop runs on passes of a few videos (`videos_per_pass`), every recorded feed goes to a spill
# folder on disk, and the calibrator replays them one recorded call at a time.
PASS_BYTES = 64 * 2**20  # preprocessed video bytes per recording pass (sthsth-v1: 6 videos; demo: 42)
SPILL_NAME = "adafocus-int8-feeds"  # `.adafocus-int8-feeds.partial-PID-WHERE.RANDOM` in the temporary folder


def videos_per_pass(preset) -> int:
    """Videos the fp32 loop records at once: what bounds the sessions' memory while recording, and
    the calibrator's while replaying (each recorded call holds at most this many videos' rows)."""
    return max(1, PASS_BYTES // preset.video_bytes)


class SpilledBatches(Sequence):
    """One graph's recorded feeds, batch by batch in loop order, each read back from the spill
    folder when asked for (never all in memory)."""

    def __init__(self, folder: Path, graph: str):
        self.folder, self.graph = folder, graph
        self.files: list[dict[str, Path]] = []
        self.rows = 0

    def append(self, feeds: dict[str, np.ndarray]) -> None:
        files = {}
        for name, value in feeds.items():
            files[name] = self.folder / f"{self.graph}-{len(self.files):06d}-{name}.npy"
            np.save(files[name], np.asarray(value), allow_pickle=False)
        self.files.append(files)
        self.rows += len(next(iter(feeds.values())))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return {name: np.load(path, allow_pickle=False) for name, path in self.files[index].items()}


class _RecordingBackend(OnnxRuntimeBackend):
    """The fp32 ONNX Runtime backend, writing every feed of the graphs in `graphs` to `folder`."""

    def __init__(self, export: Export, graphs: Iterable[str], folder: Path, threads: int | None = None):
        # parts in turn (call_workers=1): every feed passes through _run, in the loop's order
        super().__init__(export, "cpu", threads=threads, call_workers=1)
        self.recorded = {g: SpilledBatches(folder, g) for g in graphs}

    def _run(self, graph: str, feeds: dict) -> dict:
        if graph in self.recorded:
            self.recorded[graph].append(feeds)
        return super()._run(graph, feeds)


@dataclass
class CalibrationInputs:
    """What each graph was fed, batch by batch (spilled to `folder`), while the fp32 graphs ran the
    loop on `videos` videos without early exit; `cube_starts` (videos, K, 3) is the policy's plan for
    each video. `close()` (or leaving a `with` block, or the end of the process) deletes the folder;
    a run killed before that leaves it to the next `record_inputs`, which removes it."""

    feeds: dict[str, SpilledBatches]
    videos: int
    cube_starts: np.ndarray
    folder: Path
    seconds: float
    per_pass: int

    def rows(self, graph: str) -> int:
        return self.feeds[graph].rows

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> CalibrationInputs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _video_batches(videos, per_pass: int) -> Iterable[np.ndarray]:
    """(videos, labels) batches (TaskVideos), bare video batches, or one (N, T, 3, H, W) array, cut
    into passes of at most `per_pass` videos."""
    if isinstance(videos, np.ndarray | torch.Tensor | tuple):
        videos = [videos]
    for batch in videos:
        if isinstance(batch, tuple | list):
            batch = batch[0]
        if isinstance(batch, torch.Tensor):
            batch = batch.numpy()
        for start in range(0, len(batch), per_pass):
            yield np.ascontiguousarray(batch[start : start + per_pass], dtype=np.float32)
        del batch  # before the next batch is made: two at once would be 1.2 GB of sthsth-v1 at 64 videos


def _count_of(videos) -> int | None:
    """How many videos an iterable of batches holds, where it says (TaskVideos, DecodedBatches)."""
    if isinstance(videos, list | tuple | np.ndarray | torch.Tensor) or not hasattr(videos, "__len__"):
        return None
    return len(videos)


def record_inputs(
    export: Export | str | os.PathLike,
    videos,
    graphs: Sequence[str] = QUANTISABLE,
    *,
    threads: int | None = None,
    per_pass: int | None = None,
    progress: bool = False,
) -> CalibrationInputs:
    """Run the export's fp32 graphs through the runtime's cube loop on `videos` (every video runs
    all K cubes), `per_pass` videos at a time (default `videos_per_pass`), and record the feeds of
    `graphs`, in loop order, in a spill folder under the temporary directory ($TMPDIR).
    Close the result (or use it in a `with` block) to delete the folder."""
    export = export if isinstance(export, Export) else open_export(export)
    per_pass = per_pass or videos_per_pass(export.preset)
    temporary = Path(tempfile.gettempdir())
    remove_stale_partials(temporary, SPILL_NAME)  # the spill of a calibration that was killed
    folder = partial_path(temporary / SPILL_NAME, suffix=f".{secrets.token_hex(4)}")
    folder.mkdir(mode=0o700)
    started = time.perf_counter()
    try:
        backend = _RecordingBackend(export, graphs, folder, threads)
        runtime = Runtime(export, backend)
        runtime.set_thresholds([-math.inf] * export.preset.num_exits)  # never exit: every step, every video
        starts, count = [], 0
        with tqdm(total=_count_of(videos), desc="int8 ranges: recording", unit="video", disable=not progress) as bar:
            for batch in _video_batches(videos, per_pass):
                check_finite_in_set(batch, count, "calibration videos")
                starts.append(runtime.predict(batch).cube_starts)
                count += len(batch)
                bar.update(len(batch))
                del batch  # a view: it would keep the whole incoming batch alive while the next is made
        if count == 0:
            raise AdaFocusError("no calibration videos", "give at least one video")
    except OSError as e:  # the disk under the spill: full, read-only
        shutil.rmtree(folder, ignore_errors=True)
        raise AdaFocusError(
            f"could not record the calibration inputs in {folder.parent}: {e}",
            "free space there or point TMPDIR at a disk with room (sthsth-v1: ~15 MB per video)",
        ) from e
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    inputs = CalibrationInputs(backend.recorded, count, np.concatenate(starts), folder, seconds, per_pass)
    weakref.finalize(inputs, shutil.rmtree, folder, True)  # when dropped, at the latest at the end of the process
    return inputs


def activation_ranges(model: Path, batches: Sequence[dict[str, np.ndarray]], method: str, work: Path):
    """ONNX Runtime's calibrator (the one `quantize_static` would create, on the same tensors) fed
    one recorded batch at a time. Two things keep its memory bounded: only per-batch results are
    kept (MinMax: the batch's min and max per tensor, merged as they come), and its session runs in
    priority-based order. In the default order ONNX Runtime ran the ReduceMin/ReduceMax nodes it
    adds to every tensor late, keeping nearly every activation of the batch alive: 0.8 GB per
    128²×12 cube of the sthsth-v1 ResNet-50 against 0.1 GB (measured, onnxruntime 1.32).
    (Its own `CalibMaxIntermediateOutputs` is not the answer in 1.32: it drops the batches it
    clears instead of merging their ranges.)"""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calibrator = create_calibrator(
        model,
        sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),  # quantize_static's default op types
        augmented_model_path=str(work / "augmented.onnx"),
        calibrate_method=getattr(CalibrationMethod, METHODS[method]),
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the calibrator's own
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    calibrator.infer_session = ort.InferenceSession(
        calibrator.augmented_model_path, options, providers=["CPUExecutionProvider"]
    )
    if method == "percentile":
        ranges = _percentile_ranges(calibrator, batches)
    else:
        for index in range(len(batches)):
            calibrator.collect_data(_reader([batches[index]]))  # merges this batch into the ranges so far
        ranges = calibrator.compute_data()
    # its session (and memory arena) goes now, not whenever the garbage collector finds the calibrator
    calibrator.infer_session = None
    del calibrator
    gc.collect()
    return ranges


def _percentile_ranges(calibrator, batches: Sequence[dict[str, np.ndarray]]):
    """Percentile ranges that do not depend on how the videos were cut into recorded calls. ONNX
    Runtime's collector fixes its bins from the first call's values and widens the histogram by whole
    bins after, so the same videos in other passes gave other ranges. Here a first pass over every
    call finds each tensor's extremes, and a second bins every call on the same `num_bins` bins over
    them (|x| in [min |x|, max |x|] for the symmetric calibrator, x in [-max |x|, max |x|] otherwise)
    and adds the counts (exact integers); the percentile is then ONNX Runtime's own
    (`compute_percentile`), on the histogram its collector builds when every value comes in one call."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    session = calibrator.infer_session
    names = [output.name for output in session.get_outputs()]

    def calls():  # each recorded call's calibrated tensors, flattened (empty ones have no range)
        for index in range(len(batches)):
            out = dict(zip(names, session.run(None, batches[index])))
            yield {n: out[n].flatten() for n in calibrator.tensors_to_calibrate if n in out and out[n].size}

    extremes: dict[str, list] = {}  # name -> [min x, max x, min |x|, max |x|], float32 as the collector has them
    for tensors in calls():
        for name, values in tensors.items():
            magnitudes = np.absolute(values)
            found = [np.nanmin(values), np.nanmax(values), np.nanmin(magnitudes), np.nanmax(magnitudes)]
            known = extremes.setdefault(name, found)
            extremes[name] = [
                min(known[0], found[0]),
                max(known[1], found[1]),
                min(known[2], found[2]),
                max(known[3], found[3]),
            ]
    histograms = {}
    for tensors in calls():
        for name, values in tensors.items():
            low, high, low_abs, high_abs = extremes[name]
            if calibrator.symmetric:  # as collect_absolute_value bins its first call
                counts, edges = np.histogram(np.absolute(values), calibrator.num_bins, range=(low_abs, high_abs))
                record = (edges.astype(values.dtype), low, high)
            else:  # as collect_value bins its first call
                threshold = np.array(max(abs(low), abs(high)), dtype=values.dtype)
                counts, edges = np.histogram(values, calibrator.num_bins, range=(-threshold, threshold))
                record = (edges, low, high, threshold)
            if name in histograms:
                counts = counts + histograms[name][0]
            histograms[name] = (counts, *record)
    collector = HistogramCollector(
        method="percentile",
        symmetric=calibrator.symmetric,
        num_bins=calibrator.num_bins,
        num_quantized_bins=calibrator.num_quantized_bins,
        percentile=calibrator.percentile,
        scenario=calibrator.scenario,
    )
    collector.histogram_dict = histograms
    calibrator.collector = collector
    return calibrator.compute_data()


class _Feeds:
    """An onnxruntime CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
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
WORK_NAME = "adafocus-int8-work"  # `.adafocus-int8-work.partial-PID-WHERE.RANDOM` in the temporary folder


def check_options(method: str, activations: str, weight_bits: int) -> None:
    """One clear error for a quantisation setting that is not offered (before any video is recorded)."""
    if method not in METHODS:
        raise AdaFocusError(f"unknown calibration method {method!r}", f"use one of {', '.join(METHODS)}")
    if activations not in ACTIVATIONS:
        raise AdaFocusError(f"unknown activation type {activations!r}", f"use one of {', '.join(ACTIVATIONS)}")
    if weight_bits not in WEIGHT_BITS:
        raise AdaFocusError(
            f"weights of {weight_bits} bits are not offered", f"use {' or '.join(map(str, WEIGHT_BITS))}"
        )


@contextlib.contextmanager
def _work_folder() -> Iterator[str]:
    """A scratch folder for one graph's preprocessed copy, ranges and augmented model, named as the
    spill is (`.NAME.partial-PID-WHERE.RANDOM`) so that the next run removes one left by a killed run (a
    TemporaryDirectory's random name would say nothing of its dead owner)."""
    temporary = Path(tempfile.gettempdir())
    remove_stale_partials(temporary, WORK_NAME)
    folder = partial_path(temporary / WORK_NAME, suffix=f".{secrets.token_hex(4)}")
    folder.mkdir(mode=0o700)
    try:
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def quantize_graph(
    source: Path,
    target: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    method: str = DEFAULT_METHOD,
    preprocess: bool = True,
    activations: str = "uint8",
    weight_bits: int = 7,
    symbolic_shapes: bool = True,
) -> dict:
    """Static QDQ quantisation of one fp32 graph with `feeds` as calibration data; checks the result
    (onnx.checker, an ORT session, Q/DQ nodes present) and says what it did. `symbolic_shapes`:
    preprocess with ONNX Runtime's symbolic shape inference (else ONNX's own shape inference only)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    check_options(method, activations, weight_bits)
    symmetric = activations == "int8"
    with _work_folder() as tmp:
        model_input = source
        if preprocess:  # symbolic shape inference + ORT's basic fusions; a no-op on the dynamo graphs
            from onnxruntime.quantization.shape_inference import quant_pre_process

            model_input = Path(tmp) / "preprocessed.onnx"
            quant_pre_process(str(source), str(model_input), skip_symbolic_shape=not symbolic_shapes)
        # ranges computed here with bounded memory, handed to quantize_static as its calibration cache
        ranges = Path(tmp) / "ranges.json"
        save_tensors_data(activation_ranges(Path(model_input), feeds, method, Path(tmp)), ranges)
        quantize_static(
            str(model_input),
            str(target),
            None,
            calibration_cache_path=str(ranges),
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
    per_pass: int | None = None,
    progress: bool = False,
) -> Export:
    """Write `<graph>.int8.onnx` for `graphs`, calibrated on `videos` through the real loop, and record
    every loop graph's int8 file in the manifest (the fp32 file for graphs kept in fp32).

    `videos`: (videos, labels) batches such as `TaskVideos`, video batches, or one array. `method`:
    activation ranges by "minmax" or "percentile" (ONNX Runtime's calibrators); `activations`: "uint8"
    (CPU) or "int8" (TensorRT), and `weight_bits` 7 (exact on every x86 CPU) or 8, see the module
    docstring; `preprocess`: run ONNX Runtime's `quant_pre_process` first. "dense" among `graphs`
    also quantises the dense baseline (on the videos the glance is fed). `per_pass`: videos
    recorded at once (default `videos_per_pass`: what bounds the memory); `progress`: a bar over the
    videos. `info` goes into the manifest's `int8` record (e.g. where the videos came from), with
    the time and this stage's peak resident memory. Returns the re-sealed export.
    """
    export = open_export(export_dir)  # verified before anything is written next to it
    check_options(method, activations, weight_bits)  # before recording: that is most of the work
    if bad := [g for g in graphs if g not in (*QUANTISABLE, DENSE)]:
        raise AdaFocusError(
            f"cannot quantise {bad}", f"choose among {', '.join((*QUANTISABLE, DENSE))} (crop has no weights)"
        )
    if not graphs:
        raise AdaFocusError("no graphs to quantise", f"choose among {', '.join((*QUANTISABLE, DENSE))}")
    if DENSE in graphs:
        export.graph(DENSE)  # refused before any work where the export was made with --no-dense
    own_peak = reset_peak_rss()
    started = time.perf_counter()
    recorded = sorted({FEEDS_OF.get(g, g) for g in graphs}, key=QUANTISABLE.index)
    remove_stale_partials(export.path)  # staged graphs of a quantisation that was killed
    staged = {int8_file(g): partial_path(export.path / int8_file(g)) for g in graphs}  # hidden until committed
    try:
        with record_inputs(export, videos, recorded, threads=threads, per_pass=per_pass, progress=progress) as inputs:
            records = {}
            for graph in tqdm(graphs, desc="int8 ranges: quantising", unit="graph", disable=not progress):
                feeds = FEEDS_OF.get(graph, graph)
                records[graph] = quantize_graph(
                    export.graph_path(graph),
                    staged[int8_file(graph)],
                    inputs.feeds[feeds],
                    method=method,
                    preprocess=preprocess,
                    activations=activations,
                    weight_bits=weight_bits,
                    # onnxruntime 1.32's symbolic shape inference fails on the dense graph (a Gather whose
                    # input shape it cannot follow); ONNX's own shape inference serves the quantiser there
                    symbolic_shapes=graph != DENSE,
                )
                records[graph] |= {"file": int8_file(graph), "calibration_rows": inputs.rows(feeds)}
        peak = peak_rss_bytes()
        settings = {"method": method, "preprocess": preprocess, "activations": activations, "weight_bits": weight_bits}
        cost = {
            "seconds": round(time.perf_counter() - started, 1),
            "recording_seconds": round(inputs.seconds, 1),
            "videos_per_pass": inputs.per_pass,
            "peak_rss_bytes": peak,
            "peak_rss_of": "this stage (VmHWM reset at its start)" if own_peak else "the whole process (VmHWM)",
        }
        record = _int8_record(export, records, settings, inputs.videos, cost, info)
        # int8 files of graphs that stay fp32 this time (an earlier quantisation's) go
        stale = [v for g, v in _int8_variants(export).items() if g not in graphs and v != export.graph(g).file]

        def change(manifest: dict) -> None:
            for graph in GRAPH_NAMES:
                manifest["graphs"][graph].setdefault("variants", {})[PRECISION] = record["graphs"][graph]["file"]
            if DENSE in graphs:
                manifest["graphs"][DENSE].setdefault("variants", {})[PRECISION] = int8_file(DENSE)
            elif DENSE in manifest["graphs"]:
                manifest["graphs"][DENSE].get("variants", {}).pop(PRECISION, None)
            manifest["int8"] = record

        return update_manifest(export.path, change, new_files=staged, drop_files=stale)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)


def _int8_variants(export: Export) -> dict[str, str]:
    graphs = [g for g in (*GRAPH_NAMES, DENSE) if g in export.manifest["graphs"]]
    return {g: export.graph(g).variants[PRECISION] for g in graphs if PRECISION in export.graph(g).variants}


def _int8_record(export: Export, records: dict, settings: dict, videos: int, cost: dict, info) -> dict:
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
        "graphs": {g: records[g] for g in (*GRAPH_NAMES, DENSE) if g in records},
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        **cost,
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
    accuracy of each (top-1; a multi-label video is right when its top class is one of its labels), and
    the share of videos whose exit step / predicted class changes."""
    batches = iter(videos)
    first = next(batches, None)  # an empty set is told before two runtimes are loaded for it
    if first is None:
        raise AdaFocusError("no videos to compare fp32 and int8 on", "give at least one held-out video")
    fp32 = Runtime.load(export_dir, "onnxruntime", threads=threads, precision="fp32")
    int8 = Runtime.load(export_dir, "onnxruntime", threads=threads, precision=PRECISION)
    rows = {"labels": [], "fp32_class": [], "int8_class": [], "fp32_exit": [], "int8_exit": []}
    for batch, labels in itertools.chain([first], batches):
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
        "fp32_accuracy": float(top1_hits(r["fp32_class"], r["labels"]).mean()),
        "int8_accuracy": float(top1_hits(r["int8_class"], r["labels"]).mean()),
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
    if record.get("peak_rss_bytes") is not None:
        lines.append(
            f"  ranges recorded and graphs quantised in {record['seconds']:.0f} s (recording "
            f"{record['recording_seconds']:.0f} s, {record['videos_per_pass']} videos at a time); peak resident "
            f"memory {record['peak_rss_bytes'] / 2**30:.2f} GiB ({record['peak_rss_of']})"
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
    if speed := record.get("speed"):  # both go when the thresholds are calibrated again
        lines.append(
            f"  CPU speed (Runtime.predict, batch {speed['batch']}, {speed['threads']} threads, median of "
            f"{speed['runs']}): fp32 {speed['fp32_videos_per_s']:.0f} videos/s, int8 "
            f"{speed['int8_videos_per_s']:.0f} videos/s ({speed['speedup']:.2f}x); load average "
            f"{speed['load_average'][0]:.1f} on {speed['cpus']} CPUs"
        )
    return "\n".join(lines)


def _videos_of(record: dict) -> str:
    """Where a record's videos came from: a synthetic split, or the user's list (`set`/`list`)."""
    listed = record.get("list") or record.get("set")
    return f"videos of {listed}" if listed else f"'{record.get('split', '?')}' videos"
