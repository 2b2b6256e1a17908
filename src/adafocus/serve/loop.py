"""The serving loop: the runtime's one cube loop facing a stream of independent requests.

    loop = ServingLoop(Runtime.load(export_dir), batch_size=32, latency_slo_ms=200)
    future = loop.submit(video, budget_gflops=0.06)   # (T, 3, S, S) float32; returns at once
    served = future.result()                          # Served: the VideoResult, budget, timings
    loop.close()                                      # answers everything accepted, then stops

One thread owns the `Runtime` and runs `Runtime.stream` over the admission queue, and each video is
answered the moment it exits, whatever its neighbours still need. Between turns, whenever a quarter
of its pool is free, the loop asks the queue for videos: an idle loop takes what is waiting at once
(`max_queue_delay_ms`: after giving others that long to join), a busy one takes them once the oldest
has waited `admit_wait_ms` (0: at the next turn; inf: only when the pool has drained). When nothing
is to be admitted the queue says `NOT_YET` and the pool runs on with what it has; with nothing queued
and nothing running the thread sleeps until a request arrives. Admission closes once the videos it
took are admitted (`_thresholds_of`): the next refill asks again whether the pool has drained or the
oldest has waited long enough, so a busy pool never takes arrivals sooner than that.

Why a busy pool may hold arrivals back: on a CPU a graph call costs about the same per row whatever
the batch, so a video admitted into a running pool adds its glance (the dearest graph of the demo,
1.1 ms a video) to the turns of every video already running. Measured in one process (demo, 2
threads, Poisson arrivals at 100-280 requests/s): admitting at every turn had a 1.1-1.4x higher
mean latency than a worker running each queued group to the end, admitting when drained was level
with it (benchmarks/serve_load.py measures both through Triton).

Each video is checked (shape, dtype, NaN/inf) as it is submitted, in the submitter's thread, not by
the loop. Each request carries its operating point (`serve.budgets`): its own budget, else the
server's, else the export's thresholds; with a latency target (`serve.budgets.LatencyTarget`) the
point of a video is lowered at admission to the cap the recent latencies call for. Requests are
refused at once, with `Overloaded` (retryable), when the queue is full (`max_queue`) or when even the
cheapest point cannot make the target; with a clear error for a bad video or budget; with
`Unavailable` once the loop is closing (`check_room()` asks that for the load alone, so that a server
refuses before it decodes a file; `hold=True` counts a file being decoded toward the queue until it
is submitted). Every accepted request gets exactly one answer: a result, or an exception on its
future. When the engine fails, the requests the failed `Runtime.stream` held get an `InternalError`
and a new stream serves the rest: one fault does not stop a model that Triton still reports ready.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from adafocus.errors import AdaFocusError, InternalError, error_text
from adafocus.model.checks import check_video
from adafocus.runtime import Runtime, VideoResult
from adafocus.runtime.loop import NOT_YET
from adafocus.serve.budgets import Budgets, LatencyTarget, OperatingPoint


class Overloaded(AdaFocusError):
    """Refused for now: the queue is full or the latency target cannot be met. Retry later."""


class Unavailable(AdaFocusError):
    """Refused: the loop is shutting down or has stopped."""


@dataclass
class Served:
    """One answered request: the runtime's result (or its `error`), the calibrated cost of the
    operating point it got (`budget_gflops`, NaN for thresholds outside the calibrated front), and
    seconds spent queued and in the pool."""

    result: VideoResult
    budget_gflops: float
    queued_s: float
    in_pool_s: float


@dataclass
class _Request:
    video: np.ndarray
    point: OperatingPoint
    future: Future
    submitted: float  # when the request was received (latency counts from then)
    queued: float  # when it entered the queue: its age there is what admission and the target judge
    admitted: float = 0.0
    unloaded: bool = False  # admitted when nothing else was queued or running
    cap_steps: int = 0  # with a latency target: how many steps its cap had taken when this was admitted


@dataclass
class LoopCounters:
    """What the loop has done, for metrics: monotonic counters and the state right now."""

    answered: int = 0
    failed: int = 0  # answered with an error (a bad video, or the engine failed while holding it)
    refused: dict[str, int] = field(default_factory=lambda: {"overloaded": 0, "bad_request": 0, "unavailable": 0})
    gflops_served: float = 0.0  # the exit costs of the videos answered
    queued: int = 0  # waiting for the pool, files being decoded included
    in_pool: int = 0
    budget_in_force: float = math.nan  # GFLOPs per video of the default point after the latency cap
    exits: list[int] = field(default_factory=list)
    turns: int = 0  # cube steps the loop ran
    mixed_budget_turns: int = 0  # of those, steps whose videos did not all exit by the same thresholds


class ServingLoop:
    def __init__(
        self,
        runtime: Runtime,
        *,
        batch_size: int = 32,
        budget: float | None = None,
        latency_slo_ms: float | None = None,
        max_queue: int = 1024,
        max_queue_delay_ms: float = 0.0,
        admit_wait_ms: float = 0.0,
    ):
        if batch_size < 1 or max_queue < 1 or max_queue_delay_ms < 0 or admit_wait_ms < 0:
            raise AdaFocusError(
                f"batch_size {batch_size}, max_queue {max_queue}, max_queue_delay_ms {max_queue_delay_ms}, "
                f"admit_wait_ms {admit_wait_ms}",
                "batch_size and max_queue must be >= 1, the delays >= 0 (admit_wait_ms may be inf)",
            )
        self.runtime = runtime
        self.batch_size = batch_size
        self.max_queue = max_queue
        self.max_queue_delay_s = max_queue_delay_ms / 1000
        self.admit_wait_s = admit_wait_ms / 1000
        self.budgets = Budgets(runtime.export, runtime.thresholds, budget)
        self.target = None if latency_slo_ms is None else LatencyTarget(self.budgets.front, latency_slo_ms / 1000)
        self._cap: float | None = None
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._admitted: dict[int, _Request] = {}  # stream index -> request, until answered
        self._next_index = 0  # the stream index of the next admitted video (each stream counts from 0)
        self._admitting = False  # admission is open: take what is queued, up to the room asked for
        self._held = 0  # requests counted toward the queue before they are submitted (files being decoded)
        self._idle_s = 0.0  # seconds the loop slept with nothing to do, in all
        self._closing = False
        self._stopped: BaseException | None = None
        self._counters = LoopCounters(exits=[0] * runtime.preset.num_exits)
        self._thread = threading.Thread(target=self._serve, name="adafocus-serving-loop", daemon=True)
        self._thread.start()

    # the callers' side ---------------------------------------------------------------------------
    def submit(
        self,
        video,
        *,
        budget_gflops: float | None = None,
        on_done: Callable[[Future], None] | None = None,
        name: str = "video",
        received: float | None = None,
        held: bool = False,
    ) -> Future:
        """Queue one video (T, 3, S, S) float32, normalised; returns a Future of `Served`. Raises at
        once, before any work: AdaFocusError for a bad video (called `name` in the message) or budget,
        Overloaded, Unavailable. `received`: when the request arrived (`time.perf_counter()`), if before
        now (a server that decoded or converted it first): its latency counts from then, its age in
        the queue from now. `held`: its room was taken by `check_room(hold=True)`, and is used now
        (the load is not checked again: the request counted toward it all along)."""
        now = time.perf_counter()
        try:
            video = np.asarray(video)
            check_video(video, self.runtime.preset, name)  # here, in the submitter's thread
            point = self.budgets.resolve(budget_gflops)
        except AdaFocusError:
            self.count_refused("bad_request", release=held)
            raise
        future: Future = Future()
        if on_done is not None:
            future.add_done_callback(on_done)
        with self._cond:
            self._held -= held
            self._refuse_if_full(load=not held)
            self._queue.append(_Request(video, point, future, now if received is None else received, now))
            self._cond.notify()
        return future

    def check_room(self, *, hold: bool = False) -> None:
        """Raises what `submit` would raise now for the load alone (Overloaded, Unavailable; counted),
        so that a server refuses a request before it decodes or converts its video. `submit` checks
        again: the load may change in between. `hold`: a request with room counts toward the queue
        from now (max_queue, the queue length, what a latency target sees ahead) until it is
        submitted with `held=True` or given up with `release()`: a file being decoded."""
        with self._cond:
            self._refuse_if_full()
            self._held += hold

    def release(self) -> None:
        """Give up the room `check_room(hold=True)` took (the request was refused or failed)."""
        with self._cond:
            self._held -= 1

    def _queue_age(self, now: float) -> float:
        """How long the oldest queued request has been in the queue (0 when none is). Called holding
        the lock. From when it was queued, not received: a file's decoding is no queue."""
        return now - self._queue[0].queued if self._queue else 0.0

    def _refuse_if_full(self, load: bool = True) -> None:
        """Called holding the lock. `load`: check the queue and the latency target too."""
        if self._closing or self._stopped is not None:
            self._counters.refused["unavailable"] += 1
            why = "shutting down" if self._stopped is None else f"stopped ({self._stopped})"
            raise Unavailable(f"the serving loop is {why}", "send the request to another replica")
        if not load:
            return
        queued = len(self._queue) + self._held
        if queued >= self.max_queue:
            self._counters.refused["overloaded"] += 1
            raise Overloaded(f"overloaded: {queued} requests are queued (max_queue)", "retry later")
        ahead = queued + len(self._admitted)
        waited = self._queue_age(time.perf_counter())
        if self.target is not None and not self.target.accepts(ahead, waited):
            self._counters.refused["overloaded"] += 1
            raise Overloaded(
                f"overloaded: {queued} queued requests would keep this one past the "
                f"{self.target.target_s * 1000:g} ms latency target even at the cheapest budget",
                "retry later",
            )

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, answer every accepted one, stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise InternalError(f"the serving loop did not finish within {timeout} s")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def counters(self) -> LoopCounters:
        """A copy of the counters, with the queue, the pool and the budget in force as they are now."""
        with self._cond:
            c = self._counters
            budget = self.budgets.capped(self.budgets.default, self._cap).gflops
            return LoopCounters(
                c.answered,
                c.failed,
                dict(c.refused),
                c.gflops_served,
                len(self._queue) + self._held,
                self.runtime.stats.in_pool,
                budget,
                list(self.runtime.stats.exits),
                self.runtime.stats.turns,
                self.runtime.stats.mixed_threshold_turns,
            )

    def count_refused(self, why: str, *, release: bool = False) -> None:
        """Count a refusal (`refused` key) decided outside `submit` and `check_room`, such as a
        server's check of its inputs; `release`: the request's held room is given up too."""
        with self._cond:
            self._counters.refused[why] += 1
            self._held -= release

    # the loop's side -----------------------------------------------------------------------------
    def _serve(self) -> None:
        error: BaseException | None = None
        try:
            while not self._stream_once():
                pass
        except BaseException as e:  # the loop's own failure: answer everyone with it, and stop
            error = e
        with self._cond:
            orphans = list(self._admitted.values()) + list(self._queue)
            if orphans and error is None:
                error = InternalError(f"the serving loop ended with {len(orphans)} requests unanswered")
            self._stopped = error or Unavailable("closed")
            self._admitted.clear()
            self._queue.clear()
        for request in orphans:
            request.future.set_exception(error)

    def _stream_once(self) -> bool:
        """One `Runtime.stream` over the queue; True when it ended (closing, nothing left). When the
        engine fails, the requests this stream held (admitted, not answered) each get an
        InternalError and False is returned: a new stream, with a new pool, serves the queue. A
        failure holding no request is not the engine's (it ran nothing): it is raised."""
        try:
            stream = self.runtime.stream(
                self._arrivals(), self.batch_size, row_thresholds=self._thresholds_of, values_checked=True
            )
            for result in stream:
                self._answer(result)
            return True
        except Exception as e:  # noqa: BLE001 - the requests it held are answered with it below
            with self._cond:
                held = list(self._admitted.values())
                if not held:
                    raise
                self._admitted.clear()
                self._next_index = 0  # the next stream numbers its videos from 0 again
                self._admitting = False
                self._counters.answered += len(held)
                self._counters.failed += len(held)
                self.runtime.stats.in_pool = 0  # the failed stream's pool is gone
            # an InternalError whatever was raised: the engine's fault, not the request's (HTTP 500)
            failure = InternalError(f"the engine failed while serving this request: {error_text(e)}")
            failure.__cause__ = e
            for request in held:
                request.future.set_exception(failure)
            return False

    def _arrivals(self):
        """The queue as streaming mode's input: a request's video, NOT_YET when nothing is waiting but
        videos are running, and the end once closing with nothing left. Blocks only when idle."""
        while True:
            with self._cond:
                if not self._queue and not self._admitted:
                    if self._closing:
                        return
                    self._idle()
                    continue
                # admission opens when the pool has drained or the oldest has waited admit_wait_s; it
                # then takes everything queued up to the room the loop asked for, and closes when
                # that is admitted (_thresholds_of), not at the next refill
                waited = self._queue_age(time.perf_counter())
                self._admitting = self._admitting or not self._admitted or waited >= self.admit_wait_s
                if not self._queue or not self._admitting:
                    request, self._admitting = None, False
                else:
                    request = self._queue.popleft()
                    index, self._next_index = self._next_index, self._next_index + 1
                    self._admitted[index] = request
            yield NOT_YET if request is None else request.video

    def _idle(self) -> None:
        """Nothing to run: account the busy period that ended, sleep until a request arrives (then,
        with max_queue_delay_ms, give others that long to join it). Called holding the lock."""
        started = time.perf_counter()
        while not self._queue and not self._closing:
            self._cond.wait()
        self._idle_s += time.perf_counter() - started
        deadline = time.perf_counter() + self.max_queue_delay_s
        while len(self._queue) < self.batch_size and not self._closing and (left := deadline - time.perf_counter()) > 0:
            self._cond.wait(left)

    def _thresholds_of(self, indices: np.ndarray) -> np.ndarray:
        """Each admitted video's thresholds: its point, lowered as far as the latency target needs."""
        now = time.perf_counter()
        with self._cond:
            self._admitting = False  # this admission is done: the next one waits its turn again
            if self.target is not None:
                self._cap = self.target.cap(self._queue_age(now), now)
            unloaded = len(self._admitted) == len(indices) == 1 and not self._queue
            requests = [self._admitted[int(i)] for i in indices]
        for request in requests:
            request.point = self.budgets.capped(request.point, self._cap)
            request.admitted, request.unloaded = now, unloaded
            request.cap_steps = self.target.steps if self.target is not None else 0
        return np.stack([r.point.thresholds for r in requests])

    def _answer(self, result: VideoResult) -> None:
        now = time.perf_counter()
        with self._cond:
            request = self._admitted.pop(result.index)
            c = self._counters
            c.answered += 1
            if result.error is None:
                c.gflops_served += result.gflops
                if self.target is not None:
                    self.target.answered(now - request.submitted, now, self._idle_s, cap_steps=request.cap_steps)
                    if request.unloaded:
                        self.target.unloaded(now - request.admitted)
            else:
                c.failed += 1
        admitted = request.admitted or now  # a video refused at admission was never given a point
        request.future.set_result(Served(result, request.point.gflops, admitted - request.submitted, now - admitted))
