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

from adafocus.calibration.thresholds import budget_table, simulate
from adafocus.errors import AdaFocusError, InternalError
from adafocus.export.manifest import Export, open_export, update_manifest
from adafocus.model.networks import AdaFocusV3
from adafocus.model.reference import adaptive_inference, entropy

DEFAULT_MAX_DROP = 0.01  # the default operating point: within 1 accuracy point of the best entry
RANDOM_EXIT_SEED = 0


@dataclass
class StepOutputs:
    """Every exit's result for N videos, from one pass without early exit."""

    entropy: np.ndarray  # (N, K+1) float32, nats
    predictions: np.ndarray  # (N, K+1) int64
    labels: np.ndarray  # (N,) int64

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels[:, None]

    @property
    def accuracy_per_step(self) -> list[float]:
        """Accuracy of the prediction after t cubes, t = 0..K (no early exit)."""
        return self.correct.mean(axis=0).tolist()

    def __len__(self) -> int:
        return len(self.labels)


def reference_model(source) -> AdaFocusV3:
    """The PyTorch model behind an AdaFocusV3 / Runtime / Export / export directory."""
    if isinstance(source, AdaFocusV3):
        return source.eval()
    export = getattr(source, "export", source)  # a Runtime holds its Export
    if isinstance(export, str | os.PathLike):
        export = open_export(export)
    if not isinstance(export, Export):
        raise AdaFocusError(
            f"cannot calibrate a {type(source).__name__}", "pass an AdaFocusV3, a Runtime, an Export or a directory"
        )
    return export.load_model()


def _batches(videos, labels, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if labels is None:  # already an iterable of (videos, labels) batches
        return videos
    videos, labels = torch.as_tensor(videos), torch.as_tensor(labels)
    if len(videos) != len(labels):
        raise AdaFocusError(f"{len(videos)} videos but {len(labels)} labels")
    return ((videos[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(videos), batch_size))


def collect(
    source,
    videos,
    labels=None,
    *,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "collect",
    device: str = "cpu",
) -> StepOutputs:
    """Entropy and prediction at every exit for each video.

    `source`: an AdaFocusV3, a Runtime, an Export or an export directory (its PyTorch checkpoint is
    run; see the module docstring for why the reference stands for the deployed graphs). `videos`:
    a (N, T, 3, H, W) float32 tensor with `labels` (N,), or, with labels=None, an iterable of
    (videos, labels) batches such as `TaskVideos` (its len(), if any, sizes the progress bar).
    `device`: where the reference runs (a GPU makes paper presets fast to calibrate).
    """
    model = reference_model(source).to(device)
    never = [-math.inf] * model.preset.num_exits
    total = len(videos) if hasattr(videos, "__len__") else None
    entropies, predictions, targets = [], [], []
    with tqdm(total=total, desc=desc, unit="video", disable=not progress, leave=False) as bar:
        for batch, batch_labels in _batches(videos, labels, batch_size):
            logits = adaptive_inference(model, batch.to(device), never).step_logits.cpu()  # (B, K+1, classes)
            entropies.append(entropy(logits).numpy())
            predictions.append(logits.argmax(dim=-1).numpy())
            targets.append(torch.as_tensor(batch_labels).numpy())
            bar.update(len(batch))
    if not targets:
        raise AdaFocusError("no videos to calibrate on", "give at least one video")
    return StepOutputs(
        np.concatenate(entropies).astype(np.float32),
        np.concatenate(predictions).astype(np.int64),
        np.concatenate(targets).astype(np.int64),
    )


def add_heldout(table: list[dict], heldout: StepOutputs, cost) -> list[dict]:
    """Each entry + its held-out accuracy, realised GFLOPs/video (and that mean's standard error),
    the difference from the calibration cost, and the held-out exit mix."""
    out = []
    for entry in table:
        outcome = simulate(heldout.entropy, heldout.correct, cost, entry["thresholds"])
        out.append(
            {
                **entry,
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


def baselines(outputs: StepOutputs, cost, table: list[dict], seed: int = RANDOM_EXIT_SEED) -> dict:
    """The paper's Fig. 6 comparisons on `outputs`:

    - fixed_cubes: every video uses exactly t cubes, t = 0..K (points);
    - random_exit: for each table entry, videos exit at a random step, with the entry's calibration
      exit fractions (exact counts, random assignment; one seeded RNG for the whole table) — the
      same cost without the entropy criterion.
    """
    cost = np.asarray(cost, dtype=np.float64)
    correct = outputs.correct
    n, exits = correct.shape
    fixed = [{"cubes": t, "gflops": float(cost[t]), "accuracy": float(correct[:, t].mean())} for t in range(exits)]
    rng = np.random.default_rng(seed)
    random_exit = []
    for entry in table:
        steps = np.repeat(np.arange(exits), _counts(entry["exit_fractions"], n))[rng.permutation(n)]
        random_exit.append(
            {
                "p": entry.get("p"),
                "gflops": float(cost[steps].mean()),
                "accuracy": float(correct[np.arange(n), steps].mean()),
                "exit_fractions": (np.bincount(steps, minlength=exits) / n).tolist(),
            }
        )
    return {"fixed_cubes": fixed, "random_exit": random_exit, "seed": seed}


def default_entry(table: list[dict], max_drop: float = DEFAULT_MAX_DROP) -> int:
    """Index of the cheapest entry whose calibration accuracy is within `max_drop` (absolute) of the
    most accurate entry: nearly full accuracy for less compute (the knee of the curve)."""
    if not table:
        raise AdaFocusError("the budget table is empty")
    best = max(e["accuracy"] for e in table)
    return min(
        (i for i, e in enumerate(table) if e["accuracy"] >= best - max_drop - 1e-12), key=lambda i: table[i]["gflops"]
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

    def to_dict(self) -> dict:
        return _plain(
            {
                "export": str(self.export.path),
                "preset": self.export.preset.name,
                **self.info,
                "exit_gflops": list(self.export.exit_gflops),
                "calibration_accuracy_per_step": self.calibration.accuracy_per_step,
                "heldout_accuracy_per_step": self.heldout.accuracy_per_step if self.heldout is not None else None,
                "default_entry": self.default,
                "thresholds": self.table[self.default]["thresholds"],
                "budgets": self.table,
                "baselines": self.baselines,
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
) -> Calibration:
    """Solve the budget table on `calibration` videos, evaluate it on `heldout` ones, write it.

    `calibration` / `heldout`: (videos, labels) tensors or an iterable of such batches (`TaskVideos`).
    The manifest gets `budgets` (the table: gflops, accuracy, thresholds, p, exit_fractions and, with
    held-out data, heldout_accuracy, heldout_gflops, heldout_gflops_stderr, heldout_gflops_minus_budget,
    heldout_exit_fractions), `thresholds` = the `default_entry` (the cheapest entry within `max_drop`
    of the best calibration accuracy), and `calibration` (how the table was made). Written atomically
    through `update_manifest`; baselines are measured on the held-out videos if given.
    """
    export = open_export(export_dir)
    cost = np.asarray(export.exit_gflops, dtype=np.float64)

    def run(data, desc):
        videos, labels = data if isinstance(data, tuple) else (data, None)
        return collect(export, videos, labels, batch_size=batch_size, progress=progress, desc=desc)

    cal = run(calibration, "calibration videos")
    if cal.entropy.shape[1] != len(cost):
        raise AdaFocusError(f"the model has {cal.entropy.shape[1]} exits but the manifest costs {len(cost)}")
    table = budget_table(cal.entropy, cal.correct, cost, ps=ps)
    held = run(heldout, "held-out videos") if heldout is not None else None
    if held is not None:
        table = add_heldout(table, held, cost)
    chosen = default_entry(table, max_drop)
    compared = baselines(held if held is not None else cal, cost, table)
    table = _plain(table)
    record = _plain(
        {
            "method": "MSDNet dynamic evaluation (exit proportions q_k ∝ p^k), entropy thresholds placed midway "
            "between calibration samples",
            "outputs_from": f"PyTorch reference loop on {export.model_path.name}",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "calibration_videos": len(cal),
            "heldout_videos": len(held) if held is not None else 0,
            "default_entry": chosen,
            "default_rule": f"cheapest entry within {max_drop:g} of the best calibration accuracy",
            "threshold_sentinels": {"always_exit": 1e9, "never_exit": -1e9},
            **(info or {}),
        }
    )

    def change(manifest: dict) -> None:
        manifest["budgets"] = table
        manifest["thresholds"] = table[chosen]["thresholds"]
        manifest["calibration"] = record

    written = update_manifest(export.path, change)
    return Calibration(written, table, chosen, cal, held, _plain(compared), info or {})
