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
from adafocus.calibration.thresholds import simulate
from adafocus.errors import AdaFocusError
from adafocus.runtime import Runtime


def evaluate_export(engine: Runtime, videos, *, progress: bool = False) -> dict:
    """`videos`: (videos, labels) batches (`DecodedBatches`, `TaskVideos`) or `StepOutputs` already
    collected on this engine. Returns accuracy_per_step, gflops_per_exit_step, fixed_cubes,
    budgets ([{budget_gflops, gflops, accuracy, exit_fractions, thresholds}], cheapest first), videos."""
    export = engine.export
    outputs = videos if isinstance(videos, StepOutputs) else collect(export, videos, engine=engine, progress=progress)
    if len(outputs) == 0:
        raise AdaFocusError("no videos to evaluate on")
    cost = np.asarray(export.exit_gflops, dtype=np.float64)
    per_step = outputs.accuracy_per_step
    budgets = []
    for entry in export.budgets or []:
        outcome = simulate(outputs.entropy, outputs.correct, cost, entry["thresholds"])
        budgets.append(
            {
                "budget_gflops": entry["gflops"],
                "gflops": outcome.gflops,
                "accuracy": outcome.accuracy,
                "exit_fractions": outcome.exit_fractions.tolist(),
                "thresholds": entry["thresholds"],
            }
        )
    return {
        "export": str(export.path),
        "preset": export.preset.name,
        "engine": engine.backend.describe(),
        "videos": len(outputs),
        "accuracy_per_step": per_step,
        "gflops_per_exit_step": cost.tolist(),
        "fixed_cubes": [
            {"cubes": t, "gflops": float(cost[t]), "accuracy": accuracy} for t, accuracy in enumerate(per_step)
        ],
        "budgets": budgets,
    }
