"""Early-exit calibration: entropy thresholds for a range of FLOPs budgets (paper Eq. 7).

`thresholds` is the pure-numpy solver (MSDNet dynamic evaluation, thresholds midway between
calibration samples); `calibrate` collects per-step entropies and writes the budget table into an
export's manifest; `plot` draws the accuracy-vs-GFLOPs curve; `report` writes the table as text.
INT8 quantisation is its own layer, `adafocus.quantize`; the command is `adafocus.cli.calibrate`.
"""

from adafocus.calibration.calibrate import (
    Calibration,
    StepOutputs,
    add_heldout,
    baselines,
    calibrate_export,
    collect,
    default_entry,
)
from adafocus.calibration.plot import plot_curve
from adafocus.calibration.thresholds import (
    ALWAYS,
    NEVER,
    Outcome,
    budget_table,
    exit_proportions,
    exit_quotas,
    exit_steps,
    pareto_front,
    simulate,
    solve_thresholds,
    sweep,
    thresholds_for_budget,
    thresholds_from_json,
    thresholds_to_json,
)

__all__ = [
    "ALWAYS",
    "NEVER",
    "Calibration",
    "Outcome",
    "StepOutputs",
    "add_heldout",
    "baselines",
    "budget_table",
    "calibrate_export",
    "collect",
    "default_entry",
    "exit_proportions",
    "exit_quotas",
    "exit_steps",
    "pareto_front",
    "plot_curve",
    "simulate",
    "solve_thresholds",
    "sweep",
    "thresholds_for_budget",
    "thresholds_from_json",
    "thresholds_to_json",
]
