"""The accuracy- (or mAP-) vs-GFLOPs curve of a calibrated export, with the paper's Fig. 6 baselines."""

from __future__ import annotations

import os
from pathlib import Path

from adafocus.figures import new_figure, save_png


def plot_curve(
    table: list[dict],
    baselines: dict | None,
    path: str | os.PathLike,
    title: str | None = None,
    others: dict[str, list[dict]] | None = None,
    metric: str = "accuracy",
) -> Path:
    """Write a PNG: the budget table (held-out accuracy at realised GFLOPs when the entries carry
    held-out figures, and the calibration curve dashed), fixed-t-cubes points and the random-exit
    curve (`calibrate.baselines`), and `others` (name -> another solver's front, drawn thin), in
    `metric` ("accuracy" or "map": the entries' key of that name). Returns the path."""
    path = Path(path)
    fig, ax = new_figure(figsize=(7, 4.8), dpi=120)
    for name, front in (others or {}).items():
        held = bool(front) and f"heldout_{metric}" in front[0]
        ax.plot(
            [e["heldout_gflops" if held else "gflops"] for e in front],
            [100 * e[f"heldout_{metric}" if held else metric] for e in front],
            "^-",
            color="tab:green",
            ms=3,
            lw=1.0,
            alpha=0.8,
            label=f"{name} thresholds{', held-out' if held else ''}",
        )
    cal_x = [e["gflops"] for e in table]
    cal_y = [100 * e[metric] for e in table]
    if table and f"heldout_{metric}" in table[0]:
        ax.plot(cal_x, cal_y, "--", color="tab:blue", alpha=0.45, lw=1.2, label="entropy exit, calibration set")
        ax.plot(
            [e["heldout_gflops"] for e in table],
            [100 * e[f"heldout_{metric}"] for e in table],
            "o-",
            color="tab:blue",
            ms=3.5,
            lw=1.6,
            label="entropy exit (calibrated thresholds), held-out",
        )
    else:
        ax.plot(cal_x, cal_y, "o-", color="tab:blue", ms=3.5, lw=1.6, label="entropy exit, calibration set")
    if baselines:
        random_exit = sorted(baselines.get("random_exit", []), key=lambda e: e["gflops"])
        if random_exit:
            ax.plot(
                [e["gflops"] for e in random_exit],
                [100 * e[metric] for e in random_exit],
                ".-",
                color="tab:orange",
                ms=3,
                lw=1.2,
                label="random exit, same exit proportions",
            )
        fixed = baselines.get("fixed_cubes", [])
        if fixed:
            ax.plot(
                [e["gflops"] for e in fixed],
                [100 * e[metric] for e in fixed],
                "s",
                color="black",
                ms=6,
                label="fixed number of cubes for every video",
            )
            for e in fixed:
                ax.annotate(
                    f"t={e['cubes']}",
                    (e["gflops"], 100 * e[metric]),
                    textcoords="offset points",
                    xytext=(5, -11),
                    fontsize=8,
                )
    ax.set_xlabel("GFLOPs / video (multiply-adds)")
    ax.set_ylabel({"accuracy": "accuracy (%)", "map": "mAP (%)"}[metric])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
