"""Calibrate an export: per-step entropies on calibration videos -> budget table -> manifest.

    outputs = collect(export, videos, labels)          # (N, K+1) entropies and correctness
    result = calibrate_export("exports/demo", (videos, labels), (heldout_videos, heldout_labels))
    Runtime.load("exports/demo").set_budget(0.1)       # then picks from the table written here

Per-step outputs come from the PyTorch reference loop (`adaptive_inference` with every threshold at
-inf, which returns every step's logits in one pass), run on the checkpoint the export was made from
(`Export.model_path`). The deployed backends are verified against this reference (same exits, same
predictions) when the export is made and in the runtime tests, so its entropies stand for theirs;
the held-out check in the tests runs the ONNX graphs with the calibrated thresholds and compares.
Costs are the export's `gflops.per_exit_step`, counted from the ONNX graphs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
from tqdm import tqdm

from adafocus.calibration.thresholds import (
    SOLVERS,
    MeanAveragePrecision,
    budget_table,
    check_metric,
    search_table,
    simulate,
)
from adafocus.data.labelled import top1_hits
from adafocus.errors import AdaFocusError, InternalError
from adafocus.export.manifest import Export, open_export, update_manifest
from adafocus.files import write_json
from adafocus.model.checks import check_finite_in_set
from adafocus.model.families import Model
from adafocus.model.networks import AdaFocusV3
from adafocus.model.reference import adaptive_inference, entropy
from adafocus.model.uni import UniAdaFocus
from adafocus.runtime import Runtime

METHODS = {
    "msdnet": "MSDNet dynamic evaluation (exit proportions q_k ∝ p^k), entropy thresholds placed midway "
    "between calibration samples",
    "search": "per-step entropy thresholds maximising accuracy - λ·cost on the calibration videos (coordinate "
    "ascent, for a sweep of λ, from the MSDNet and fixed-number-of-cubes settings), thresholds midway between "
    "calibration samples; the front of those, the MSDNet entries and the fixed settings",
}
METRIC_NAMES = {"accuracy": "accuracy", "map": "mAP"}
DEFAULT_MAX_DROP = 0.01  # the default operating point: within 1 accuracy point of the best entry
RANDOM_EXIT_SEED = 0


@dataclass
class StepOutputs:
    """Every exit's result for N videos, from one pass without early exit."""

    entropy: np.ndarray  # (N, K+1) float32, nats
    predictions: np.ndarray  # (N, K+1) int64
    labels: np.ndarray  # (N,) int64 class indices, or (N, classes) bool for a multi-label set
    scores: np.ndarray | None = None  # (N, K+1, classes) float32 class probabilities, kept for --metric map

    @property
    def correct(self) -> np.ndarray:
        """(N, K+1) whether the top class at each exit is the video's label (one of its labels)."""
        return top1_hits(self.predictions, self.labels)

    def metric(self, name: str):
        """The set metric behind a budget table: None for "accuracy" (a mean over videos, which the
        solvers compute from `correct`), a `MeanAveragePrecision` for "map"."""
        if check_metric(name) == "accuracy":
            return None
        if self.scores is None:
            raise InternalError("mAP needs the class probabilities: collect with keep_scores=True")
        return MeanAveragePrecision(self.scores, self.labels)

    @property
    def accuracy_per_step(self) -> list[float]:
        """Accuracy of the prediction after t cubes, t = 0..K (no early exit)."""
        return self.correct.mean(axis=0).tolist()

    def __len__(self) -> int:
        return len(self.labels)


def _export_of(source) -> Export | None:
    """The Export behind a Runtime / Export / export directory; None for a bare model."""
    if isinstance(source, AdaFocusV3 | UniAdaFocus):
        return None
    export = getattr(source, "export", source)  # a Runtime holds its Export
    if isinstance(export, str | os.PathLike):
        export = open_export(export)
    if not isinstance(export, Export):
        raise AdaFocusError(
            f"cannot calibrate a {type(source).__name__}", "pass a model, a Runtime, an Export or a directory"
        )
    return export


def reference_model(source) -> Model:
    """The PyTorch model behind a model / Runtime / Export / export directory."""
    export = _export_of(source)
    return source.eval() if export is None else export.load_model()


def check_engine(export: Export, engine: Runtime) -> None:
    """Refuse an engine whose graphs or weights are not this export's (loaded from another export, or
    from this one before its files changed): its entropies would calibrate thresholds for another model.
    The files' hashes decide, not the path: an identical copy runs the same model."""
    if engine.export.files != export.files:
        raise AdaFocusError(
            f"the engine was loaded from {engine.export.path}, whose weights or graphs are not those of {export.path}",
            f"load the engine from the export being calibrated: Runtime.load({str(export.path)!r}, ...)",
        )


def check_labels(labels, classes: int, offset: int = 0) -> None:
    """One clear error for labels that a model of `classes` classes cannot be scored against: (B,)
    class indices in 0..classes-1, or (B, classes) multi-hot rows. `offset`: the index of the batch's
    first video in the whole set, so that the error names the video as the set counts it."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        if labels.shape[1] != classes:
            raise AdaFocusError(
                f"multi-hot labels have {labels.shape[1]} columns, the model {classes} classes",
                "give one column per class, in the export's class order",
            )
        return
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise AdaFocusError(
            f"labels of shape {labels.shape} and dtype {labels.dtype}: neither (videos,) class indices nor "
            f"(videos, {classes}) multi-hot rows",
            "give integer class indices or multi-hot rows",
        )
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if len(bad):
        first = int(bad[0])
        more = f" (and {len(bad) - 1} more videos)" if len(bad) > 1 else ""
        raise AdaFocusError(
            f"video {offset + first} has label {int(labels[first])}, not one of the model's {classes} classes "
            f"(0..{classes - 1}){more}",
            "give class indices in the export's class order (its class_names)",
        )


def _batches(videos, labels, batch_size: int, classes: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(videos, labels) batches, each one's labels and values checked before it is run: an array's all
    at once, before any work; an iterable's batch by batch (reading them all first would decode twice)."""
    if labels is None:  # already an iterable of (videos, labels) batches
        return _checked(videos, classes)
    videos, labels = torch.as_tensor(videos), torch.as_tensor(labels)
    if len(videos) != len(labels):
        raise AdaFocusError(f"{len(videos)} videos but {len(labels)} labels")
    check_labels(labels.cpu().numpy(), classes)
    check_finite_in_set(videos, 0)
    return ((videos[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(videos), batch_size))


def _checked(batches, classes: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    offset = 0
    for videos, labels in batches:
        check_labels(torch.as_tensor(labels).cpu().numpy(), classes, offset)
        check_finite_in_set(videos, offset)
        yield videos, labels
        offset += len(videos)


def collect(
    source,
    videos,
    labels=None,
    *,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "collect",
    device: str = "cpu",
    engine: Runtime | None = None,
    keep_scores: bool = False,
) -> StepOutputs:
    """Entropy and prediction at every exit for each video.

    `source`: a model (either family), a Runtime, an Export or an export directory (its PyTorch checkpoint is
    run; see the module docstring for why the reference stands for the deployed graphs). `videos`:
    a (N, T, 3, H, W) float32 tensor with `labels` (N,), or, with labels=None, an iterable of
    (videos, labels) batches such as `TaskVideos` or `DecodedBatches` (its len(), if any, sizes the
    progress bar). `device`: where the reference runs (a GPU makes paper presets fast to calibrate).
    `engine`: a Runtime whose own graphs give the entropies instead (`Runtime.step_outputs`), to
    calibrate the thresholds of an fp16 or INT8 deployment on what it computes. `keep_scores`: keep
    every exit's class probabilities too (`StepOutputs.scores`, for mAP). Labels may be (B,) class
    indices or (B, classes) multi-hot rows.
    """
    if engine is None:
        model = reference_model(source).to(device)
        never = [-math.inf] * model.preset.num_exits
        classes = model.preset.num_classes

        def outputs(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            logits = adaptive_inference(model, batch.to(device), never).step_logits.cpu()  # (B, K+1, classes)
            return entropy(logits).numpy(), logits.numpy()
    else:
        export = _export_of(source)
        if export is None:
            raise AdaFocusError(
                "collecting through an engine needs the export it runs, not a model",
                "pass the export (or its directory) the engine was loaded from",
            )
        check_engine(export, engine)
        classes = export.preset.num_classes

        def outputs(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            return engine.step_outputs(np.ascontiguousarray(batch, dtype=np.float32))

    total = len(videos) if hasattr(videos, "__len__") else None
    entropies, predictions, targets, scores = [], [], [], []
    with tqdm(total=total, desc=desc, unit="video", disable=not progress, leave=False) as bar:
        for batch, batch_labels in _batches(videos, labels, batch_size, classes):
            step_entropy, step_logits = outputs(batch)
            entropies.append(step_entropy)
            predictions.append(step_logits.argmax(axis=-1))
            if keep_scores:
                scores.append(torch.softmax(torch.as_tensor(step_logits, dtype=torch.float64), -1).float().numpy())
            targets.append(torch.as_tensor(batch_labels).numpy())
            bar.update(len(batch))
    if not targets:
        raise AdaFocusError("no videos to calibrate on", "give at least one video")
    return StepOutputs(
        np.concatenate(entropies).astype(np.float32),
        np.concatenate(predictions).astype(np.int64),
        _labels(np.concatenate(targets)),
        np.concatenate(scores) if keep_scores else None,
    )


def _labels(values: np.ndarray) -> np.ndarray:
    """(N,) int64 class indices, or (N, classes) bool multi-hot rows."""
    values = np.asarray(values)
    return values.astype(bool) if values.ndim == 2 else values.astype(np.int64)


# --- the cache of step outputs -----------------------------------------------------------------------
CACHE_FORMAT = "adafocus-step-outputs/1"


def engine_key(export: Export, engine: Runtime | None) -> dict:
    """What a set's step outputs depend on, besides the videos: the weights (the checkpoint every
    graph was exported from) and, for a deployed engine, its backend, device and precision and the
    files of that precision (INT8 graphs, compiled engines)."""
    files = export.files
    key = {"preset": export.preset.name, "weights_sha256": files[export.model_path.name]["sha256"]}
    if engine is None:
        return key | {"engine": "pytorch reference loop (fp32)"}
    described = engine.backend.describe()
    precision = described["precision"] or "fp32"
    own = {name: record["sha256"] for name, record in sorted(files.items()) if f".{precision}." in name}
    return key | {"engine": {k: described[k] for k in ("backend", "device", "precision")}, "files": own}


def load_cached(
    path: str | os.PathLike, role: str, key: dict, log=None, need_scores: bool = False
) -> tuple[StepOutputs, dict] | None:
    """The `role` entry ("calibration", "heldout", ...) of a cache file if it was made for `key`
    (None otherwise, said through `log` when the file holds an entry for something else, or one
    without the class probabilities that `need_scores` asks for)."""
    import json

    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
        entry = cache["entries"].get(role) if cache.get("format") == CACHE_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        entry = None
    if entry is None:
        return None
    if entry.get("key") != key:
        if log is not None:
            log(f"{path}: holds no {role} outputs of this export and these videos (either changed): collecting again")
        return None
    if need_scores and "scores" not in entry:
        if log is not None:
            log(f"{path}: its {role} outputs hold no class probabilities (needed for mAP): collecting again")
        return None
    outputs = StepOutputs(
        np.asarray(entry["entropy"], np.float32),
        np.asarray(entry["predictions"], np.int64),
        _labels(entry["labels"]),
        _array_from_json(entry["scores"]) if "scores" in entry else None,
    )
    return outputs, entry["meta"]


def _array_to_json(values: np.ndarray) -> dict:
    """A float32 array as strict JSON, exactly and compactly: its shape and its bytes (little-endian) in
    base64 (a 10 000-video ActivityNet set's probabilities are 34 M numbers)."""
    import base64

    values = np.ascontiguousarray(values, dtype="<f4")
    return {"shape": list(values.shape), "float32_base64": base64.b64encode(values.tobytes()).decode("ascii")}


def _array_from_json(record: dict) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(record["float32_base64"]), "<f4").reshape(record["shape"]).astype(np.float32)


def save_cached(path: str | os.PathLike, role: str, key: dict, outputs: StepOutputs, meta: dict) -> None:
    """Add (or replace) the `role` entry of a cache file: strict JSON, float32 entropies exactly."""
    import json

    path = os.fspath(path)
    cache = {"format": CACHE_FORMAT, "entries": {}}
    try:
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
        if found.get("format") == CACHE_FORMAT:
            cache = found
    except (OSError, ValueError, AttributeError):
        pass
    cache["entries"][role] = {
        "key": key,
        "meta": meta,
        "entropy": outputs.entropy.tolist(),
        "predictions": outputs.predictions.tolist(),
        "labels": outputs.labels.astype(np.int64).tolist(),  # multi-hot rows as 0/1
    }
    if outputs.scores is not None:
        cache["entries"][role]["scores"] = _array_to_json(outputs.scores)
    write_json(path, cache)


def add_heldout(table: list[dict], heldout: StepOutputs, cost, metric: str = "accuracy") -> list[dict]:
    """Each entry + its held-out accuracy (and, for metric "map", heldout_map), realised GFLOPs/video
    (and that mean's standard error: None for a single held-out video), the difference from the
    calibration cost, and the held-out exit mix."""
    scored = heldout.metric(metric)
    out = []
    for entry in table:
        outcome = simulate(heldout.entropy, heldout.correct, cost, entry["thresholds"])
        out.append(
            {
                **entry,
                **({f"heldout_{scored.name}": scored(outcome.exit_step)} if scored else {}),
                "heldout_accuracy": outcome.accuracy,
                "heldout_gflops": outcome.gflops,
                "heldout_gflops_stderr": outcome.gflops_stderr,
                "heldout_gflops_minus_budget": outcome.gflops - entry["gflops"],
                "heldout_exit_fractions": outcome.exit_fractions.tolist(),
            }
        )
    return out


def _counts(fractions, n: int) -> np.ndarray:
    """Largest-remainder rounding of n·fractions to integers summing to n."""
    raw = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(raw).astype(np.int64)
    counts[np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts


def baselines(
    outputs: StepOutputs, cost, table: list[dict], seed: int = RANDOM_EXIT_SEED, metric: str = "accuracy"
) -> dict:
    """The paper's Fig. 6 comparisons on `outputs` (each point with its accuracy and, for metric "map",
    its map):

    - fixed_cubes: every video uses exactly t cubes, t = 0..K (points);
    - random_exit: for each table entry, videos exit at a random step, with the entry's calibration
      exit fractions (exact counts, random assignment; one seeded RNG for the whole table) — the
      same cost without the entropy criterion.
    """
    cost = np.asarray(cost, dtype=np.float64)
    correct = outputs.correct
    scored = outputs.metric(metric)
    n, exits = correct.shape

    def point(steps: np.ndarray) -> dict:
        figures = {"gflops": float(cost[steps].mean()), "accuracy": float(correct[np.arange(n), steps].mean())}
        return figures | ({scored.name: scored(steps)} if scored else {})

    fixed = [{"cubes": t} | point(np.full(n, t)) for t in range(exits)]
    rng = np.random.default_rng(seed)
    random_exit = []
    for entry in table:
        steps = np.repeat(np.arange(exits), _counts(entry["exit_fractions"], n))[rng.permutation(n)]
        fractions = (np.bincount(steps, minlength=exits) / n).tolist()
        random_exit.append({"p": entry.get("p")} | point(steps) | {"exit_fractions": fractions})
    return {"fixed_cubes": fixed, "random_exit": random_exit, "seed": seed}


def default_entry(table: list[dict], max_drop: float = DEFAULT_MAX_DROP, metric: str = "accuracy") -> int:
    """Index of the cheapest entry whose calibration `metric` ("accuracy" or "map") is within `max_drop`
    (absolute) of the best entry's: nearly the best for less compute (the knee of the curve)."""
    if not table:
        raise AdaFocusError("the budget table is empty")
    best = max(e[metric] for e in table)
    return min(
        (i for i, e in enumerate(table) if e[metric] >= best - max_drop - 1e-12), key=lambda i: table[i]["gflops"]
    )


def _plain(value):
    """numpy scalars/arrays -> JSON-ready Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise InternalError(f"non-finite value {value} cannot go into JSON (thresholds go through thresholds_to_json)")
    return value


@dataclass
class Calibration:
    """What calibrate_export wrote (`table` = manifest budgets) and what it measured on the way."""

    export: Export
    table: list[dict]
    default: int
    calibration: StepOutputs
    heldout: StepOutputs | None
    baselines: dict
    info: dict
    fronts: dict  # solver -> its front (with held-out figures when measured); `table` is one of them
    metric: str = "accuracy"  # what the fronts and the default entry were chosen by ("accuracy" | "map")

    def to_dict(self) -> dict:
        def per_step(outputs: StepOutputs | None) -> dict:
            if outputs is None:
                return {"accuracy": None} | ({"map": None} if self.metric == "map" else {})
            scored = outputs.metric(self.metric)
            return {"accuracy": outputs.accuracy_per_step} | ({scored.name: scored.per_step()} if scored else {})

        cal, held = per_step(self.calibration), per_step(self.heldout)
        return _plain(
            {
                "export": str(self.export.path),
                "preset": self.export.preset.name,
                **self.info,
                "metric": self.metric,
                "exit_gflops": list(self.export.exit_gflops),
                **{f"calibration_{name}_per_step": values for name, values in cal.items()},
                **{f"heldout_{name}_per_step": values for name, values in held.items()},
                "default_entry": self.default,
                "thresholds": self.table[self.default]["thresholds"],
                "budgets": self.table,
                "baselines": self.baselines,
                "fronts": self.fronts,
            }
        )


def calibrate_export(
    export_dir: str | os.PathLike,
    calibration,
    heldout=None,
    *,
    ps=None,
    batch_size: int = 64,
    progress: bool = True,
    max_drop: float = DEFAULT_MAX_DROP,
    info: dict | None = None,
    engine: Runtime | None = None,
    solver: str = "search",
    metric: str = "accuracy",
) -> Calibration:
    """Solve the budget table on `calibration` videos, evaluate it on `heldout` ones, write it.

    `calibration` / `heldout`: (videos, labels) tensors, an iterable of such batches (`TaskVideos`,
    `DecodedBatches`), or `StepOutputs` already collected (from a cache). `engine`: collect through
    this Runtime's graphs instead of the PyTorch reference (see `collect`). `solver`: "search"
    (per-step thresholds searched beyond MSDNet's family, `search_table`) or "msdnet" (the paper's
    q_k ∝ p^k, `budget_table`); both fronts are measured and returned (`Calibration.fronts`), the
    chosen one is written. `metric`: what the fronts and the default entry are chosen by: "accuracy"
    (top-1; on a multi-label set, the top class being one of the video's labels) or "map" (mean
    average precision over the set, `MeanAveragePrecision`: for multi-label sets such as ActivityNet
    and FCVID; every entry then carries `map` beside `accuracy`, and `heldout_map`).
    The manifest gets `budgets` (the table: gflops, accuracy, thresholds, p, exit_fractions and, with
    held-out data, heldout_accuracy, heldout_gflops, heldout_gflops_stderr, heldout_gflops_minus_budget,
    heldout_exit_fractions), `thresholds` = the `default_entry` (the cheapest entry within `max_drop`
    of the best calibration accuracy), and `calibration` (how the table was made). Written atomically
    through `update_manifest`; baselines are measured on the held-out videos if given.
    """
    export = open_export(export_dir)
    cost = np.asarray(export.exit_gflops, dtype=np.float64)

    if solver not in SOLVERS:
        raise AdaFocusError(f"unknown solver {solver!r}", f"choose one of {', '.join(SOLVERS)}")
    check_metric(metric)
    if engine is not None:  # its entropies would be another model's: thresholds for the wrong graphs
        check_engine(export, engine)

    def run(data, desc):
        if isinstance(data, StepOutputs):
            if metric == "map" and data.scores is None:
                raise AdaFocusError(f"the {desc}' outputs hold no class probabilities", "collect with keep_scores=True")
            check_labels(data.labels, export.preset.num_classes)
            return data
        videos, labels = data if isinstance(data, tuple) else (data, None)
        keep_scores = metric == "map"
        return collect(
            export,
            videos,
            labels,
            batch_size=batch_size,
            progress=progress,
            desc=desc,
            engine=engine,
            keep_scores=keep_scores,
        )

    cal = run(calibration, "calibration videos")
    if cal.entropy.shape[1] != len(cost):
        raise AdaFocusError(f"the model has {cal.entropy.shape[1]} exits but the manifest costs {len(cost)}")
    scored = cal.metric(metric)
    fronts = {
        "msdnet": budget_table(cal.entropy, cal.correct, cost, ps=ps, metric=scored),
        "search": search_table(cal.entropy, cal.correct, cost, ps=ps, metric=scored),
    }
    held = run(heldout, "held-out videos") if heldout is not None else None
    if held is not None:
        fronts = {name: add_heldout(front, held, cost, metric) for name, front in fronts.items()}
    table = fronts[solver]
    chosen = default_entry(table, max_drop, metric)
    compared = baselines(held if held is not None else cal, cost, table, metric=metric)
    table = _plain(table)
    record = _plain(
        {
            "method": METHODS[solver],
            "solver": solver,
            "metric": metric,
            "outputs_from": f"PyTorch reference loop on {export.model_path.name}"
            if engine is None
            else engine_key(export, engine)["engine"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "calibration_videos": len(cal),
            "heldout_videos": len(held) if held is not None else 0,
            "default_entry": chosen,
            "default_rule": f"cheapest entry within {max_drop:g} of the best calibration {METRIC_NAMES[metric]}",
            "threshold_sentinels": {"always_exit": 1e9, "never_exit": -1e9},
            **(info or {}),
        }
    )

    def change(manifest: dict) -> None:
        manifest["budgets"] = table
        if manifest["thresholds"] != table[chosen]["thresholds"] and "int8" in manifest:
            # the int8 record's fp32-vs-int8 comparison and speed ran at the old thresholds: kept,
            # they would read as figures of the new ones (`adafocus-calibrate --int8` measures them again)
            for measured in ("heldout", "speed"):
                manifest["int8"].pop(measured, None)
        manifest["thresholds"] = table[chosen]["thresholds"]
        manifest["calibration"] = record

    written = update_manifest(export.path, change)
    return Calibration(written, table, chosen, cal, held, _plain(compared), info or {}, _plain(fronts), metric)
