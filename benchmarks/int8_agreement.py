"""INT8 against fp32, video by video, at an operating point where cubes run: the same held-out videos
through both loops (ONNX Runtime on the CPU) with the thresholds of one calibrated budget.

    python benchmarks/int8_agreement.py EXPORT [--thresholds-from results/bench-sthsth-v1-t12-onnxruntime.json]
        [--videos 256] [--out FILE.json]

`adafocus-calibrate --int8` compares the two at the manifest's default thresholds. On random weights
(the paper presets here) those exit every video at the glance (no budget is more accurate than the
cheapest), so this script takes the thresholds a benchmark report recorded (default: the sthsth-v1
CPU benchmark's, solved for 14 GFLOPs/video), or --thresholds: then the cubes, the local encoder and
the exit rule are compared too. Besides the shares of videos whose exit step or class changes it
reports how far the outputs move: a random network's classes are near ties (174 logits within a
fraction of a unit of each other), so a class change there says little; the logits' relative error and
the class agreement among videos with a clear fp32 winner say how close the arithmetic is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from adafocus.bench import bench_videos
from adafocus.export.manifest import open_export
from adafocus.files import write_json
from adafocus.machine import cpu_record
from adafocus.runtime import Runtime

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 32
MARGINS = (0.05, 0.1, 0.2)  # fp32 top-1 minus top-2 logit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export")
    parser.add_argument("--thresholds-from", type=Path, default=RESULTS / "bench-sthsth-v1-t12-onnxruntime.json")
    parser.add_argument("--thresholds", default=None, help="H0,...,HK (instead of --thresholds-from)")
    parser.add_argument("--videos", type=int, default=256)
    parser.add_argument("--seed", type=int, default=2, help="of the generated videos (not the calibration ones)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    export = open_export(args.export)
    if args.thresholds:
        thresholds, source = [float(t) for t in args.thresholds.split(",")], "--thresholds"
    else:
        recorded = json.loads(args.thresholds_from.read_text(encoding="utf-8"))
        thresholds, source = recorded["thresholds"], f"{args.thresholds_from.name}: {recorded['thresholds_from']}"
    videos = bench_videos(export, args.videos, seed=args.seed).numpy()
    runs = {}
    for precision in ("fp32", "int8"):
        runtime = Runtime.load(export.path, "onnxruntime", threads=2, precision=precision)
        runtime.set_thresholds(thresholds)
        parts = [runtime.predict(videos[i : i + BATCH]) for i in range(0, len(videos), BATCH)]
        runs[precision] = {
            "exit": np.concatenate([p.exit_step for p in parts]),
            "class": np.concatenate([p.prediction for p in parts]),
            "logits": np.concatenate([p.logits for p in parts]),  # at each video's exit step
            "starts": np.concatenate([p.cube_starts for p in parts]),
        }
    a, b = runs["fp32"], runs["int8"]
    same_exit = a["exit"] == b["exit"]
    top2 = np.sort(a["logits"], axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    error = np.linalg.norm(a["logits"] - b["logits"], axis=1) / np.linalg.norm(a["logits"], axis=1)
    after_cubes = same_exit & (a["exit"] > 0)  # both stopped after the same cube (the local encoder ran)
    report = {
        "export": str(export.path),
        "preset": export.preset.name,
        "thresholds": thresholds,
        "thresholds_from": source,
        "videos": len(videos),
        "video_seed": args.seed,
        "int8": {k: export.manifest["int8"][k] for k in ("calibration_videos", "method", "weight_bits", "activations")},
        "quantised_graphs": [g for g, r in export.manifest["int8"]["graphs"].items() if r["quantized"]],
        "same_exit_step": float(same_exit.mean()),
        "same_class": float((a["class"] == b["class"]).mean()),
        "same_first_cube": float((a["starts"][:, 0] == b["starts"][:, 0]).all(axis=1).mean()),
        "exit_counts": {p: np.bincount(r["exit"], minlength=export.preset.num_exits).tolist() for p, r in runs.items()},
        "logits_relative_error_median": {
            "same_exit_step": float(np.median(error[same_exit])) if same_exit.any() else None,
            "same_exit_step_after_cubes": float(np.median(error[after_cubes])) if after_cubes.any() else None,
        },
        "fp32_top1_margin_median": float(np.median(margin)),
        "same_class_where_margin_at_least": {
            str(m): {"videos": int((margin >= m).sum()), "same_class": _share(a, b, margin >= m)} for m in MARGINS
        },
        "machine": cpu_record(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        write_json(args.out, report)


def _share(a: dict, b: dict, where: np.ndarray) -> float | None:
    return float((a["class"][where] == b["class"][where]).mean()) if where.any() else None


if __name__ == "__main__":
    main()
