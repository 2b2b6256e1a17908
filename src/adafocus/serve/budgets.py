"""Which exit thresholds a served video gets: its request's budget, the server's, or the export's, and
how far a latency target may lower that.

A budget (GFLOPs per video) resolves like `Runtime.set_budget`: the most accurate calibrated entry of
the export costing no more (`runtime.budget_entry`). Those entries form an accuracy-GFLOPs front;
the latency target moves along it (`LatencyTarget`), and may only ever lower what a request asked
for: a request's point is the one `budget_entry` gives for min(its budget, the cap in force).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from adafocus.errors import AdaFocusError
from adafocus.export.manifest import Export
from adafocus.runtime.runtime import budget_entry


@dataclass(frozen=True, eq=False)  # compared by identity: each is one calibrated entry
class OperatingPoint:
    """Exit thresholds and what calibration measured of them: `gflops` per video on average (NaN
    when the thresholds are not a calibrated entry) and `accuracy` (None then)."""

    thresholds: np.ndarray  # (K+1,) float64
    gflops: float
    accuracy: float | None


def _point(entry: dict) -> OperatingPoint:
    return OperatingPoint(np.asarray(entry["thresholds"], np.float64), float(entry["gflops"]), float(entry["accuracy"]))


class Budgets:
    """The export's calibrated front and the default point of a server (`budget`, GFLOPs per video:
    the server's own budget; None: the export's thresholds, `default_thresholds`)."""

    def __init__(self, export: Export, default_thresholds, budget: float | None = None):
        self.export = export
        entries = export.budgets
        self._by_entry: dict[int, OperatingPoint] = {id(e): _point(e) for e in entries}
        # the front: each distinct entry budget_entry picks, cheapest first (accuracy, or mAP: budget_metric, rises)
        picked = {id(budget_entry(export, e["gflops"])): e for e in entries} if entries else {}
        self.front = sorted((self._by_entry[key] for key in picked), key=lambda p: p.gflops)
        if budget is not None:
            self.default = self.resolve(budget)
        else:
            thresholds = np.asarray(default_thresholds, np.float64)
            same = [p for p in self._by_entry.values() if np.array_equal(p.thresholds, thresholds)]
            self.default = same[0] if same else OperatingPoint(thresholds, math.nan, None)

    @property
    def calibrated(self) -> bool:
        return bool(self.front)

    @property
    def cheapest(self) -> OperatingPoint:
        return self.front[0]

    def resolve(self, budget: float | None) -> OperatingPoint:
        """A request's point: `budget` GFLOPs per video through the calibrated entries (an error with
        the fix when none is that cheap, or the export has none), or the default for None."""
        if budget is None:
            return self.default
        if not math.isfinite(budget) or budget <= 0:
            raise AdaFocusError(f"budget_gflops {budget} is not a positive number", "send GFLOPs per video, e.g. 0.08")
        return self._by_entry[id(budget_entry(self.export, budget))]

    def capped(self, point: OperatingPoint, cap: float | None) -> OperatingPoint:
        """`point`, or the cheaper front point a cap of `cap` GFLOPs gives (never a dearer one)."""
        if cap is None or not self.front or (math.isfinite(point.gflops) and point.gflops <= cap):
            return point
        return self._by_entry[id(budget_entry(self.export, max(cap, self.cheapest.gflops)))]


HIGH = 0.55  # LatencyTarget steps the cap down when the tail of recent latencies passes this x target


def queue_limit_s(target_s: float, high: float = HIGH) -> float:
    """How long a request may wait in the serving loop's queue before a latency target steps down
    (or, at its cheapest point, refuses): half of the tail latency it steers to (the rest is for the
    request's turn in the pool)."""
    return high * target_s / 2


class LatencyTarget:
    """Holds a latency target by spending less: a cap on the GFLOPs of newly admitted videos, moved
    along the calibrated front by the latencies the server sees, and a refusal when a new request
    could not make the target at all.

    The cap follows the tail of recent latencies (submitted to answered, the last WINDOW requests
    admitted under the cap in force: those admitted before a step say nothing of what it did):
    above `high` x target it steps down the front, the further above the larger the step; when the
    tail, grown by the cost ratio of the next dearer point, stays below `low` x target, it steps back
    up, by half as many points as the same ratio would step it down (one point at a time, below a
    fixed 0.3 x target, kept a light load at a cheap point for good after a burst: at the default
    target, 4x the unloaded p50, the unloaded p90 alone is ~0.4x). After a step it waits for
    STEP_AFTER answers admitted under the new cap before it judges again, so that it reacts to what
    it did, not to the queue it found. A queue whose oldest request has waited
    `queue_limit_s` steps down at once, once: not again for requests that were already waiting.
    The refusal is Little's law on measured figures: a request behind `ahead` queued and running
    videos waits about ahead / (the recent answers per busy second: the rate the server can answer at
    now, not the rate requests happen to arrive at), plus the `floor` an unloaded video spends in the
    pool; once the cap is at the cheapest point, a request predicted past `high` x target, or
    arriving behind a queue already half that old, is refused (overloaded), unless nothing is ahead
    of it: an idle server always takes a request, so a burst cannot lock it out. Medians and percentiles over recent
    measurements, so a cold first call or a stall elsewhere on the machine does not steer it.
    """

    WINDOW = 32
    STEP_AFTER = 8

    def __init__(self, front: list[OperatingPoint], target_s: float, *, high: float = HIGH, low: float = 0.45):
        if not front:
            raise AdaFocusError(
                "a latency target needs a calibrated export (its accuracy-GFLOPs front)",
                "run adafocus-calibrate on the export, or serve without --latency-slo-ms",
            )
        if target_s <= 0:
            raise AdaFocusError(f"latency target {target_s * 1000:g} ms is not positive", "give milliseconds > 0")
        self.front, self.target_s, self.high, self.low = front, target_s, high, low
        self.level = len(front) - 1  # the front point in force: no cap at first
        self._latencies: deque[float] = deque(maxlen=self.WINDOW)  # of requests admitted under this cap
        self._answers: deque[tuple[float, float]] = deque(maxlen=4 * self.WINDOW)  # (when, loop's idle s)
        self._floors: deque[float] = deque(maxlen=self.WINDOW)
        self.steps = 0  # how often the cap moved
        self._stepped_at = -math.inf  # when it moved (time.perf_counter())

    @property
    def floor_s(self) -> float:
        return statistics.median(self._floors) if self._floors else 0.0

    def unloaded(self, seconds: float) -> None:
        """The time in the pool of a video admitted when nothing else was queued or running."""
        self._floors.append(seconds)

    def answered(self, latency_s: float, now: float, idle_s: float, *, cap_steps: int) -> None:
        """A request was answered `latency_s` after it was submitted, at `now`, when the loop had been
        idle `idle_s` seconds in all; `cap_steps`: `steps` when it was admitted. Its latency is judged
        only if it was admitted under the cap in force; every answer counts toward the answer rate."""
        if cap_steps == self.steps:
            self._latencies.append(latency_s)
        self._answers.append((now, idle_s))

    def answer_rate(self) -> float | None:
        """Answers per busy second lately: what the server can answer at the current budgets."""
        if len(self._answers) < 2:
            return None
        (first, idle_first), (last, idle_last) = self._answers[0], self._answers[-1]
        busy = (last - first) - (idle_last - idle_first)
        return (len(self._answers) - 1) / busy if busy > 0 else None

    def cap(self, waited_s: float = 0.0, now: float | None = None) -> float:
        """GFLOPs per video for the videos admitted now; `waited_s`: how long the oldest request still
        queued has waited (a queue older than `queue_limit_s`, that built up since the latest move,
        steps down at once); `now`: time.perf_counter() unless given."""
        now = time.perf_counter() if now is None else now
        stale = waited_s > queue_limit_s(self.target_s, self.high)
        if stale and self.level > 0 and now - waited_s >= self._stepped_at:
            self._step(-1, now)
        elif len(self._latencies) >= self.STEP_AFTER:
            tail = float(np.percentile(self._latencies, 90))
            if tail > self.high * self.target_s and self.level > 0:
                jump = max(1, round(len(self.front) * math.log2(tail / (self.high * self.target_s)) / 4))
                self._step(-jump, now)
            elif self.level < len(self.front) - 1:
                dearer = self.front[self.level + 1].gflops / self.front[self.level].gflops
                room = self.low * self.target_s / max(tail * dearer, 1e-9)
                if room > 1:  # up half as fast as down: a light load finds its way back in seconds
                    self._step(max(1, round(len(self.front) * math.log2(room) / 8)), now)
        return self.front[self.level].gflops

    def _step(self, by: int, now: float) -> None:
        self.level = min(max(self.level + by, 0), len(self.front) - 1)
        self.steps += 1
        self._latencies.clear()  # judge the new cap by what it does, not by what came before it
        self._stepped_at = now

    def predicted_s(self, ahead: int) -> float:
        """The latency of a request arriving behind `ahead` queued and running videos."""
        rate = self.answer_rate()
        return self.floor_s + (ahead / rate if rate else 0.0)

    def accepts(self, ahead: int, waited_s: float = 0.0) -> bool:
        """Whether a request arriving behind `ahead` videos, the oldest of those still queued having
        waited `waited_s`, can still make the target: always while a cheaper point is left to move to,
        or with nothing ahead."""
        if self.level > 0 or ahead == 0:
            return True
        fresh = waited_s <= queue_limit_s(self.target_s, self.high)
        return fresh and self.predicted_s(ahead) <= self.high * self.target_s


def _average(old: float | None, new: float, weight: float = 0.2) -> float:
    return new if old is None else (1 - weight) * old + weight * new
