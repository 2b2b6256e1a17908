"""Past one machine: classify a corpus of video files on a Ray cluster with Ray Data.

    for line in predict_dataset(paths, "exports/demo", actors=4, gpus_per_actor=1, decoders=32):
        ...   # the same JSONL lines as adafocus-predict, in completion order

The pipeline: the paths -> decoding as Ray tasks on CPUs (PyAV, exactly `adafocus.data.video`'s
sampling and resizing), whose frames cross the object store as uint8 (a quarter of float32) ->
`map_batches` with a callable class that opens the export's `Runtime` once per actor (a pool of
`actors`, each with `gpus_per_actor` GPUs) and runs the streaming loop on each batch -> one line per
input. Ray Data streams (back-pressure between the stages), retries a decoding task whose worker
dies, and restarts a dead actor and retries its batch (its defaults for actor pools); every input
still gets exactly one line, which `predict_dataset` checks. A broken video is an error line, not a
failed job. The same code runs on a laptop (`ray.init()`), a cluster (`address=`) or KubeRay.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from adafocus.errors import AdaFocusError, InternalError, error_text
from adafocus.export.manifest import open_export
from adafocus.model.checks import check_thresholds
from adafocus.predict import result_record
from adafocus.runtime.backends import largest_batch
from adafocus.runtime.runtime import budget_entry, check_batch_size

INSTALL = 'pip install -e ".[scale]" (or pip install "ray[data]")'


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the extra, not Ray Core alone)
    except ImportError as e:
        raise AdaFocusError(f"--engine ray needs Ray Data, which is not installed ({e})", INSTALL) from None
    return ray


@dataclass
class ScaleStats:
    """What a run did and where its time went (summed over workers)."""

    videos: int = 0
    failed: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0
    inference_seconds: float = 0.0
    actors: int = 0
    decoders: int = 0
    cluster: dict = field(default_factory=dict)

    def summary(self) -> str:
        rate = self.videos / self.seconds if self.seconds else 0.0
        return (
            f"{self.videos} videos in {self.seconds:.1f} s ({rate:.1f} videos/s) on Ray: {self.actors} actor(s), "
            f"{self.decoders} decoder(s); decoding {self.decode_seconds:.1f} s, inference "
            f"{self.inference_seconds:.1f} s (summed over workers); cluster {self.cluster}"
        )


def decode_row(
    row: dict, *, num_frames: int, frame_size: int, resize_shorter_side: int | None, method: str = "auto"
) -> dict:
    """One path -> uint8 frames (T, 3, S, S) and [sampled source indices, how decoded], or the error."""
    from adafocus.data.video import load_clip

    started = time.perf_counter()
    pixels = np.zeros((num_frames, 3, frame_size, frame_size), np.uint8)
    try:
        # one decoder thread: the task reserves one CPU (num_cpus=1), and Ray runs one per CPU
        clip = load_clip(row["path"], num_frames, frame_size, resize_shorter_side, method=method, threads=1)
        pixels, source, error = clip.pixels.numpy(), json.dumps([clip.indices, clip.decoding]), ""
    except Exception as e:  # any file may be broken in its own way; it becomes its error line
        source, error = "[]", error_text(e)
    return {
        "position": row["position"],
        "path": row["path"],
        "pixels": pixels,
        "source": source,
        "error": error,
        "decode_seconds": time.perf_counter() - started,
    }


class Classifier:
    """The Ray Data callable class: one Runtime per actor, the streaming loop on every batch."""

    def __init__(
        self,
        export_dir: str,
        backend: str,
        device: str | None,
        thresholds: list | None,
        budget: float | None,
        top_k: int,
        exit_after_first_batch: str | None = None,
    ):
        from adafocus.runtime import Runtime

        self.runtime = Runtime.load(export_dir, backend, device)
        if thresholds is not None:
            self.runtime.set_thresholds(thresholds)
        if budget is not None:
            self.runtime.set_budget(budget)
        self.top_k = top_k
        # test-only: this marker file's absence makes the first actor to finish a batch die (once)
        self.exit_marker = exit_after_first_batch

    def __call__(self, batch: dict) -> dict:
        from adafocus.data.video import to_model_input

        started = time.perf_counter()
        good = [i for i, error in enumerate(batch["error"]) if not error]
        videos = [to_model_input(batch["pixels"][i]) for i in good]
        results = {good[r.index]: r for r in self.runtime.stream(iter(videos), batch_size=max(len(videos), 1))}
        lines = []
        for i, path in enumerate(batch["path"]):
            if i in results:
                frames, decoding = json.loads(batch["source"][i])
                record = result_record(str(path), results[i], self.runtime.class_names, self.top_k, frames, decoding)
            else:
                record = {"path": str(path), "error": str(batch["error"][i])}
            lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False))
        if self.exit_marker and not os.path.exists(self.exit_marker):
            open(self.exit_marker, "w", encoding="utf-8").close()
            os._exit(1)  # an actor that dies mid-run: Ray restarts it and retries this batch
        seconds = time.perf_counter() - started
        return {
            "position": np.asarray(batch["position"]),
            "line": np.asarray(lines, dtype=object),
            "decode_seconds": np.asarray(batch["decode_seconds"]),
            "inference_seconds": np.full(len(lines), seconds / max(len(lines), 1)),
        }


# address this module gave ray.init -> the GCS address of the cluster it joined ("local" resolves to none)
_joined: dict[str | None, str] = {}


def check_connected(ray, address: str | None) -> None:
    """Refuse `address` when it names a cluster other than the one this process is connected to.

    ray.init joins one cluster per process and is not called again, so a different address would be
    ignored and the work would run where the process happens to be connected (a local cluster, after
    a ray.init() for something else). An address names the connected cluster when it is the GCS
    address, resolves to it as ray.init resolves it ("auto", "localhost:6379"), or is the one this
    module joined it with (so that the same call twice runs twice)."""
    if address is None:
        return
    connected = ray.get_runtime_context().gcs_address
    if _joined.get(address) == connected or address == connected:
        return
    try:  # ray.init's own resolution, private to Ray: should it move, only the GCS address is accepted
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address(address)
    except Exception:  # also an address ray.init could not use: it names no cluster, this one included
        resolved = None
    if resolved != connected:
        raise AdaFocusError(
            f"Ray in this process is connected to the cluster at {connected} already, not to {address!r} "
            "(a process joins one cluster)",
            "pass no address to run on the connected cluster, or call ray.shutdown() first to join the other",
        )


def predict_dataset(
    paths: Sequence[str],
    export_dir: str | os.PathLike,
    *,
    backend: str = "onnxruntime",
    device: str | None = None,
    address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    decoders: int = 1,
    batch_size: int = 16,
    top_k: int = 5,
    thresholds: list | None = None,
    budget: float | None = None,
    decode: str = "auto",
    stats: ScaleStats | None = None,
    log: Callable[[str], None] = print,
    exit_after_first_batch: str | None = None,
) -> Iterator[dict]:
    """One dict per path (adafocus-predict's lines), in completion order, from a Ray Data pipeline.
    `address`: a running cluster ("auto", "head:6379", ...); None starts or joins a local one (or
    $RAY_ADDRESS's, as ray.init does). Not Ray Client (ray://...): Ray Data does not run through it.
    A process joins one cluster: where Ray is initialised already, None runs on that cluster and an
    address naming another is refused. No paths: no lines, and no cluster started or joined.
    `decode`: "auto" (seek where exact) or "sequential" (`adafocus.data.video.load_clip`'s method).

    Everything the driver can check is checked when this is called, not when the lines are first
    asked for: a caller (adafocus-predict) opens its --out file between the two."""
    ray = require_ray()
    client = address if address is not None else os.environ.get("RAY_ADDRESS", "")
    if client.startswith("ray://"):  # Ray Data's executor needs a driver in the cluster (ray-project/ray#42739)
        raise AdaFocusError(
            f"Ray Data pipelines do not run through Ray Client ({client}): the driver must be part of the cluster",
            "run adafocus-predict on a node of the cluster (--address auto, or HEAD:6379), e.g. with ray job submit",
        )
    if actors < 1 or decoders < 1 or batch_size < 1 or gpus_per_actor < 0 or cpus_per_actor < 0:
        raise AdaFocusError("actors, decoders and batch_size must be >= 1, GPUs and CPUs per actor >= 0")
    export = open_export(export_dir)  # verified on the driver, before any cluster work
    # The actors apply thresholds and budget in their constructors, where an error kills the actor
    # and comes back as a page of Ray traceback (ActorDiedError): refused here, as the local engine does.
    if thresholds is not None:
        check_thresholds(thresholds, export.preset)
    if budget is not None:
        budget_entry(export, budget)
    # Runtime.stream refuses a batch past the engines' batch range, but in an actor, only once a batch
    # holds more decodable videos than that (perhaps after other batches' lines were written), as a
    # page of Ray traceback: refused here whatever the videos, as the local engine does, in its words.
    check_batch_size(batch_size, largest_batch(export, backend, device), backend)
    if ray.is_initialized():
        check_connected(ray, address)
    names = [os.fspath(p) for p in paths]
    stats = stats if stats is not None else ScaleStats()

    def lines() -> Iterator[dict]:  # the pipeline, started when the first line is asked for
        if not names:  # nothing to do (--resume after a finished run): no cluster is started or joined for it
            return
        preset = export.preset
        stats.actors, stats.decoders = actors, decoders
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False, include_dashboard=False)
            _joined[address] = ray.get_runtime_context().gcs_address
        stats.cluster = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        started = time.perf_counter()
        items = [{"position": i, "path": p} for i, p in enumerate(names)]
        blocks = max(1, min(len(items), 8 * decoders))
        decoded = ray.data.from_items(items, override_num_blocks=blocks).map(
            decode_row,
            fn_kwargs={
                "num_frames": preset.num_frames,
                "frame_size": preset.frame_size,
                "resize_shorter_side": preset.resize_shorter_side,  # the preprocessing the model declares
                "method": decode,
            },
            compute=ray.data.TaskPoolStrategy(size=decoders),
            num_cpus=1,
        )
        classified = decoded.map_batches(
            Classifier,
            fn_constructor_kwargs={
                "export_dir": str(export.path),
                "backend": backend,
                "device": device,
                "thresholds": thresholds,
                "budget": budget,
                "top_k": top_k,
                "exit_after_first_batch": exit_after_first_batch,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus_per_actor,
            num_cpus=cpus_per_actor,
        )
        seen: set[int] = set()
        for row in classified.iter_rows():
            position = int(row["position"])
            if position in seen:  # a retried batch must not answer twice
                raise InternalError(f"the Ray pipeline answered input {position} ({names[position]}) twice")
            seen.add(position)
            stats.decode_seconds += float(row["decode_seconds"])
            stats.inference_seconds += float(row["inference_seconds"])
            record = json.loads(row["line"])
            stats.videos += 1
            stats.failed += "error" in record
            yield record
        stats.seconds = time.perf_counter() - started
        if len(seen) != len(names):
            missing = sorted(set(range(len(names))) - seen)[:5]
            raise InternalError(
                f"the Ray pipeline lost {len(names) - len(seen)} inputs (first: {[names[m] for m in missing]})"
            )

    return lines()
