"""The cube loop, written once for every backend and both modes (docs/runtime-protocol.md).

Newly admitted videos are glanced, those confident at step 0 leave at once, the policy plans the
others' K cubes and they join the running set. Each turn runs one cube for every running video,
whatever its step: crop -> local -> classifier, with the step index per row. Videos whose entropy
passes their step's threshold (or that used all K cubes) leave, and the rest are compacted.

- Per-batch mode: the caller's batch is admitted once and stays readable (no copy): each turn cuts
  the running videos' cubes from it.
- Streaming mode: a pool of `capacity` slots is refilled from an iterator whenever a quarter of it is
  free, so the local encoder keeps a full batch while videos come and go (continuous batching).
  Arrivals come as views of the caller's batches or in a reused staging batch (runtime/arrivals.py),
  which are not kept: their K cubes are cut as they are admitted (the plan is fixed after the
  policy) into their slots of a pool of cubes, and each turn takes its cubes from there. The pool
  holds cubes, not videos (the demo: 4 x 48 KB instead of 1.5 MB), and an arriving video is copied
  at most once (into the staging batch), not twice. Cutting up front costs crops
  for steps a video never reaches; in per-batch mode, where nothing must be copied, it was 5 %
  slower (paired), so that mode cuts per turn. Both give the same cubes.

- Serving (adafocus.serve) is streaming mode whose source may answer "nothing right now"
  (`NOT_YET`): the loop then runs one turn for the videos it has instead of waiting for a full
  pool, and asks again after it.

Exit thresholds are per row: every video carries its own K+1 thresholds from admission to exit
(`row_thresholds`, or the same `thresholds` for all), so videos of different budgets share every
graph call. Only the comparison with each row's entropy differs.

Because every graph is row-independent, a video's result does not depend on its neighbours (up to
float summation order, ~1e-6), so the two modes agree per video.

Only entropies (and, once per video, its logits and planned cubes) reach the host; videos, cubes
and per-video states stay on the backend's device.

Both model families run here: a Uni-AdaFocus plan is K patch boxes (4 floats a step instead of a
centre's 3), and its crop graph, which resamples, also takes each row's box (`boxes`). Both are read
from the graphs' declarations in the manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from adafocus.errors import AdaFocusError
from adafocus.runtime.backends import Backend


@dataclass
class Finished:
    """One video's outcome. Steps a video never reached: NaN centres, -1 starts."""

    index: int
    logits: np.ndarray  # (N,) at the exit step
    exit_step: int  # number of cubes processed
    centres: np.ndarray  # (K, 3) x, y, t in [0, 1]; Uni-AdaFocus: (K, 4) boxes x0, y0, width, height
    cube_starts: np.ndarray  # (K, 3) x0, y0, t0 (Uni-AdaFocus: t0 is the patch's frame)


@dataclass
class Failed:
    index: int
    error: str


@dataclass
class LoopStats:
    """Exits per step always; seconds per stage only when a StageTimer records them."""

    exits: list[int]
    videos: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    in_pool: int = 0  # videos running after the latest turn
    turns: int = 0  # cube steps run (graph calls of the local network)
    mixed_threshold_turns: int = 0  # of those, turns whose rows did not all carry the same thresholds

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class StageTimer:
    """Times each graph call of one backend into `stats` (waiting for the device, so the time is the
    graph's). Handed to the loop explicitly; nothing on the backend is switched on or off."""

    def __init__(self, backend: Backend, stats: LoopStats):
        self.backend, self.stats = backend, stats

    def run(self, graph: str, feeds: dict) -> dict:
        started = time.perf_counter()
        out = self.backend.run(graph, feeds)
        self.backend.synchronize()
        self.stats.add_time(graph, time.perf_counter() - started)
        return out


Chunk = tuple[np.ndarray, object, list[Failed]]  # video indices, their videos (backend array or None), bad inputs


class _NotYet:
    def __repr__(self) -> str:
        return "NOT_YET"


NOT_YET = _NotYet()  # a source's "nothing right now, but not exhausted": the loop runs what it has
Source = Callable[[int], "Chunk | _NotYet | None"]  # asked for at most n videos; None when exhausted
RowThresholds = Callable[[np.ndarray], np.ndarray]  # video indices (n,) -> their thresholds (n, K+1)


@dataclass
class _Running:
    """The videos still running, one row each: host-side bookkeeping and device-side states."""

    ids: np.ndarray  # their indices in the caller's order
    slots: np.ndarray  # their rows in the caller's batch, or their slots in the pool of cubes
    steps: np.ndarray  # the cube each runs next (1..K)
    starts: np.ndarray  # (n, K, 3) the policy's plan
    centres: np.ndarray  # (n, K, plan width)
    thresholds: np.ndarray  # (n, K + 1) float32, each video's own
    local_state: object = None  # (n, hidden) on the device
    global_state: object = None

    @classmethod
    def empty(cls, k_max: int, plan_width: int) -> _Running:
        none = np.empty(0, np.int64)
        starts, centres = np.empty((0, k_max, 3), np.int64), np.empty((0, k_max, plan_width), np.float32)
        return cls(none, none, none, starts, centres, np.empty((0, k_max + 1), np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def join(self, arrays, ids, slots, starts, centres, thresholds, global_state) -> None:
        self.ids = np.concatenate([self.ids, ids])
        self.slots = np.concatenate([self.slots, slots])
        self.steps = np.concatenate([self.steps, np.ones(len(ids), np.int64)])
        self.starts = np.concatenate([self.starts, starts])
        self.centres = np.concatenate([self.centres, centres])
        self.thresholds = np.concatenate([self.thresholds, thresholds])
        local_state = arrays.zeros(len(ids), int(global_state.shape[1]))  # no cube seen yet
        if self.global_state is None:
            self.local_state, self.global_state = local_state, global_state
        else:
            self.local_state = arrays.concat([self.local_state, local_state])
            self.global_state = arrays.concat([self.global_state, global_state])

    def keep(self, arrays, rows: np.ndarray | None, next_local_state) -> None:
        """Compaction: only `rows` go on (all of them when rows is None), one step further."""
        if rows is not None:
            self.ids, self.slots, self.steps = self.ids[rows], self.slots[rows], self.steps[rows]
            self.starts, self.centres, self.thresholds = self.starts[rows], self.centres[rows], self.thresholds[rows]
            next_local_state = arrays.take(next_local_state, rows)
            self.global_state = arrays.take(self.global_state, rows)
        self.local_state = next_local_state
        self.steps = self.steps + 1


CROP_ROWS = 16  # streaming mode cuts the cubes of a few arrivals in one call of at least this many rows


def refill_size(capacity: int) -> int:
    """Streaming mode refills the pool whenever this many of its `capacity` slots are free."""
    return max(1, capacity // 4)


def cube_loop(
    backend: Backend,
    source: Source,
    *,
    thresholds: np.ndarray,
    max_cubes: int,
    capacity: int | None,
    cube_shape: tuple[int, ...],
    stats: LoopStats,
    timer: StageTimer | None = None,
    row_thresholds: RowThresholds | None = None,
) -> Iterator[Finished | Failed]:
    """Run videos from `source` to their exits. capacity None = per-batch mode (one chunk, no copy).
    cube_shape: one cube, (T', 3, h', w'). Each video exits by `row_thresholds(its index)` when
    given, else by `thresholds`; both K+1 entropies, compared as float32 like the reference."""
    default = np.asarray(thresholds, dtype=np.float32)

    def thresholds_of(ids: np.ndarray) -> np.ndarray:
        if row_thresholds is None:
            return np.broadcast_to(default, (len(ids), len(default)))
        return _checked_rows(row_thresholds(ids), ids, len(default))

    run = backend.run if timer is None else timer.run
    arrays = backend.arrays
    # streaming: slot s holds cubes s*K .. s*K+K-1 (flat, so that one take gathers a turn's cubes)
    cubes = arrays.empty_pool(capacity * max_cubes, cube_shape) if capacity else None
    batch = None  # per-batch mode: the caller's videos, which the turns crop from
    free = list(range(capacity or 0))
    refill_at = refill_size(capacity or 1)
    centres = next(t for t in backend.specs["policy"].outputs if t.name == "centres")
    running = _Running.empty(max_cubes, int(centres.shape[-1]))  # floats per step of the plan
    boxes = "boxes" in backend.inputs["crop"]  # a resampling crop (Uni-AdaFocus) takes each row's box
    exhausted = False

    while True:
        if not exhausted and (len(running) == 0 or (capacity and len(free) >= refill_at)):
            chunk = source(len(free) if capacity else 0)
            if chunk is None:
                exhausted = True
            elif chunk is not NOT_YET:
                new_ids, videos, failed = chunk
                yield from failed
                if len(new_ids):
                    if capacity:
                        slots = np.asarray(free[: len(new_ids)], np.int64)
                        del free[: len(new_ids)]
                    else:
                        batch, slots = videos, np.arange(len(new_ids))
                    row_thr = thresholds_of(new_ids)
                    yield from _admit(
                        run,
                        arrays,
                        videos,
                        new_ids,
                        slots,
                        row_thr,
                        running,
                        free,
                        cubes,
                        stats,
                        boxes,
                        backend.max_batch,
                    )
        if len(running) == 0:
            stats.in_pool = 0
            if exhausted:
                return
            continue
        yield from _cube_step(run, arrays, batch, cubes, max_cubes, running, free, stats, boxes)


def _checked_rows(given, ids: np.ndarray, exits: int) -> np.ndarray:
    """`row_thresholds`' answer for videos `ids` as (n, exits) float32, or one clear error: a NaN
    threshold would compare False with every entropy, so its video would exit at step 0 unnoticed."""
    try:
        rows = np.asarray(given, dtype=np.float32)
    except (TypeError, ValueError):  # rows of different lengths, or not numbers
        rows = None
    if rows is None or rows.shape != (len(ids), exits):
        raise AdaFocusError(
            f"row_thresholds gave thresholds of shape {'ragged' if rows is None else rows.shape} "
            f"for {len(ids)} video{'s' if len(ids) > 1 else ''} from video {int(ids[0])}",
            f"return one row of {exits} thresholds per video asked for: shape ({len(ids)}, {exits})",
        )
    bad = np.isnan(rows).any(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise AdaFocusError(
            f"row_thresholds gave video {int(ids[first])} the thresholds {rows[first].tolist()}, with NaN",
            f"give each video {exits} numbers: +inf always exits at that step, -inf never does "
            "(use -inf, not None or NaN)",
        )
    return rows


def _admit(
    run, arrays, videos, ids, slots, thresholds, running: _Running, free: list, cubes, stats, boxes, max_rows=None
) -> Iterator[Finished]:
    """Glance at newly admitted videos: the confident ones leave at step 0, the policy plans the
    others' cubes (cut into their slots of `cubes` when there is a pool of cubes) and they join the
    running set."""
    glance = run("glance", {"videos": videos})
    go_on = arrays.to_host(glance["entropy"]) > thresholds[:, 0]
    k_max = running.starts.shape[1]
    no_centres, no_starts = np.zeros((len(ids), *running.centres.shape[1:])), np.zeros((len(ids), k_max, 3))
    at_glance = np.zeros(len(ids), np.int64)
    yield from _leave(arrays, glance["logits"], np.flatnonzero(~go_on), ids, at_glance, no_centres, no_starts, stats)
    free.extend(slots[~go_on].tolist())
    rows = np.flatnonzero(go_on)
    if len(rows):
        plan = run("policy", {"maps": arrays.take(glance["maps"], rows)})
        starts, centres = arrays.to_host(plan["cube_starts"]), arrays.to_host(plan["centres"])
        if cubes is not None:
            # All K cubes of every admitted video, video-major like the pool (slot s holds s*K .. s*K+K-1),
            # in calls of as many rows as videos were admitted (so no call outputs more than a batch of
            # cubes, as when cut step by step) but at least CROP_ROWS (a few arrivals: one call, not K),
            # and never past the engines' largest batch.
            flat_rows = np.repeat(rows, k_max)
            flat_slots = (slots[rows][:, None] * k_max + np.arange(k_max)).reshape(-1)
            flat_starts, flat_centres = starts.reshape(-1, 3), centres.reshape(-1, centres.shape[-1])
            step = min(max_rows or len(flat_rows), max(len(rows), CROP_ROWS))
            for at in range(0, len(flat_rows), step):
                part = slice(at, at + step)
                feeds = {"pool": videos, "rows": arrays.from_host(flat_rows[part])}
                feeds["starts"] = arrays.from_host(np.ascontiguousarray(flat_starts[part]))
                if boxes:
                    feeds["boxes"] = arrays.from_host(np.ascontiguousarray(flat_centres[part]))
                arrays.put(cubes, flat_slots[part], run("crop", feeds)["cubes"])
        running.join(
            arrays,
            ids[rows],
            slots[rows],
            starts,
            centres,
            thresholds[rows],
            arrays.take(glance["global_state"], rows),
        )


def _cube_step(
    run, arrays, batch, cubes, k_max: int, running: _Running, free: list, stats, boxes: bool
) -> Iterator[Finished]:
    """One cube for every running video, whatever its step (cut from `batch`, or taken from the
    pool of `cubes` cut at admission); those that are done leave."""
    if cubes is None:
        this_step = (np.arange(len(running)), running.steps - 1)
        step_starts = running.starts[this_step]
        feeds = {"pool": batch, "rows": arrays.from_host(running.slots), "starts": arrays.from_host(step_starts)}
        if boxes:
            feeds["boxes"] = arrays.from_host(np.ascontiguousarray(running.centres[this_step]))
        step_cubes = run("crop", feeds)["cubes"]
    else:
        step_cubes = arrays.take(cubes, running.slots * k_max + running.steps - 1)
    features = run("local", {"cubes": step_cubes})["features"]
    out = run(
        "classifier",
        {
            "features": features,
            "local_state": running.local_state,
            "global_state": running.global_state,
            "step": arrays.from_host(running.steps),
        },
    )
    r = running
    stats.turns += 1
    stats.mixed_threshold_turns += bool((r.thresholds != r.thresholds[0]).any())
    done = (arrays.to_host(out["entropy"]) <= r.thresholds[np.arange(len(r)), r.steps]) | (r.steps == k_max)
    leaving = np.flatnonzero(done)
    yield from _leave(arrays, out["logits"], leaving, r.ids, r.steps, r.centres, r.starts, stats)
    free.extend(running.slots[done].tolist())
    running.keep(arrays, np.flatnonzero(~done) if len(leaving) else None, out["next_local_state"])
    stats.in_pool = len(running)


def _leave(arrays, logits, rows, ids, steps, centres, starts, stats) -> Iterator[Finished]:
    """Videos leaving after cube `steps[row]` (0 = at the glance), with the cubes they used."""
    if len(rows) == 0:
        return
    k_max = centres.shape[1]
    host_logits = arrays.to_host(arrays.take(logits, rows))
    for row, video_logits in zip(rows, host_logits):
        used = int(steps[row])
        stats.exits[used] += 1
        stats.videos += 1
        used_centres = np.full(centres.shape[1:], np.nan, np.float32)
        used_starts = np.full((k_max, 3), -1, np.int64)
        used_centres[:used], used_starts[:used] = centres[row, :used], starts[row, :used]
        yield Finished(int(ids[row]), video_logits, used, used_centres, used_starts)
