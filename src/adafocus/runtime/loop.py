"""The cube loop, written once for every backend and both modes (docs/runtime-protocol.md).

Videos occupy slots of a pool. Each turn runs one cube for every running video, whatever its step:
crop -> local -> classifier, with the step index per row. Videos whose entropy passes their step's
threshold (or that used all K cubes) leave, and the rest are compacted. Newly admitted videos are
glanced, those confident at step 0 leave at once, the policy plans the others' cubes, and they join
the running set.

- Per-batch mode: the caller's batch is the pool (no copy) and is admitted once.
- Streaming mode: a pool of `capacity` slots is refilled from an iterator whenever a quarter of it is
  free, so the local encoder keeps a full batch while videos come and go (continuous batching).

Because every graph is row-independent, a video's result does not depend on its neighbours (up to
float summation order, ~1e-6), so the two modes agree per video.

Only entropies (and, once per video, its logits and planned cubes) reach the host; videos, cubes
and per-video states stay on the backend's device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from adafocus.runtime.backends import Backend


@dataclass
class Finished:
    """One video's outcome. Steps a video never reached: NaN centres, -1 starts."""

    index: int
    logits: np.ndarray  # (N,) at the exit step
    exit_step: int  # number of cubes processed
    centres: np.ndarray  # (K, 3) x, y, t in [0, 1]
    cube_starts: np.ndarray  # (K, 3) x0, y0, t0


@dataclass
class Failed:
    index: int
    error: str


@dataclass
class LoopStats:
    """Exits per step always; seconds per stage only when profiling."""

    exits: list[int]
    videos: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


Chunk = tuple[np.ndarray, object, list[Failed]]  # video indices, their videos (backend array), bad inputs
Source = Callable[[int], Chunk | None]  # asked for at most n videos; None when exhausted


def cube_loop(
    backend: Backend,
    source: Source,
    *,
    thresholds: np.ndarray,
    max_cubes: int,
    video_shape: tuple[int, ...],
    capacity: int | None,
    stats: LoopStats,
) -> Iterator[Finished | Failed]:
    """Run videos from `source` to their exits. capacity None = per-batch mode (one chunk, no copy)."""
    k_max = max_cubes
    thresholds = np.asarray(thresholds, dtype=np.float32)  # compare as float32, like the reference
    pool = backend.empty_pool(capacity, video_shape) if capacity else None
    free = list(range(capacity or 0))
    refill_at = max(1, (capacity or 1) // 4)

    ids = np.empty(0, np.int64)  # running videos, as their indices in the caller's order
    slots = np.empty(0, np.int64)  # their rows in the pool
    steps = np.empty(0, np.int64)  # the cube each runs next (1..K)
    starts = np.empty((0, k_max, 3), np.int64)
    centres = np.empty((0, k_max, 3), np.float32)
    local_state = global_state = None
    exhausted = False

    while True:
        if not exhausted and (len(ids) == 0 or (capacity and len(free) >= refill_at)):
            chunk = source(len(free) if capacity else 0)
            if chunk is None:
                exhausted = True
            else:
                new_ids, videos, failed = chunk
                yield from failed
                if len(new_ids):
                    if capacity:
                        new_slots = np.asarray(free[: len(new_ids)], np.int64)
                        del free[: len(new_ids)]
                        backend.put(pool, new_slots, videos)
                    else:
                        pool, new_slots = videos, np.arange(len(new_ids))
                    glance = backend.run("glance", {"videos": videos})
                    go_on = backend.to_host(glance["entropy"]) > thresholds[0]
                    at_glance = np.zeros(len(new_ids), np.int64)
                    no_cubes = np.zeros((len(new_ids), k_max, 3))
                    yield from _leave(
                        backend, glance["logits"], np.flatnonzero(~go_on), new_ids, at_glance, no_cubes, no_cubes, stats
                    )
                    free.extend(new_slots[~go_on].tolist())
                    rows = np.flatnonzero(go_on)
                    if len(rows):
                        plan = backend.run("policy", {"maps": backend.take(glance["maps"], rows)})
                        new_global = backend.take(glance["global_state"], rows)
                        ids = np.concatenate([ids, new_ids[rows]])
                        slots = np.concatenate([slots, new_slots[rows]])
                        steps = np.concatenate([steps, np.ones(len(rows), np.int64)])
                        starts = np.concatenate([starts, backend.to_host(plan["cube_starts"])])
                        centres = np.concatenate([centres, backend.to_host(plan["centres"])])
                        new_local = backend.zeros(len(rows), backend_width(new_global))
                        if global_state is None:
                            local_state, global_state = new_local, new_global
                        else:
                            local_state = backend.concat([local_state, new_local])
                            global_state = backend.concat([global_state, new_global])
        if len(ids) == 0:
            if exhausted:
                return
            continue

        step_starts = starts[np.arange(len(ids)), steps - 1]
        cubes = backend.run(
            "crop", {"pool": pool, "rows": backend.from_host(slots), "starts": backend.from_host(step_starts)}
        )["cubes"]
        features = backend.run("local", {"cubes": cubes})["features"]
        out = backend.run(
            "classifier",
            {
                "features": features,
                "local_state": local_state,
                "global_state": global_state,
                "step": backend.from_host(steps),
            },
        )
        done = (backend.to_host(out["entropy"]) <= thresholds[steps]) | (steps == k_max)
        leaving = np.flatnonzero(done)
        yield from _leave(backend, out["logits"], leaving, ids, steps, centres, starts, stats)
        free.extend(slots[done].tolist())
        if len(leaving):
            keep = np.flatnonzero(~done)
            ids, slots, steps, starts, centres = ids[keep], slots[keep], steps[keep], starts[keep], centres[keep]
            local_state = backend.take(out["next_local_state"], keep)
            global_state = backend.take(global_state, keep)
        else:
            local_state = out["next_local_state"]
        steps = steps + 1


def backend_width(array) -> int:
    return int(array.shape[1])


def _leave(backend, logits, rows, ids, steps, centres, starts, stats) -> Iterator[Finished]:
    """Videos leaving after cube `steps[row]` (0 = at the glance), with the cubes they used."""
    if len(rows) == 0:
        return
    k_max = centres.shape[1]
    host_logits = backend.to_host(backend.take(logits, rows))
    for row, video_logits in zip(rows, host_logits):
        used = int(steps[row])
        stats.exits[used] += 1
        stats.videos += 1
        used_centres = np.full((k_max, 3), np.nan, np.float32)
        used_starts = np.full((k_max, 3), -1, np.int64)
        used_centres[:used], used_starts[:used] = centres[row, :used], starts[row, :used]
        yield Finished(int(ids[row]), video_logits, used, used_centres, used_starts)
