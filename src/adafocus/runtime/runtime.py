"""`Runtime`: the public face of the cube loop.

runtime = Runtime.load("exports/demo", backend="onnxruntime")   # a path: adafocus.builtin has the demo
result = runtime.predict(videos)            # (B, T, 3, H, W) float32, numpy or torch
result = runtime.predict(videos, thresholds=per_video)  # (B, K+1): each video its own exit thresholds
for video in runtime.stream(iterable):      # videos or batches in, one result per video out
    ...
runtime.set_budget(0.08)                    # GFLOPs per video, from the calibrated table
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np

from adafocus.errors import AdaFocusError, InternalError
from adafocus.export.manifest import Export, open_export
from adafocus.model.checks import check_thresholds, check_videos
from adafocus.model.presets import get_preset
from adafocus.runtime.arrivals import Arrivals
from adafocus.runtime.backends import Backend, make_backend
from adafocus.runtime.loop import Failed, LoopStats, RowThresholds, StageTimer, cube_loop


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@dataclass
class VideoResult:
    """One video: what a user needs (class, top-k, exit step, cubes, GFLOPs) and the raw logits."""

    index: int
    logits: np.ndarray | None
    exit_step: int
    centres: np.ndarray | None  # (K, 3), Uni-AdaFocus boxes (K, 4); rows past exit_step are NaN
    cube_starts: np.ndarray | None  # (K, 3); rows past exit_step are -1
    gflops: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def probs(self) -> np.ndarray:
        return _softmax(self.logits.astype(np.float64))

    @property
    def prediction(self) -> int:
        return int(np.argmax(self.logits))

    def to_dict(self, class_names: Sequence[str], top_k: int = 5) -> dict:
        if self.error is not None:
            return {"index": self.index, "error": self.error}
        probs = self.probs
        top = np.argsort(-probs, kind="stable")[:top_k]
        used = self.exit_step
        return {
            "index": self.index,
            "class": class_names[self.prediction],
            "class_index": self.prediction,
            "top_k": [[class_names[c], float(probs[c])] for c in top],
            "exit_step": used,
            **self.plan_dict(),
            "gflops": self.gflops,
        }

    def plan_dict(self) -> dict:
        """The steps this video used, under the names of its family: "cubes" (centre, start), or
        Uni-AdaFocus "patches" (frame, box = x0, y0, width, height in pixels)."""
        used = range(self.exit_step)
        if self.centres.shape[-1] == 4:
            return {"patches": [{"frame": int(self.cube_starts[k, 2]), "box": self.centres[k].tolist()} for k in used]}
        return {"cubes": [{"centre": self.centres[k].tolist(), "start": self.cube_starts[k].tolist()} for k in used]}


@dataclass
class BatchResult:
    """Per-batch mode: arrays in the caller's order (B videos, K cubes, N classes)."""

    logits: np.ndarray  # (B, N)
    exit_step: np.ndarray  # (B,)
    centres: np.ndarray  # (B, K, 3), Uni-AdaFocus boxes (B, K, 4)
    cube_starts: np.ndarray  # (B, K, 3)
    gflops: np.ndarray  # (B,)

    @property
    def probs(self) -> np.ndarray:
        return _softmax(self.logits.astype(np.float64))

    @property
    def prediction(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    def video(self, i: int) -> VideoResult:
        return VideoResult(
            i, self.logits[i], int(self.exit_step[i]), self.centres[i], self.cube_starts[i], float(self.gflops[i])
        )


def check_batch_size(batch_size: int, limit: int | None, backend: str) -> None:
    """Refuses a pool of `batch_size` videos past `limit`, the largest batch of `backend`'s engines
    (`Backend.max_batch`: TensorRT engines, AOTInductor packages; None: any)."""
    if limit and batch_size > limit:
        raise AdaFocusError(
            f"batch_size {batch_size} is past the largest batch of this {backend} backend's engines ({limit})",
            f"use batch_size <= {limit} (TensorRT engines and AOTInductor packages: or re-export with a larger "
            "--batch-range)",
        )


def budget_entry(export: Export, gflops: float) -> dict:
    """The calibrated entry of `export` with the best accuracy (or mAP, for a table calibrated by it:
    `Export.budget_metric`) among those costing <= `gflops`."""
    budgets = export.budgets
    if not budgets:
        raise AdaFocusError(f"{export.path} has no calibrated budgets", "run adafocus-calibrate on it first")
    affordable = [b for b in budgets if b["gflops"] <= gflops]
    if not affordable:
        cheapest = min(b["gflops"] for b in budgets)
        raise AdaFocusError(
            f"no calibrated operating point costs <= {gflops} GFLOPs/video (the cheapest is {cheapest:.4f})",
            f"ask for at least {cheapest:.4f}",
        )
    metric = export.budget_metric
    return max(affordable, key=lambda b: (b[metric], -b["gflops"]))


class Runtime:
    """An export directory run by one backend, with an exit policy that can change at run time.

    With `profile=True` every run times its stages into `stats` (see `profile_report`); without,
    only exits are counted. `profile_predict` times one batch on its own, whatever `profile` is.
    """

    def __init__(self, export: Export, backend: Backend, *, profile: bool = False):
        self.export = export
        self.backend = backend
        self.preset = export.preset
        self.class_names = export.class_names
        self.exit_gflops = np.asarray(export.exit_gflops, dtype=np.float64)
        self.profile = profile
        self.stats = LoopStats([0] * self.preset.num_exits)
        thresholds = export.thresholds
        self.set_thresholds(thresholds if thresholds is not None else [-math.inf] * self.preset.num_exits)

    @classmethod
    def load(
        cls,
        export_dir: str | os.PathLike,
        backend: str = "onnxruntime",
        device: str | None = None,
        *,
        preset: str | None = None,
        profile: bool = False,
        **options,
    ) -> Runtime:
        """Open (and verify) the export in `export_dir` on a registered backend (`device` None: the
        backend's default). `preset` refuses another preset's export; `options` go to the backend
        (precision=, threads=, io_binding=, call_workers=, max_call_gflops=, call_cache_mib=)."""
        export = open_export(export_dir)
        if preset is not None and get_preset(preset).name != export.preset.name:
            raise AdaFocusError(
                f"{export.path} holds a {export.preset.name!r} export, not {preset!r}",
                "point to the export of that preset, or drop the preset check",
            )
        return cls(export, make_backend(export, backend, device, **options), profile=profile)

    # exit policy ---------------------------------------------------------------------------------
    def set_thresholds(self, thresholds: Sequence[float | None]) -> None:
        """K+1 entropy thresholds, one per exit step (None or -inf: never exit there)."""
        self.thresholds = np.asarray(check_thresholds(thresholds, self.preset), dtype=np.float64)

    def set_budget(self, gflops: float) -> dict:
        """Use the calibrated thresholds of the most accurate entry whose cost is <= `gflops`."""
        best = budget_entry(self.export, gflops)
        self.set_thresholds(best["thresholds"])
        return best

    # inference -----------------------------------------------------------------------------------
    def check_videos(self, videos, name: str = "videos") -> None:
        """One clear error, before any work, for a batch this export cannot take."""
        check_videos(videos, self.preset, name)

    def predict(self, videos, thresholds=None) -> BatchResult:
        """Per-batch mode: the batch is the pool; videos leave as they exit. `thresholds`: None for
        the runtime's own, K+1 for all videos, or (B, K+1) for each video its own (None or -inf:
        never exit there)."""
        if thresholds is None:
            return self._predict_checked(videos, self._timer(self.stats))
        per_video = self.per_video_thresholds(thresholds, len(videos))
        return self._predict_checked(videos, self._timer(self.stats), row_thresholds=per_video.__getitem__)

    def per_video_thresholds(self, thresholds, videos: int) -> np.ndarray:
        """(videos, K+1) float64 from K+1 thresholds for all or one row of K+1 per video, checked."""
        rows = np.asarray(thresholds, dtype=object)
        if rows.ndim == 1:
            return np.tile(np.asarray(check_thresholds(list(rows), self.preset), np.float64), (videos, 1))
        if rows.ndim != 2 or rows.shape[0] != videos:
            raise AdaFocusError(
                f"thresholds of shape {rows.shape} for {videos} videos",
                f"give {self.preset.num_exits} thresholds for all videos, or one row of them per video",
            )
        return np.asarray([check_thresholds(list(row), self.preset) for row in rows], np.float64)

    def profile_predict(self, videos) -> tuple[BatchResult, dict]:
        """`predict` with every stage timed, on its own counters: the result and `profile_report`'s
        figures for this one batch."""
        stats = LoopStats([0] * self.preset.num_exits)
        result = self._predict_checked(videos, StageTimer(self.backend, stats), stats)
        return result, _report(stats)

    def _predict_checked(
        self, videos, timer: StageTimer | None, stats: LoopStats | None = None, row_thresholds=None
    ) -> BatchResult:
        self.check_videos(videos)
        limit = self.backend.max_batch  # TensorRT and AOTInductor: the engines' batch range ends there
        if limit and videos.shape[0] > limit:
            parts = []
            for i in range(0, videos.shape[0], limit):
                part_thresholds = None if row_thresholds is None else (lambda ids, i=i: row_thresholds(ids + i))
                parts.append(self._predict(videos[i : i + limit], timer, stats, part_thresholds))
            return BatchResult(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(BatchResult)))
        return self._predict(videos, timer, stats, row_thresholds)

    def _predict(
        self, videos, timer: StageTimer | None, stats: LoopStats | None, row_thresholds: RowThresholds | None = None
    ) -> BatchResult:
        n, k_max, classes = videos.shape[0], self.preset.max_cubes, self.preset.num_classes
        batch = self.backend.videos(videos)
        served = False

        def source(_: int):
            nonlocal served
            if served:
                return None
            served = True
            return np.arange(n), batch, []

        result = BatchResult(
            np.zeros((n, classes), np.float32),
            np.zeros(n, np.int64),
            np.full((n, k_max, self.preset.plan_width), np.nan, np.float32),
            np.full((n, k_max, 3), -1, np.int64),
            np.zeros(n, np.float64),
        )
        finished = 0
        for done in self._run(source, capacity=None, timer=timer, stats=stats, row_thresholds=row_thresholds):
            i = done.index
            result.logits[i], result.exit_step[i] = done.logits, done.exit_step
            result.centres[i], result.cube_starts[i] = done.centres, done.cube_starts
            result.gflops[i] = self.exit_gflops[done.exit_step]
            finished += 1
        if finished != n:
            raise InternalError(f"the cube loop finished {finished} of {n} videos")
        return result

    def step_outputs(self, videos) -> tuple[np.ndarray, np.ndarray]:
        """Every exit's entropy (B, K+1) float32 and logits (B, K+1, classes) float32 for a batch,
        with nobody exiting early: what calibrating exit thresholds on this engine takes (its own
        entropies, as its graphs compute them in fp16 or INT8 too). The same loop as `predict`, with
        every threshold at -inf; `thresholds` and `stats` are left as they are."""
        self.check_videos(videos)
        limit = self.backend.max_batch
        if limit and videos.shape[0] > limit:
            parts = [self.step_outputs(videos[i : i + limit]) for i in range(0, videos.shape[0], limit)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        n, exits = videos.shape[0], self.preset.num_exits
        recorder = _StepRecorder(self.backend, LoopStats([0] * exits), n, exits, self.preset.num_classes)
        batch = self.backend.videos(videos)
        chunks = iter([(np.arange(n), batch, [])])
        finished = cube_loop(
            self.backend,
            lambda _: next(chunks, None),
            thresholds=np.full(exits, -np.inf),
            max_cubes=self.preset.max_cubes,
            cube_shape=self.preset.cube_shape,
            capacity=None,
            stats=recorder.stats,
            timer=recorder,
        )
        if sum(1 for _ in finished) != n or not recorder.seen.all():
            raise InternalError(f"the loop without exits left steps unrecorded ({recorder.seen.sum(axis=0)} of {n})")
        return recorder.entropy, recorder.logits

    def stream(
        self,
        videos: Iterable,
        batch_size: int = 128,
        *,
        row_thresholds: RowThresholds | None = None,
        values_checked: bool = False,
    ) -> Iterator[VideoResult]:
        """Streaming mode: videos in, one at a time (T, 3, H, W) or in batches (n, T, 3, H, W) as a
        DataLoader yields them, through a pool of `batch_size` slots; one VideoResult per video out,
        in completion order (`index` = the video's position in the input, counting every video of
        every batch). A bad video yields a result with `error` and the others go on. Batches are
        admitted without a copy where they can be (runtime/arrivals.py).

        The input may yield `adafocus.runtime.loop.NOT_YET` (nothing right now): the pool runs on
        with what it has. `row_thresholds(indices)` -> (n, K+1), asked as the videos are admitted,
        gives each its own exit thresholds (default: the runtime's). `values_checked`: the caller has
        checked every video for NaN/inf already (their shapes are checked all the same)."""
        if batch_size < 1:
            raise AdaFocusError(f"batch_size must be >= 1, got {batch_size}")
        check_batch_size(batch_size, self.backend.max_batch, self.backend.name)
        source = Arrivals(videos, self.backend.arrays, self.preset, batch_size, values_checked=values_checked)
        timer = self._timer(self.stats)
        for done in self._run(source, capacity=batch_size, timer=timer, stats=None, row_thresholds=row_thresholds):
            if isinstance(done, Failed):
                yield VideoResult(done.index, None, -1, None, None, 0.0, error=done.error)
            else:
                gflops = float(self.exit_gflops[done.exit_step])
                yield VideoResult(done.index, done.logits, done.exit_step, done.centres, done.cube_starts, gflops)

    def _timer(self, stats: LoopStats) -> StageTimer | None:
        return StageTimer(self.backend, stats) if self.profile else None

    def _run(
        self,
        source,
        *,
        capacity: int | None,
        timer: StageTimer | None,
        stats: LoopStats | None,
        row_thresholds: RowThresholds | None = None,
    ):
        stats = stats or self.stats
        started = time.perf_counter()
        yield from cube_loop(
            self.backend,
            source,
            thresholds=self.thresholds,
            max_cubes=self.preset.max_cubes,
            cube_shape=self.preset.cube_shape,
            capacity=capacity,
            stats=stats,
            timer=timer,
            row_thresholds=row_thresholds,
        )
        if timer is not None:
            self.backend.synchronize()
            stats.add_time("total", time.perf_counter() - started)

    def profile_report(self) -> dict:
        """Seconds per stage and the host-side share (time outside the graphs), exits per step."""
        return _report(self.stats)


def _report(stats: LoopStats) -> dict:
    seconds = dict(stats.seconds)
    total = seconds.get("total", 0.0)
    graphs = sum(v for k, v in seconds.items() if k != "total")
    return {
        "seconds": seconds,
        "host_loop_seconds": max(total - graphs, 0.0),
        "host_loop_share": (total - graphs) / total if total else None,
        "exits_per_step": list(stats.exits),
        "videos": stats.videos,
    }


class _StepRecorder(StageTimer):
    """Sits between the loop and the backend and keeps every exit's entropy and logits. Without exits
    every video of the batch runs every step in its own row (nothing leaves before step K, so nothing
    is compacted): the glance's rows are exit 0, each classifier call's rows the exit its `step` says."""

    def __init__(self, backend: Backend, stats: LoopStats, videos: int, exits: int, classes: int):
        super().__init__(backend, stats)
        self.entropy = np.zeros((videos, exits), np.float32)
        self.logits = np.zeros((videos, exits, classes), np.float32)
        self.seen = np.zeros((videos, exits), bool)

    def run(self, graph: str, feeds: dict) -> dict:
        out = self.backend.run(graph, feeds)
        if graph in ("glance", "classifier"):
            arrays = self.backend.arrays
            entropy, logits = arrays.to_host(out["entropy"]), arrays.to_host(out["logits"])
            steps = arrays.to_host(feeds["step"]) if graph == "classifier" else np.zeros(len(entropy), np.int64)
            if len(entropy) != len(self.entropy) or len(set(steps.tolist())) != 1:
                raise InternalError(
                    f"a {graph} call of {len(entropy)} rows at steps {set(steps.tolist())} in a loop without exits"
                )
            step = int(steps[0])
            self.entropy[:, step], self.logits[:, step], self.seen[:, step] = entropy, logits, True
        return out
