"""An export measured on labelled videos through a deployed engine: accuracy after t cubes (every
video runs t cubes, no exit) and the accuracy-vs-GFLOPs front of the export's calibrated budgets
(paper Fig. 3), each budget realised on these videos.

    runtime = Runtime.load("exports/demo", "onnxruntime")
    report = evaluate_export(runtime, DecodedBatches(read_labelled("test.txt", runtime.class_names), runtime.preset))

One pass per video: `Runtime.step_outputs` runs the engine's loop with early exit off and returns
every exit's entropy and logits; a budget's outcome is then its thresholds applied to those entropies
(`simulate`), which is exactly what the loop decides with them, since the loop compares the same
float32 entropies with the same float32 thresholds and a video's cubes do not depend on its exit.
"""

from __future__ import annotations

import numpy as np

from adafocus.calibration.calibrate import StepOutputs, collect
from adafocus.calibration.thresholds import check_metric, simulate
from adafocus.errors import AdaFocusError
from adafocus.runtime import Runtime


def evaluate_export(engine: Runtime, videos, *, progress: bool = False, metric: str = "accuracy") -> dict:
    """`videos`: (videos, labels) batches (`DecodedBatches`, `TaskVideos`; labels (B,) or multi-hot
    (B, classes)) or `StepOutputs` already collected on this engine (with scores for "map").
    `metric`: "accuracy", or "map" to measure mean average precision as well (multi-label sets).
    Returns metric, accuracy_per_step (and map_per_step), gflops_per_exit_step, fixed_cubes,
    budgets ([{budget_gflops, gflops, accuracy (, map), exit_fractions, thresholds}], cheapest first), videos."""
    check_metric(metric)
    export = engine.export
    if isinstance(videos, StepOutputs):
        outputs = videos
    else:
        outputs = collect(export, videos, engine=engine, progress=progress, keep_scores=metric == "map")
    if len(outputs) == 0:
        raise AdaFocusError("no videos to evaluate on")
    scored = outputs.metric(metric)
    cost = np.asarray(export.exit_gflops, dtype=np.float64)
    per_step = {"accuracy": outputs.accuracy_per_step} | ({scored.name: scored.per_step()} if scored else {})
    budgets = []
    for entry in export.budgets or []:
        outcome = simulate(outputs.entropy, outputs.correct, cost, entry["thresholds"])
        budgets.append(
            {
                "budget_gflops": entry["gflops"],
                "gflops": outcome.gflops,
                "accuracy": outcome.accuracy,
                **({scored.name: scored(outcome.exit_step)} if scored else {}),
                "exit_fractions": outcome.exit_fractions.tolist(),
                "thresholds": entry["thresholds"],
            }
        )
    return {
        "export": str(export.path),
        "preset": export.preset.name,
        "engine": engine.backend.describe(),
        "videos": len(outputs),
        "metric": metric,
        **{f"{name}_per_step": values for name, values in per_step.items()},
        "gflops_per_exit_step": cost.tolist(),
        "fixed_cubes": [
            {"cubes": t, "gflops": float(cost[t])} | {name: values[t] for name, values in per_step.items()}
            for t in range(len(cost))
        ],
        "budgets": budgets,
    }
