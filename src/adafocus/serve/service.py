"""What one served model instance does with a request, Triton aside: the options a repository's
config carries (`ServeOptions`), the inputs it takes and checks, the outputs it answers, and the
three ways of serving a model (`MODES`):

- "continuous" (model `adafocus`): every video goes through the `ServingLoop`, answered when it exits;
- "per_batch" (model `adafocus_per_batch`): what Triton's dynamic batcher groups is one
  `Runtime.predict` call (each video at its own budget), every answer when the batch is done;
- "dense" (model `adafocus_dense`): the export's dense baseline graph per Triton batch.

The Triton model (`triton_model`) only turns Triton requests into calls of `Service` and its answers
or errors into Triton responses, so everything here is tested without a server.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np

from adafocus.data.video import to_model_input
from adafocus.errors import AdaFocusError, NonFiniteOutput
from adafocus.model.checks import check_video, check_video_layout, nonfinite_logits
from adafocus.runtime import Runtime
from adafocus.runtime.backends import make_backend
from adafocus.runtime.loop import LoopStats
from adafocus.serve.budgets import Budgets
from adafocus.serve.decoders import DecoderPool
from adafocus.serve.loop import Overloaded, ServingLoop, Unavailable

MODES = ("continuous", "per_batch", "dense")
INPUTS = ("FRAMES", "VIDEO", "VIDEO_FILE")  # exactly one per request
# what a request may ask for as parameters (Triton request parameters, KServe v2 "parameters")
BUDGET_PARAMETER = "budget_gflops"


@dataclass(frozen=True)
class ServeOptions:
    """How a model instance runs its export. Stored as the model's config parameters (JSON values)."""

    export: str  # the export directory: absolute, or relative to the model's folder in the repository
    backend: str = "onnxruntime"
    device: str | None = None
    precision: str | None = None
    threads: int | None = None
    batch_size: int = 32  # the serving loop's pool; the largest Triton batch of the per-batch models
    budget: float | None = None  # GFLOPs per video for requests that name none
    latency_slo_ms: float | None = None
    max_queue: int = 256
    max_queue_delay_ms: float = 0.0
    admit_wait_ms: float = 0.0  # a busy pool admits a request once it waited this long (inf: when drained)
    max_file_mib: float = 64.0
    decoders: int = 2  # processes decoding VIDEO_FILE inputs

    def __post_init__(self):
        # click's FloatRange lets NaN through (every comparison with it is False), and JSON, the
        # repository's config, has no NaN or inf: refused here, before anything is written or started
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value) and not (f.name == "admit_wait_ms" and value > 0):
                option = "--" + f.name.replace("_", "-")
                also = " (inf: admit only when the pool has drained)" if f.name == "admit_wait_ms" else ""
                raise AdaFocusError(f"{option} is {value}, not a finite number", f"give {option} a number{also}")

    def to_parameters(self) -> dict[str, str]:
        """Strict JSON per option; an infinite delay is the string "inf" (JSON has no Infinity)."""
        return {f.name: json.dumps(_inf_as_text(getattr(self, f.name)), allow_nan=False) for f in fields(self)}

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> ServeOptions:
        known = {f.name for f in fields(cls)}
        values = {k: json.loads(v) for k, v in parameters.items() if k in known}
        return cls(**{k: math.inf if v == "inf" else v for k, v in values.items()})

    def describe(self) -> dict:
        return asdict(self)


def failure_kind(error: BaseException) -> str:
    """How a failed request is answered: "unavailable" (retry later: overloaded or shutting down, HTTP
    503), "bad_request" (the request must change, 400) or "internal" (a fault of ours, 500)."""
    if isinstance(error, Overloaded | Unavailable):
        return "unavailable"
    if isinstance(error, AdaFocusError) and not isinstance(error, NonFiniteOutput):
        return "bad_request"
    return "internal"


def input_count_error(given: list[str]) -> AdaFocusError:
    """The error of a request that carries several of INPUTS, or none."""
    return AdaFocusError(
        f"a request carries {' and '.join(given) or 'none'} of {', '.join(INPUTS)}",
        "send exactly one: FRAMES (uint8 pixels), VIDEO (normalised float32) or VIDEO_FILE (a file's bytes)",
    )


def _inf_as_text(value):
    return "inf" if isinstance(value, float) and math.isinf(value) and value > 0 else value


class _Layout(NamedTuple):  # what check_video_layout reads of a batch
    shape: tuple
    dtype: str


Outcome = dict[str, np.ndarray] | BaseException  # a video's outputs, or why it has none


class Service:
    """One model instance: a warmed-up `Runtime` of the export (or its dense graph), the serving loop
    in "continuous" mode, and the decoder processes for VIDEO_FILE."""

    def __init__(self, options: ServeOptions, mode: str, *, model_dir: str | os.PathLike | None = None, log=print):
        if mode not in MODES:
            raise AdaFocusError(f"unknown serving mode {mode!r}", f"use one of {', '.join(MODES)}")
        self.options, self.mode = options, mode
        export_dir = Path(options.export)
        if not export_dir.is_absolute() and model_dir is not None:
            export_dir = Path(model_dir) / export_dir
        settings = {"precision": options.precision}
        if options.threads:
            settings["threads"] = options.threads
        self.runtime = Runtime.load(export_dir, options.backend, options.device, **settings)
        self.preset = self.runtime.preset
        self.loop: ServingLoop | None = None
        self.dense = None
        if options.budget is not None:
            self.runtime.set_budget(options.budget)
        self.budgets = Budgets(self.runtime.export, self.runtime.thresholds)
        self.max_file_bytes = int(options.max_file_mib * 2**20)
        if mode == "dense":  # the dense graph alone, on the same kind of backend
            self.dense = make_backend(
                self.runtime.export, options.backend, options.device, graphs=("dense",), **settings
            )
        log(f"[{mode}] warming up {options.backend} at batches up to {options.batch_size}")
        self._warm_up()
        if mode == "continuous":
            self.loop = ServingLoop(
                self.runtime,
                batch_size=options.batch_size,
                latency_slo_ms=options.latency_slo_ms,
                max_queue=options.max_queue,
                max_queue_delay_ms=options.max_queue_delay_ms,
                admit_wait_ms=options.admit_wait_ms,
            )
        self.decoders = DecoderPool(self.preset, options.decoders) if options.decoders else None

    def _warm_up(self) -> None:
        """Every graph at batch sizes 1, 2, 4, ... up to the pool's, twice (ONNX Runtime allocates a
        new shape's memory on its second run), before Triton reports the model ready: a first call at
        a new size is several times slower, and would be a request's latency."""
        sizes = [1 << i for i in range(self.options.batch_size.bit_length()) if 1 << i < self.options.batch_size]
        for size in [*sizes, self.options.batch_size]:
            self._warm_up_at(size)
        self.runtime.stats = LoopStats([0] * self.preset.num_exits)  # metrics count served videos only

    def _warm_up_at(self, size: int) -> None:
        videos = np.zeros((size, *self.preset.video_shape), np.float32)
        for _ in range(2):
            if self.dense is not None:
                self.dense.run("dense", {"videos": self.dense.videos(videos)})
            else:
                self.runtime.predict(videos, thresholds=[None] * self.preset.num_exits)  # every cube

    # requests ------------------------------------------------------------------------------------
    def budget_of(self, parameters: dict) -> float | None:
        """A request's `budget_gflops` parameter, checked against the calibrated front now."""
        value = parameters.get(BUDGET_PARAMETER)
        if value is None:
            return None
        try:
            budget = float(value)
        except (TypeError, ValueError):
            raise AdaFocusError(f"{BUDGET_PARAMETER} {value!r} is not a number", "send GFLOPs per video") from None
        self.budgets.resolve(budget)  # an unknown budget is refused before any work
        return budget

    def video_of(self, inputs: dict[str, np.ndarray]) -> np.ndarray | Future:
        """One request's video: the normalised (T, 3, S, S) float32 frames, or a Future of the decoded
        file. Every problem is an AdaFocusError naming the input, raised before any work."""
        given = [name for name in INPUTS if inputs.get(name) is not None]
        if len(given) != 1:
            raise input_count_error(given)
        name, value = given[0], np.asarray(inputs[given[0]])
        if name == "VIDEO_FILE":
            data = value.reshape(-1)[0] if value.size == 1 else None
            if not isinstance(data, bytes | np.bytes_):
                raise AdaFocusError(f"VIDEO_FILE holds {value.size} elements", "send one file's bytes, shape [1]")
            if len(data) > self.max_file_bytes:
                raise AdaFocusError(
                    f"VIDEO_FILE of {len(data) / 2**20:.1f} MiB is over this server's limit of "
                    f"{self.options.max_file_mib:g} MiB",
                    "send a smaller file, or start the server with a larger --max-file-mib",
                )
            if self.decoders is None:
                raise AdaFocusError("this server decodes no VIDEO_FILE (0 decoders)", "send FRAMES or VIDEO")
            return self.decoders.submit(bytes(data))
        expected = "uint8" if name == "FRAMES" else "float32"
        if value.dtype != np.dtype(expected):
            raise AdaFocusError(f"{name} has dtype {value.dtype}, expected {expected}", f"send {name} as {expected}")
        check_video_layout(_Layout((1, *value.shape), "float32"), self.preset, name)  # the dtype is checked above
        return to_model_input(value).numpy() if name == "FRAMES" else value  # values: checked where it is run

    def submit(self, inputs: dict, parameters: dict, on_done: Callable[[Outcome], None]) -> None:
        """Continuous mode: start serving one request; `on_done` gets its outputs or its error, exactly
        once (from another thread, or before this returns when the request is refused). Its latency,
        which a latency target holds, counts from this call: decoding and conversion included. Under
        overload a request is refused before its video is decoded or checked: a server that cannot
        take it spends nothing on it (its client, retrying later, then learns what is wrong with it).
        A file counts toward the loop's queue (`max_queue`) from then on, while it waits for a decoder
        and is decoded: uploads are held in memory, and must not pile up without bound."""
        received = time.perf_counter()
        is_file, held = inputs.get("VIDEO_FILE") is not None, False
        try:
            budget = self.budget_of(parameters)
            self.loop.check_room(hold=is_file)  # refused for the load before a file is decoded or frames converted
            held = is_file
            video = self.video_of(inputs)
        except Exception as e:  # noqa: BLE001 - refused before any work: answered now
            # the load's refusals (Overloaded, Unavailable) are counted by the loop already
            self._refused(e if failure_kind(e) == "bad_request" else None, release=held)
            on_done(e)
            return
        name = next(n for n in INPUTS if inputs.get(n) is not None)
        if isinstance(video, Future):
            video.add_done_callback(lambda decoded: self._submit_decoded(decoded, budget, on_done, received))
        else:
            self._submit_video(video, budget, None, on_done, name, received, held=False)

    def _refused(self, error: BaseException | None, *, release: bool) -> None:
        """Count a refusal the loop did not see (`error` None: counted already) in adafocus_refused_total,
        and give up the request's held room."""
        if error is not None and failure_kind(error) != "internal":
            self.loop.count_refused(failure_kind(error), release=release)
        elif release:
            self.loop.release()

    def _submit_decoded(self, decoded: Future, budget, on_done, received: float) -> None:
        error = decoded.exception()
        if error is not None:  # a file that does not decode, or a decoder pool closing
            self._refused(error, release=True)
            on_done(error)
            return
        clip = decoded.result()
        self._submit_video(clip.frames, budget, clip, on_done, "VIDEO_FILE", received, held=True)

    def _submit_video(self, video, budget, source, on_done, name: str, received: float, *, held: bool) -> None:
        def answer(future: Future) -> None:
            try:
                outcome = self._outputs(future.result(), source)
            except Exception as e:  # noqa: BLE001 - the loop's failure, or a video it refused
                outcome = e
            on_done(outcome)  # once: outside the try, so that an on_done that raises is not called again

        try:
            self.loop.submit(video, budget_gflops=budget, on_done=answer, name=name, received=received, held=held)
        except Exception as e:  # noqa: BLE001 - refused: a bad video, overloaded, shutting down
            on_done(e)

    def run_batch(self, requests: list[tuple[dict, dict]]) -> list[Outcome]:
        """Per-batch and dense modes: one graph run for every good video of a Triton batch; each
        request (inputs, parameters) gets its outputs or its own error."""
        outcomes: list[Outcome | None] = [None] * len(requests)
        videos, budgets, sources, rows = [], [], [], []
        pending = []
        for i, (inputs, parameters) in enumerate(requests):
            try:
                budget = self.budget_of(parameters)
                pending.append((i, budget, self.video_of(inputs)))
            except Exception as e:  # noqa: BLE001 - this request's own error
                outcomes[i] = e
        for i, budget, video in pending:
            source = None
            try:
                if isinstance(video, Future):
                    source = video.result()  # a file that does not decode raises here
                    video = source.frames
                check_video(video, self.preset, next(n for n in INPUTS if requests[i][0].get(n) is not None))
            except Exception as e:  # noqa: BLE001 - this request's own error
                outcomes[i] = e
                continue
            rows.append(i)
            videos.append(video)
            budgets.append(budget)
            sources.append(source)
        if rows:
            try:
                answers = self._predict(np.stack(videos), budgets, sources)
            except Exception as e:  # noqa: BLE001 - the engine failed: every request of the batch says so
                answers = [e] * len(rows)
            for i, answer in zip(rows, answers):
                outcomes[i] = answer
        return outcomes

    def _predict(self, videos: np.ndarray, budgets: list, sources: list) -> list[Outcome]:
        if self.dense is not None:
            out = self.dense.run("dense", {"videos": self.dense.videos(videos)})
            logits = self.dense.arrays.to_host(out["logits"])
            gflops = float(self.runtime.export.dense_gflops)
            return [_dense_outputs(row, gflops, s) for row, s in zip(logits, sources)]
        points = [self.budgets.resolve(b) for b in budgets]
        result = self.runtime.predict(videos, thresholds=np.stack([p.thresholds for p in points]))
        return [self._outputs_of(result.video(r), p.gflops, s) for r, (p, s) in enumerate(zip(points, sources))]

    def _outputs(self, served, source) -> Outcome:
        if served.result.error is not None:
            raise AdaFocusError(served.result.error)
        return self._outputs_of(served.result, served.budget_gflops, source)

    def _outputs_of(self, result, budget_gflops: float, source) -> Outcome:
        """The video's outputs, or its error where the model gave it NaN or inf (that video fails
        alone, with a 500: it has no class to answer)."""
        if (error := nonfinite_logits("this request's video", result.logits, result.exit_step)) is not None:
            return error
        outputs = {
            "CLASS_INDEX": np.array([result.prediction], np.int64),
            "PROBABILITIES": result.probs.astype(np.float32),
            "EXIT_STEP": np.array([result.exit_step], np.int32),
            "GFLOPS": np.array([result.gflops], np.float32),
            **plan_values(result),
            "BUDGET_GFLOPS": np.array([budget_gflops], np.float32),
        }
        return outputs | _source_outputs(source)

    # state ---------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """Counters for the server's metrics endpoint (adafocus_* families, docs/serving.md)."""
        if self.loop is None:
            return {"exits": list(self.runtime.stats.exits)}
        c = self.loop.counters()
        return {
            "exits": c.exits,
            "answered": c.answered,
            "failed": c.failed,
            "refused": c.refused,
            "gflops_served": c.gflops_served,
            "queue_length": c.queued,
            "pool_occupancy": c.in_pool,
            "budget_gflops": c.budget_in_force if math.isfinite(c.budget_in_force) else -1.0,
            "turns": c.turns,
            "mixed_budget_turns": c.mixed_budget_turns,
        }

    def close(self) -> None:
        """Answer what was accepted (files being decoded go on to the loop), then stop."""
        if self.decoders is not None:
            self.decoders.close()
        if self.loop is not None:
            self.loop.close()


def _dense_outputs(logits: np.ndarray, gflops: float, source) -> Outcome:
    if (error := nonfinite_logits("this request's video", logits)) is not None:
        return error
    z = np.exp(logits.astype(np.float64) - logits.max())
    outputs = {
        "CLASS_INDEX": np.array([int(np.argmax(logits))], np.int64),
        "PROBABILITIES": (z / z.sum()).astype(np.float32),
        "GFLOPS": np.array([gflops], np.float32),
    }
    return outputs | _source_outputs(source)


def _source_outputs(source) -> dict[str, np.ndarray]:
    """Where a file was decoded here: which frames were sampled, and how they were decoded."""
    if source is None:  # tensors came in: nothing was decoded
        return {}
    return {
        "FRAME_INDICES": np.asarray(source.indices, np.int32),
        "DECODED_BY": np.array([source.decoding.encode("utf-8")], np.object_),
    }


# The plan outputs of each model family (docs/serving.md): AdaFocusV3 answers its cubes, Uni-AdaFocus
# its patches. The model configuration, the served values and the client's JSONL read them here.
def plan_outputs(family: str, max_cubes: int) -> list[tuple[str, str, list[int]]]:
    """(name, Triton type, shape) of the plan outputs of one video."""
    if family == "uni":
        return [("PATCH_FRAMES", "TYPE_INT32", [max_cubes]), ("PATCH_BOXES", "TYPE_FP32", [max_cubes, 4])]
    return [("CUBE_STARTS", "TYPE_INT32", [max_cubes, 3]), ("CUBE_CENTRES", "TYPE_FP32", [max_cubes, 3])]


def plan_values(result) -> dict[str, np.ndarray]:
    """A VideoResult's plan as those outputs (-1 / NaN past its exit step)."""
    if result.centres.shape[-1] == 4:
        return {
            "PATCH_FRAMES": result.cube_starts[:, 2].astype(np.int32),
            "PATCH_BOXES": result.centres.astype(np.float32),
        }
    return {"CUBE_STARTS": result.cube_starts.astype(np.int32), "CUBE_CENTRES": result.centres.astype(np.float32)}


def plan_record(outputs: dict[str, np.ndarray], used: int) -> dict:
    """The JSONL fields of those outputs for the `used` steps, as VideoResult.plan_dict writes them."""
    if "PATCH_BOXES" in outputs:
        frames, boxes = outputs["PATCH_FRAMES"], outputs["PATCH_BOXES"]
        return {"patches": [{"frame": int(frames[k]), "box": boxes[k].tolist()} for k in range(used)]}
    centres, starts = outputs["CUBE_CENTRES"], outputs["CUBE_STARTS"]
    return {"cubes": [{"centre": centres[k].tolist(), "start": starts[k].tolist()} for k in range(used)]}
