"""Exit thresholds for a FLOPs budget (paper Eq. 7), solved the MSDNet way: pure numpy, no model.

Inputs, for N calibration videos and exits k = 0..K (exit k = stop after k cubes):

    E     (N, K+1)  entropy of the softmax at each exit (nats)
    C     (N, K+1)  whether the prediction at each exit is right
    cost  (K+1,)    GFLOPs of a video that exits at k (cumulative, from the graphs)

A budget knob p sets exit proportions q_k ∝ p^k (`exit_proportions`); `solve_thresholds` turns them
into entropy thresholds η_k, the exit rule being "stop at the first k < K with entropy <= η_k, else
at K"; `simulate` applies thresholds; `budget_table` sweeps p and keeps the accuracy-vs-GFLOPs front.

Comparisons are made in float32, as the runtime and the PyTorch reference make them (their entropies
are float32 and they cast thresholds to float32), and every finite threshold is a float32 value, so
the solver, `simulate` and the deployed loop agree on which side of a threshold a value lies.

JSON has no infinities. In tables and manifests a threshold of +inf ("always exit here") is written
as ALWAYS = 1e9 and -inf ("never exit here") as NEVER = -1e9. Entropies lie in [0, log(classes)], so
the sentinels act exactly like the infinities wherever they are used, and `Runtime.set_thresholds`
takes them as they are. (Runtime also reads None as -inf, but the manifest schema wants numbers in
`budgets[*].thresholds`, so None is not used.) `thresholds_from_json` maps them back to ±inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from adafocus.errors import AdaFocusError

ALWAYS = 1e9  # JSON stand-in for +inf: every video still running exits at this step
NEVER = -1e9  # JSON stand-in for -inf: no video exits at this step
DEFAULT_PS = tuple(np.geomspace(0.01, 100.0, 60).tolist())  # q_0 ≈ 0.99 ... q_K ≈ 0.99 for K >= 1
_QUOTA_EPS = 1e-9  # N·q_k that is an integer up to rounding (47.9999999999) counts as that integer
_COST_EPS = 1e-12  # relative: a mean cost this close above a budget is rounding, and fits it


def exit_proportions(p: float, K: int) -> np.ndarray:
    """q_k ∝ p^k for k = 0..K, normalised to sum 1 (p < 1: most exit early; p > 1: most go on)."""
    if not (p > 0 and math.isfinite(p)):
        raise AdaFocusError(f"the budget knob p must be a positive finite number, got {p!r}")
    if K < 0:
        raise AdaFocusError(f"need K >= 0 cubes, got {K}")
    log_w = np.arange(K + 1) * math.log(p)
    w = np.exp(log_w - log_w.max())  # no overflow for large p or K
    return w / w.sum()


def exit_quotas(n: int, q: Sequence[float]) -> np.ndarray:
    """floor(N·q_k) for k = 0..K-1: how many samples each exit takes before the last (which takes all)."""
    q = np.asarray(q, dtype=np.float64)
    return np.floor(n * q[:-1] + _QUOTA_EPS).astype(np.int64)


def _check_entropies(E: np.ndarray) -> np.ndarray:
    E = np.asarray(E)
    if E.ndim != 2 or E.shape[1] < 1:
        raise AdaFocusError(f"entropies must be (N samples, K+1 exits), got shape {E.shape}")
    if not np.isfinite(E).all():
        raise AdaFocusError("entropies hold NaN or inf values", "compute every exit's entropy for every sample")
    return E.astype(np.float32)


def _midway(lo: np.float32, hi: np.float32) -> float | None:
    """A float32 value strictly between lo < hi, as close to their midpoint as float32 allows; None
    when lo and hi are neighbouring float32 values (nothing lies between them)."""
    mid = np.float32((float(lo) + float(hi)) / 2.0)
    return float(mid) if lo < mid < hi else None


def solve_thresholds(E: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """MSDNet "dynamic evaluation" thresholds (K+1,) for exit proportions q (K+1,).

    For k = 0..K-1: among the samples not yet assigned, sorted by entropy at exit k ascending (most
    confident first), the first m = floor(N·q_k) are assigned to exit k (N = all samples, as in the
    official code). The threshold is placed midway (in float32) between the entropy of the last sample
    taken and the next unassigned one, so no calibration sample sits on a threshold and the rule
    "entropy <= η_k" takes exactly those m. No sample taken: η_k = -inf. All remaining taken: η_k =
    +inf. The last exit takes everyone left: η_K = +inf.

    Ties: when the m-th and (m+1)-th smallest entropies are equal (in float32, or neighbouring float32
    values with nothing between them) no threshold can separate them, and the solver takes FEWER
    samples: only those strictly below the tied group (possibly none, then η_k = -inf). The shortfall
    is not added to any later exit's quota: the untaken samples compete for the later exits' own
    quotas and otherwise end at exit K, so the realised proportions shift towards later exits and the
    realised cost is a little higher than q implies. `simulate` reports what is actually realised.

    Returns float64 values that are all float32-exact, or ±inf (see `thresholds_to_json`).
    """
    E = _check_entropies(E)
    n, exits = E.shape
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (exits,) or (q < 0).any() or not math.isclose(q.sum(), 1.0, rel_tol=1e-9):
        raise AdaFocusError(f"exit proportions must be {exits} non-negative numbers summing to 1, got {q.tolist()}")
    quotas = exit_quotas(n, q)
    thresholds = np.full(exits, math.inf)
    remaining = np.arange(n)
    for k in range(exits - 1):
        values = np.sort(E[remaining, k], kind="stable")
        m = min(int(quotas[k]), len(values))
        if m == len(values) and m > 0:  # every remaining sample exits here
            thresholds[k] = math.inf
            remaining = remaining[:0]
            continue
        threshold = None
        while m > 0:
            m = int(np.searchsorted(values, values[m], side="left"))  # drop a group tied with the next sample
            if m == 0:
                break
            threshold = _midway(values[m - 1], values[m])
            if threshold is not None:
                break
            m -= 1  # neighbouring float32 values: no threshold between them; try one fewer
        if m == 0 or threshold is None:
            thresholds[k] = -math.inf
            continue
        thresholds[k] = threshold
        remaining = remaining[E[remaining, k] > np.float32(threshold)]
    return thresholds


@dataclass
class Outcome:
    """What a set of thresholds does on a set of samples."""

    exit_step: np.ndarray  # (N,) int64 in 0..K
    correct: np.ndarray  # (N,) bool, at the exit step
    video_gflops: np.ndarray  # (N,) cost of each sample
    exit_counts: np.ndarray  # (K+1,)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def gflops(self) -> float:
        """Mean GFLOPs per video."""
        return float(self.video_gflops.mean())

    @property
    def gflops_stderr(self) -> float | None:
        """Standard error of the mean cost (sampling noise of `gflops`); None for a single sample,
        whose spread is unknown (JSON null: a held-out set of one video is legal, it just has none)."""
        n = len(self.video_gflops)
        return float(self.video_gflops.std(ddof=1) / math.sqrt(n)) if n > 1 else None

    @property
    def exit_fractions(self) -> np.ndarray:
        return self.exit_counts / len(self.exit_step)


def exit_steps(E: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """(N,) the first k < K with E[:, k] <= η_k (compared in float32), else K."""
    E = _check_entropies(E)
    thr = np.asarray(thresholds_from_json(thresholds), dtype=np.float64)
    if thr.shape != (E.shape[1],) or np.isnan(thr).any():
        raise AdaFocusError(f"need {E.shape[1]} thresholds (one per exit), got {list(thresholds)!r}")
    K = E.shape[1] - 1
    passes = E[:, :K] <= thr[:K].astype(np.float32)
    return np.where(passes.any(axis=1), passes.argmax(axis=1), K).astype(np.int64)


def simulate(E: np.ndarray, C: np.ndarray, cost: Sequence[float], thresholds: Sequence[float]) -> Outcome:
    """Apply thresholds (±inf or the JSON sentinels) to samples: exit step, accuracy, cost, exit mix."""
    C = np.asarray(C, dtype=bool)
    cost = np.asarray(cost, dtype=np.float64)
    steps = exit_steps(E, thresholds)
    if C.shape != np.shape(E) or cost.shape != (C.shape[1],):
        raise AdaFocusError(f"correct {C.shape} and cost {cost.shape} must match entropies {np.shape(E)}")
    rows = np.arange(len(steps))
    return Outcome(steps, C[rows, steps], cost[steps], np.bincount(steps, minlength=C.shape[1]))


METRICS = ("accuracy", "map")  # what a budget table is chosen by: top-1 accuracy, or mean average precision


def check_metric(name: str) -> str:
    """`name` if it is one of METRICS, else one error naming the choices (before any work)."""
    if name not in METRICS:
        raise AdaFocusError(f"unknown metric {name!r}", f"choose one of {', '.join(METRICS)}")
    return name


def multi_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    """(N, classes) bool targets from (N,) class indices, or (N, classes) multi-hot labels as they are."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        if labels.shape[1] != classes:
            raise AdaFocusError(f"multi-hot labels have {labels.shape[1]} classes, the scores {classes}")
        return labels.astype(bool)
    targets = np.zeros((len(labels), classes), bool)
    targets[np.arange(len(labels)), labels] = True
    return targets


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """mAP of (n, C) scores against (n, C) bool targets, as multi-label sets (ActivityNet, FCVID) are
    scored: per class, the videos ranked by that class's score (highest first; equal scores kept in
    video order), AP = the mean of the precision at each positive's rank; then the mean over the
    classes that have at least one positive among these videos. (The official Uni-AdaFocus code
    averages over every class, counting a class without positives as 0: on a full validation set,
    where every class occurs, the two agree; on a small set theirs is lowered by the absent classes.)"""
    scores, targets = np.asarray(scores), np.asarray(targets, dtype=bool)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise AdaFocusError(f"scores {scores.shape} and targets {targets.shape} must be the same (videos, classes)")
    positives = targets.sum(axis=0)
    present = positives > 0
    if not present.any():
        raise AdaFocusError("no video has a label: mean average precision is undefined", "give labelled videos")
    order = np.argsort(-scores[:, present], axis=0, kind="stable")
    truth = np.take_along_axis(targets[:, present], order, axis=0)
    precision = np.cumsum(truth, axis=0) / np.arange(1, len(scores) + 1)[:, None]
    return float(((precision * truth).sum(axis=0) / positives[present]).mean())


class MeanAveragePrecision:
    """The "map" metric of a set of videos whose exits differ: each video scored by its exit's class
    probabilities (N, K+1, C), all of them ranked together (`mean_average_precision`), as the official
    early-exit evaluation does. Unlike accuracy it is not a mean over videos, so the solvers get it as
    a whole: `metric(steps, rows)` = mAP of videos `rows` (default all) exiting at `steps`."""

    name = "map"

    def __init__(self, scores: np.ndarray, labels: np.ndarray):
        self.scores = np.asarray(scores, dtype=np.float32)
        if self.scores.ndim != 3 or len(self.scores) != len(labels):
            raise AdaFocusError(f"need (N, K+1, classes) scores for N = {len(labels)} videos, got {self.scores.shape}")
        self.targets = multi_hot(labels, self.scores.shape[2])

    def __call__(self, steps: np.ndarray, rows: np.ndarray | None = None) -> float:
        rows = np.arange(len(self.scores)) if rows is None else np.asarray(rows)
        return mean_average_precision(self.scores[rows, np.asarray(steps)], self.targets[rows])

    def per_step(self) -> list[float]:
        """mAP when every video exits at t, t = 0..K."""
        n, exits = self.scores.shape[:2]
        return [self(np.full(n, t)) for t in range(exits)]


def _with_metric(entries: list[dict], E: np.ndarray, metric, rows: np.ndarray | None = None) -> list[dict]:
    """Each entry + metric.name: the metric of its thresholds on videos `rows` (default all)."""
    if metric is None:
        return entries
    chosen = slice(None) if rows is None else rows
    return [e | {metric.name: metric(exit_steps(E[chosen], e["thresholds"]), rows)} for e in entries]


def thresholds_to_json(thresholds: Sequence[float]) -> list[float]:
    """±inf -> ±1e9 (ALWAYS / NEVER); finite values as Python floats."""
    out = []
    for t in thresholds:
        t = float(t)
        if math.isnan(t):
            raise AdaFocusError("a threshold is NaN")
        out.append(ALWAYS if t >= ALWAYS else NEVER if t <= NEVER else t)
    return out


def thresholds_from_json(values: Sequence[float | None]) -> list[float]:
    """The inverse of `thresholds_to_json`: ±1e9 (or beyond) -> ±inf; None -> -inf, as Runtime reads it."""
    out = []
    for v in values:
        v = -math.inf if v is None else float(v)
        out.append(math.inf if v >= ALWAYS else -math.inf if v <= NEVER else v)
    return out


def sweep(
    E: np.ndarray, C: np.ndarray, cost: Sequence[float], ps: Sequence[float]
) -> list[tuple[float, np.ndarray, Outcome]]:
    """(p, thresholds, what they do on these samples) for each budget knob p: the one sweep behind
    the budget table and `thresholds_for_budget`."""
    K = np.shape(E)[1] - 1
    out = []
    for p in ps:
        thresholds = solve_thresholds(E, exit_proportions(float(p), K))
        out.append((float(p), thresholds, simulate(E, C, cost, thresholds)))
    return out


def budget_table(
    E: np.ndarray, C: np.ndarray, cost: Sequence[float], ps: Sequence[float] | None = None, metric=None
) -> list[dict]:
    """Operating points for a sweep of p (default: 60 values log-spaced over 0.01..100, from nearly all
    videos exiting at the glance to nearly all using K cubes).

    Each entry: {"p", "gflops", "accuracy", "thresholds" (JSON form, ±1e9 for ±inf), "exit_fractions"},
    with cost and accuracy realised on these samples. Entries are sorted by gflops and dominated ones
    are dropped: an entry is kept only if it is strictly more accurate than every cheaper one, so the
    table is monotone — more budget never means lower calibration accuracy — and Eq. 7 for a budget B
    is answered by the last entry with gflops <= B.

    `metric` (a `MeanAveragePrecision`): each entry also gets metric.name ("map"), and the front is
    kept by it instead of accuracy.
    """
    E = _check_entropies(E)
    entries = [
        {
            "p": p,
            "gflops": outcome.gflops,
            "accuracy": outcome.accuracy,
            "thresholds": thresholds_to_json(thresholds),
            "exit_fractions": outcome.exit_fractions.tolist(),
        }
        for p, thresholds, outcome in sweep(E, C, cost, DEFAULT_PS if ps is None else ps)
    ]
    return pareto_front(_with_metric(entries, E, metric), key=metric.name if metric else "accuracy")


SOLVERS = ("search", "msdnet")
DEFAULT_LAMBDAS = (0.0, *np.geomspace(1e-3, 30.0, 48).tolist())  # accuracy points per full-cost share
SEARCH_ROUNDS = 4
BUDGET_STEPS = 41  # budgets between the glance's cost and K cubes' at which accuracy is also maximised


def _objective(E, C, cost, thresholds, lam: float) -> float:
    right, spent = _outcomes(E, np.asarray(C, dtype=bool), np.asarray(cost, dtype=np.float64), thresholds)
    return float(right.mean() - lam * spent.mean() / float(cost[-1]))


def _outcomes(E: np.ndarray, C: np.ndarray, cost: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) correctness and cost of each sample under `thresholds`."""
    steps = exit_steps(E, thresholds)
    return C[np.arange(len(steps)), steps].astype(np.float64), cost[steps]


def ascend_thresholds(
    E: np.ndarray,
    C: np.ndarray,
    cost: Sequence[float],
    start: Sequence[float],
    lam: float = 0.0,
    budget: float | None = None,
    rounds: int = SEARCH_ROUNDS,
) -> np.ndarray:
    """Per-step thresholds that maximise mean(correct) − λ·mean(cost)/cost_K on these samples, with
    mean(cost) <= `budget` when one is given, by coordinate ascent from `start` (which must meet the
    budget): each round sets η_0 .. η_{K-1} in turn to its best value with the others fixed. For exit
    k that is exact and cheap: among the samples that reach k, sorted by entropy, exiting the first m
    changes accuracy and cost by prefix sums of (outcome if it exits at k − outcome if it goes on
    under the later thresholds), so every m is scored at once. Thresholds are placed midway (float32)
    between neighbouring samples, as `solve_thresholds` places them (m = 0: −inf, m = all: +inf), so
    the objective never falls, the budget holds, and no sample sits on a threshold."""
    E = _check_entropies(E)
    C = np.asarray(C, dtype=bool)
    cost = np.asarray(cost, dtype=np.float64)
    n, K = E.shape[0], E.shape[1] - 1
    scale = lam / float(cost[-1])
    thresholds = np.asarray(thresholds_from_json(start), dtype=np.float64)
    for _ in range(rounds):
        changed = False
        for k in range(K):
            reach = exit_steps(E, np.r_[thresholds[:k], np.full(K + 1 - k, -np.inf)]) >= k
            rows = np.flatnonzero(reach)
            if len(rows) == 0:
                continue
            later = np.r_[np.full(k + 1, -np.inf), thresholds[k + 1 :]]  # nobody of `rows` exits at <= k
            right, spent = _outcomes(E, C, cost, np.r_[thresholds[:k], later[k:]])  # nobody exits at k
            order = rows[np.argsort(E[rows, k], kind="stable")]
            values = E[order, k]
            accuracy = (right.sum() + np.r_[0.0, np.cumsum(C[order, k] - right[order])]) / n  # first m exit at k
            mean_cost = (spent.sum() + np.r_[0.0, np.cumsum(cost[k] - spent[order])]) / n
            scores = accuracy - scale * mean_cost
            scores[~np.r_[True, values[:-1] < values[1:], True]] = -np.inf  # where no threshold can fall
            if budget is not None:
                scores[mean_cost > budget + 1e-12] = -np.inf
            current = exit_steps(E, thresholds)
            now = C[np.arange(n), current].mean() - scale * cost[current].mean()
            while np.isfinite(scores).any():
                best_m = int(np.argmax(scores))  # the first best: the fewest exits for the same score
                if best_m in (0, len(values)):
                    new = -np.inf if best_m == 0 else np.inf
                    break
                new = _midway(values[best_m - 1], values[best_m])
                if new is not None:
                    break
                scores[best_m] = -np.inf  # neighbouring float32 values: nothing lies between them
            else:
                continue
            if new != thresholds[k] and scores[best_m] > now + 1e-12:
                thresholds = thresholds.copy()
                thresholds[k], changed = new, True
        if not changed:
            break
    thresholds[K] = np.inf
    return thresholds


SHARED_STEPS = 64  # one-η settings (the same threshold at every step) the search also starts from


def shared_thresholds(E: np.ndarray, steps: int = SHARED_STEPS) -> list[np.ndarray]:
    """The same η at every step but the last (the rule `adafocus evaluate` reports), at `steps`
    quantiles of the entropies seen before step K, each placed midway between two of them as the
    solvers place thresholds. Coordinate ascent from MSDNet's settings and the fixed ones can stop
    below this simplest family: on the retrained demo its front stopped at 72.6 % (0.075 GFLOPs),
    under MSDNet's entries from 0.094 on, where one η = 0.8 holds 73.3 % at 0.082 (held-out)."""
    K = E.shape[1] - 1
    values = np.unique(E[:, :K])
    settings = []
    for i in np.unique(np.linspace(1, len(values) - 1, steps).round().astype(int)) if len(values) > 1 else []:
        eta = _midway(values[i - 1], values[i])
        if eta is not None:
            settings.append(np.r_[np.full(K, eta), np.inf])
    return settings


def fixed_cubes_thresholds(t: int, K: int) -> np.ndarray:
    """ "t cubes for every video" as thresholds: nobody exits before t (−inf), everyone at t (+inf)."""
    return np.r_[np.full(t, -np.inf), np.full(K + 1 - t, np.inf)]


MIN_SPLIT = 200  # from this many calibration videos on, the search fits on one half and chooses on the other


def selection_halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The videos `search_table` fits thresholds on and the ones it chooses the front on: every other
    video, so a list sorted by class gives both halves every class."""
    return np.arange(0, n, 2), np.arange(1, n, 2)


def search_table(
    E: np.ndarray,
    C: np.ndarray,
    cost: Sequence[float],
    ps: Sequence[float] | None = None,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    metric=None,
) -> list[dict]:
    """The accuracy-vs-GFLOPs front over a wider family than MSDNet's: for each trade-off λ,
    per-step thresholds optimised for accuracy − λ·cost (`ascend_thresholds`), started from the best
    of the MSDNet solutions, the fixed-number-of-cubes settings, the one-η settings
    (`shared_thresholds`) and the previous λ's answer (these reach the vertices of the front's upper
    hull); then, for budgets between the glance's cost and K cubes', the most accurate thresholds
    costing at most the budget, started from the best entry found so far that fits (the points
    between the vertices). The MSDNet entries, the fixed and the one-η settings are candidates too.

    Thresholds fitted to N videos flatter themselves on those videos: on the demo, searched entries
    lost ~2 points more than the fixed settings from 1000 calibration to 1000 held-out videos, enough
    to push "K cubes for every video" off the front. So from MIN_SPLIT videos on, the candidates are
    fitted on one half (`selection_halves`) and the front is chosen by their accuracy on the other
    half (videos they were not fitted to; the front lies on or above the fixed settings there), and by
    their cost on all the videos (choosing by the other half's cost too would pick entries that
    happened to be cheap there: on the demo they then cost 3 % more on held-out videos, twice the
    drift of costs measured on all). Held-out videos say what of it is real.

    `metric` (a `MeanAveragePrecision`, which is not a mean over videos and so cannot be searched
    per step as accuracy is): the candidates are still searched for accuracy, each also gets
    metric.name ("map", on the choosing half from MIN_SPLIT videos on), and the front is kept by it,
    with the MSDNet entries and the fixed settings among the candidates, as for accuracy."""
    E = _check_entropies(E)
    C = np.asarray(C, dtype=bool)
    key = metric.name if metric else "accuracy"
    if len(E) < MIN_SPLIT:
        return pareto_front(_with_metric(_search_candidates(E, C, cost, ps, lambdas), E, metric), key=key)
    fit, check = selection_halves(len(E))

    def chosen_on_both(entry: dict) -> dict:  # accuracy where not fitted; cost on every video (less noisy)
        outcome = simulate(E, C, cost, entry["thresholds"])
        accuracy = simulate(E[check], C[check], cost, entry["thresholds"]).accuracy
        return entry | {
            "gflops": outcome.gflops,
            "accuracy": accuracy,
            "exit_fractions": outcome.exit_fractions.tolist(),
        }

    candidates = [chosen_on_both(e) for e in _search_candidates(E[fit], C[fit], cost, ps, lambdas)]
    return pareto_front(_with_metric(candidates, E, metric, rows=check), key=key)


def _search_candidates(E, C, cost, ps, lambdas) -> list[dict]:
    K = E.shape[1] - 1
    msdnet = sweep(E, C, cost, DEFAULT_PS if ps is None else ps)
    fixed = [fixed_cubes_thresholds(t, K) for t in range(K + 1)]
    shared = shared_thresholds(E)
    starts = [t for _, t, _ in msdnet] + fixed + shared
    entries = [_entry(E, C, cost, t, "msdnet") | {"p": p} for p, t, _ in msdnet]
    entries += [_entry(E, C, cost, t, "fixed") for t in fixed]
    entries += [_entry(E, C, cost, t, "shared") for t in shared]
    previous = None
    for lam in lambdas:  # the vertices of the front's upper hull
        candidates = starts + ([previous] if previous is not None else [])
        start = max(candidates, key=lambda t: _objective(E, C, cost, t, lam))
        previous = ascend_thresholds(E, C, cost, start, lam)
        entries.append(_entry(E, C, cost, previous, "search") | {"lambda": float(lam)})
    for budget in np.linspace(cost[0], cost[-1], BUDGET_STEPS)[1:-1]:  # and the points between them
        fitting = [e for e in pareto_front(entries) if e["gflops"] <= budget]
        start = thresholds_from_json(fitting[-1]["thresholds"])  # the most accurate one that fits
        found = ascend_thresholds(E, C, cost, start, budget=float(budget))
        entries.append(_entry(E, C, cost, found, "search") | {"budget": float(budget)})
    return entries


def _entry(E, C, cost, thresholds, solver: str) -> dict:
    outcome = simulate(E, C, cost, thresholds)
    return {
        "solver": solver,
        "gflops": outcome.gflops,
        "accuracy": outcome.accuracy,
        "thresholds": thresholds_to_json(thresholds),
        "exit_fractions": outcome.exit_fractions.tolist(),
    }


def thresholds_for_budget(E: np.ndarray, cost: Sequence[float], budget: float) -> tuple[list[float], float]:
    """Thresholds whose realised cost on these samples is the largest not above `budget`, and that
    cost: for exports without a calibrated table (random weights, where accuracy plays no part and
    the exit mix does). A fine sweep of p (601 values over 1e-3..1e3), solved as in calibration, and
    the fixed settings ("t cubes for every video"): on a few samples the sweep's quotas round away
    from "everyone exits at t", so without them one video and a budget between two steps' costs
    found nothing."""
    E = _check_entropies(E)
    correct = np.zeros(E.shape, bool)  # accuracy is not asked for
    candidates = [(o.gflops, t) for _, t, o in sweep(E, correct, cost, np.logspace(-3, 3, 601))]
    K = E.shape[1] - 1
    for t in range(K + 1):
        fixed = fixed_cubes_thresholds(t, K)
        candidates.append((simulate(E, correct, cost, fixed).gflops, fixed))
    # a mean cost is compared with a little room: the mean of n equal costs can be an ulp above that
    # cost, and a budget of exactly the glance's cost must find "everyone exits at the glance"
    fitting = [(gflops, t) for gflops, t in candidates if gflops <= budget * (1 + _COST_EPS)]
    if not fitting:  # only a budget below the glance's own cost is left here
        least = math.ceil(cost[0] * 1e3 * (1 - _COST_EPS)) / 1e3  # rounded up: asking for it must work
        raise AdaFocusError(
            f"no exit mix costs <= {budget} GFLOPs/video (the glance alone costs {cost[0]:.6g})",
            f"ask for at least {least:.3f}",
        )
    realised, thresholds = max(fitting, key=lambda f: f[0])
    return [float(t) for t in thresholds], realised


def pareto_front(entries: list[dict], key: str = "accuracy") -> list[dict]:
    """Sort by gflops; keep each entry only if it beats the `key` ("accuracy" or "map") of every
    cheaper one (at equal cost, the better one, then the smaller p, wins)."""
    front: list[dict] = []
    for entry in sorted(entries, key=lambda e: (e["gflops"], -e[key], e.get("p", 0.0))):
        if not front or entry[key] > front[-1][key]:
            front.append(entry)
    return front
