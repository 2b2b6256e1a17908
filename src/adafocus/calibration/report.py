"""A calibration's budget table as text (what `adafocus-calibrate` prints)."""

from __future__ import annotations

SE_NOISE = 1e-9  # a standard error below this share of the mean cost is rounding, not spread


def format_table(report: dict) -> str:
    """The budget table as text, from `Calibration.to_dict()` (or the --json output), in the metric the
    table was chosen by (accuracy or mAP)."""
    exits = len(report["exit_gflops"])
    metric = report.get("metric", "accuracy")
    short = {"accuracy": "acc", "map": "mAP"}[metric]
    lines = [
        f"{report['preset']} export {report['export']}",
        _sets_line(report),
        "GFLOPs/video by exit step: " + ", ".join(f"{g:.4f}" for g in report["exit_gflops"]),
    ]
    held = report["heldout_accuracy_per_step"] is not None
    head = f"  {'budget':>8} {'cal ' + short:>8}"
    if held:
        head += f" {'held ' + short:>8} {'realised':>9} {'diff':>8} {'diff/se':>7}"
    head += "  exit fractions t=0.." + str(exits - 1)
    lines += ["", head]
    for i, e in enumerate(report["budgets"]):
        mark = "*" if i == report["default_entry"] else " "
        row = f"{mark} {e['gflops']:8.4f} {100 * e[metric]:7.1f}%"
        if held:
            diff = e["heldout_gflops_minus_budget"]
            se = e["heldout_gflops_stderr"]
            # every held-out video costing the same (one exit step) leaves float noise, ~1e-19, as
            # the standard error, and one held-out video has none (None): no spread to divide by
            spread = se is not None and se > SE_NOISE * e["heldout_gflops"]
            z = f"{diff / se:7.2f}" if spread else f"{'—':>7}"
            row += f" {100 * e['heldout_' + metric]:7.1f}% {e['heldout_gflops']:9.4f} {diff:+8.4f} {z}"
        row += "  " + " ".join(f"{f:.3f}" for f in e["exit_fractions"])
        lines.append(row)
    lines.append("")
    lines.append("* default (manifest thresholds): " + report["default_rule"])
    if held:
        lines.append(
            "diff = realised held-out GFLOPs - calibration GFLOPs; se = standard error of the held-out mean cost"
        )
    per_step = report[f"heldout_{metric}_per_step"] if held else report[f"calibration_{metric}_per_step"]
    lines.append(
        f"fixed t cubes for every video ({'held-out' if held else 'calibration'}, {short}): "
        + ", ".join(f"t={t}: {100 * a:.1f}% @ {g:.4f}" for t, (a, g) in enumerate(zip(per_step, report["exit_gflops"])))
    )
    if not report.get("accuracy_meaningful", True):
        lines.append(
            "note: this model was not trained on the synthetic task, so its accuracies mean nothing; "
            "the exit mix and GFLOPs are realistic"
        )
    return "\n".join(lines)


def _sets_line(report: dict) -> str:
    if "calibration_set" not in report:  # the synthetic task, described by the caller's info
        return (
            f"calibration: {report['calibration_videos']} '{report['calibration_split']}' videos; held-out: "
            f"{report['heldout_videos']} '{report['heldout_split']}' videos; task seed {report['seed']}"
        )

    def described(videos: dict | None) -> str:
        if videos is None:
            return "none"
        if "synthetic" in videos:
            task = videos["synthetic"]
            return f"{videos['used']} synthetic '{task['split']}' videos (task seed {task['seed']})"
        left_out = f", {videos['left_out']} left out" if videos["left_out"] else ""
        return f"{videos['used']} videos of {videos['list']}{left_out}"

    return f"calibration: {described(report['calibration_set'])}; held-out: {described(report['heldout_set'])}"
