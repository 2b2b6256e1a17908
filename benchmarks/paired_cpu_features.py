"""What a CPU's newer instructions buy ONNX Runtime here: the adaptive loop and the dense graph timed
in alternating processes, natively and with features hidden from CPUID (scripts/as_avx2_cpu.sh).

    python benchmarks/paired_cpu_features.py amx EXPORT_DIR --precision int8 --batch 32 --thresholds 4.9,5.0,1e9
    python benchmarks/paired_cpu_features.py avx512 EXPORT_DIR --precision int8 --out benchmarks/results/NAME.json

`amx` hides AMX alone (an AMX CPU's int8 GEMMs then take ONNX Runtime's VNNI kernels); `avx512` hides
AVX-512, VNNI and AMX (its AVX2 kernels). ONNX Runtime reads the CPU's features once, when it loads,
so each side needs a process of its own: each round starts one process per side, in alternating
order, and each process loads the export, runs every method twice (warm-ups) and times it
`--repeats` times. `speedup` is the median over rounds of (hidden ÷ native) per method, so that a
change of the machine's load between rounds cancels out. Without EXPORT_DIR: the built-in demo's
export; the videos are `adafocus-bench`'s, the thresholds the export's calibrated default or
`--thresholds`. Refused where there is nothing to hide or CPUID cannot be made to fault.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from adafocus.bench import bench_videos, timed_in_turns
from adafocus.builtin import demo_export
from adafocus.export.graphs import DENSE
from adafocus.export.manifest import open_export
from adafocus.files import dumps, write_json
from adafocus.machine import cpu_flags, cpu_record, hidden_flags, package_versions
from adafocus.runtime.backends import make_backend
from adafocus.runtime.runtime import Runtime

AS_AVX2_CPU = Path(__file__).resolve().parents[1] / "scripts" / "as_avx2_cpu.sh"
HIDDEN = {"amx": ("amx_int8", "amx_tile"), "avx512": ("avx512f", "avx512bw", "avx512_vnni", "avx_vnni")}
SIDES = ("native", "hidden")


def measure(args) -> dict:
    """One process's side: seconds per method (median of the timed runs), and what CPU it saw."""
    export = open_export(args.export) if args.export else demo_export()
    videos = bench_videos(export, args.batch).numpy()
    runtime = Runtime.load(export.path, "onnxruntime", threads=args.threads, precision=args.precision)
    if args.thresholds:
        runtime.set_thresholds([float(t) for t in args.thresholds.split(",")])
    dense = make_backend(export, "onnxruntime", graphs=(DENSE,), threads=args.threads, precision=args.precision)
    methods = {"adaptive": lambda: runtime.predict(videos), "dense": lambda: dense.run(DENSE, {"videos": videos})}
    seconds = timed_in_turns(methods, args.repeats, seed=0, warmup=2, log=lambda line: None)
    exits = runtime.predict(videos).exit_step
    return {
        "seconds": {name: statistics.median(s) for name, s in seconds.items()},
        "exits_per_step": np.bincount(exits, minlength=export.preset.num_exits).tolist(),
        "machine": cpu_record(),
    }


def run_side(side: str, args) -> dict:
    command = [sys.executable, __file__, args.hide, *([args.export] if args.export else []), "--child"]
    for option in ("precision", "batch", "threads", "repeats", "thresholds"):
        if getattr(args, option) is not None:
            # one `--option=value` word: as two, a value starting with "-" (thresholds "-inf,...") reads
            # to argparse as another option, and the child refused it
            command.append(f"--{option}={getattr(args, option)}")
    if side == "hidden":
        command = ["bash", str(AS_AVX2_CPU), *(["--amx-only"] if args.hide == "amx" else []), *command]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8")
    if done.returncode == 3 and side == "hidden":
        sys.exit(f"error: this machine cannot hide CPU features: {done.stderr.strip()}")
    if done.returncode != 0:
        sys.exit(f"error: the {side} process failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hide", choices=sorted(HIDDEN), help="what the hidden side does not see")
    parser.add_argument("export", nargs="?", help="export directory (default: the built-in demo's)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="int8", help="which graphs are timed")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each one process per side")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method in each process")
    parser.add_argument("--thresholds", default=None, help="K+1 comma-separated exit thresholds")
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    # what this process sees: under scripts/as_avx2_cpu.sh itself, its "native" side would not be
    if not any(f in (cpu_flags() or []) for f in HIDDEN[args.hide]):
        hidden = f"; hidden from this process: {', '.join(hidden_flags())}" if hidden_flags() else ""
        sys.exit(f"error: this CPU has none of {', '.join(HIDDEN[args.hide])} to hide (it has: {cpu_flags()}{hidden})")
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            results[side].append(run_side(side, args))
            seconds = results[side][-1]["seconds"]
            print(f"round {r + 1}/{args.rounds} {side}: " + ", ".join(f"{m} {s:.3f} s" for m, s in seconds.items()))
    if results["native"][0]["exits_per_step"] != results["hidden"][0]["exits_per_step"]:
        print("note: the two sides' exits differ (the kernels' integer or float results differ)")
    methods = list(results["native"][0]["seconds"])
    pairs = list(zip(results["native"], results["hidden"]))
    report = {
        "hide": args.hide,
        "export": args.export,
        "precision": args.precision,
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "thresholds": args.thresholds,
        "videos_per_s": {
            side: {m: args.batch / statistics.median(p["seconds"][m] for p in results[side]) for m in methods}
            for side in SIDES
        },
        # > 1: the features the other side hides make that method faster
        "speedup": {m: statistics.median(h["seconds"][m] / n["seconds"][m] for n, h in pairs) for m in methods},
        "exits_per_step": {side: results[side][0]["exits_per_step"] for side in SIDES},
        "machine": {side: results[side][0]["machine"] for side in SIDES},
        "seconds": {side: [p["seconds"] for p in results[side]] for side in SIDES},
        "versions": package_versions(),
    }
    print(dumps({k: report[k] for k in ("videos_per_s", "speedup", "exits_per_step")}))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
