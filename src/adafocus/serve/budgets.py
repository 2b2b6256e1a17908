"""Which exit thresholds a served video gets: its request's budget, the server's, or the export's, and
how far a latency target may lower that.

A budget (GFLOPs per video) resolves like `Runtime.set_budget`: the most accurate calibrated entry of
the export costing no more (`runtime.budget_entry`). Those entries form an accuracy-GFLOPs front;
the latency target moves along it (`LatencyTarget`), and may only ever lower what a request asked
for: a request's point is the one `budget_entry` gives for min(its budget, the cap in force).
"""

from __future__ import annotations

import math
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
        # the front: each distinct entry budget_entry picks, cheapest first (accuracy rises along it)
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


class LatencyTarget:
    """Holds a latency target by spending less: a cap on the GFLOPs of newly admitted videos, and
    whether a new request can be accepted at all.

    By Little's law a request that arrives behind `queued` waiting and `in_pool` running videos is
    answered after about (queued + in_pool + 1) x g x seconds_per_gflop, at a front point costing g
    GFLOPs per video, plus the `floor` an unloaded video takes anyway (its glance and cube steps one
    after another). `seconds_per_gflop` is measured: the loop's busy time over the calibrated cost of
    what it answered (a moving average); the floor is the moving average of the time in the pool of
    videos admitted into an empty loop. The cap is the dearest front point whose prediction stays
    within `headroom` of the target, recomputed at every admission; past the cheapest point, new
    requests are refused (overloaded) rather than queued into a certain miss. An idle server always
    accepts: its prediction is the floor alone, so a burst cannot lock it out.
    """

    def __init__(self, front: list[OperatingPoint], target_s: float, *, headroom: float = 0.6):
        if not front:
            raise AdaFocusError(
                "a latency target needs a calibrated export (its accuracy-GFLOPs front)",
                "run adafocus-calibrate on the export, or serve without --latency-slo-ms",
            )
        if target_s <= 0:
            raise AdaFocusError(f"latency target {target_s * 1000:g} ms is not positive", "give milliseconds > 0")
        self.front, self.target_s, self.headroom = front, target_s, headroom
        self.seconds_per_gflop: float | None = None
        self.floor_s = 0.0

    def measured(self, busy_s: float, answered_gflops: float) -> None:
        """`busy_s` seconds of the loop's work answered videos whose points cost `answered_gflops`."""
        if answered_gflops > 0 and busy_s > 0:
            self.seconds_per_gflop = _average(self.seconds_per_gflop, busy_s / answered_gflops)

    def unloaded(self, seconds: float) -> None:
        """The time in the pool of a video admitted when nothing else was queued or running."""
        self.floor_s = _average(self.floor_s or None, seconds, weight=0.1)

    def predicted_s(self, ahead: int, gflops: float) -> float:
        """The latency of a request with `ahead` videos before it, all at a point of `gflops`."""
        if self.seconds_per_gflop is None:
            return self.floor_s
        return (ahead + 1) * gflops * self.seconds_per_gflop + self.floor_s

    def cap(self, ahead: int) -> float:
        """GFLOPs per video for the videos admitted now, with `ahead` videos queued or running."""
        for point in reversed(self.front):
            if self.predicted_s(ahead, point.gflops) <= self.headroom * self.target_s:
                return point.gflops
        return self.front[0].gflops

    def accepts(self, ahead: int) -> bool:
        """Whether a request arriving behind `ahead` videos can still make the target at the
        cheapest point."""
        return self.predicted_s(ahead, self.front[0].gflops) <= self.target_s


def _average(old: float | None, new: float, weight: float = 0.2) -> float:
    return new if old is None else (1 - weight) * old + weight * new
