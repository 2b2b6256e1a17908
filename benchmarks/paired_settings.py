"""What a backend setting buys on the CPU: the adaptive loop (both modes) and the dense graph, each
with ONNX Runtime's default for the setting and with it off, timed in turns in one process.

    python benchmarks/paired_settings.py call_workers --out benchmarks/results/parallel-parts-demo.json
    python benchmarks/paired_settings.py call_cache_mib EXPORT_DIR --batch 32 --rounds 10
    python benchmarks/paired_settings.py call_workers EXPORT_DIR --precision int8 --thresholds 4.9,5.0,1e9

The settings (runtime/backends/base.py, onnxruntime.py): `call_cache_mib` cuts a graph call into
parts whose largest tensor stays near 8 MiB, so that a layer's output is still cached when the next
layer reads it, one row a part where fewer than two fit (off: None); `call_workers` runs those parts
at once, one per core in single-threaded sessions (off: 1, the parts in turn in one multi-threaded
session). Each round runs every method
once, in a new random order (seeded); `speedup` is the median over rounds of (time off ÷ time on)
per method, so that a change of the machine's load between rounds cancels out. `realisation` is
computed per round for both, as `benchmarks/paired_realisation.py` does. Without EXPORT_DIR: the
built-in demo's export; the videos are `adafocus-bench`'s, the thresholds the export's calibrated
default or `--thresholds`. `--precision int8` times the export's INT8 graphs (loop and dense).
"""

from __future__ import annotations

import argparse
import statistics

from adafocus.bench import bench_videos, timed_in_turns
from adafocus.builtin import demo_export
from adafocus.export.graphs import DENSE, GRAPH_NAMES
from adafocus.export.manifest import open_export
from adafocus.files import dumps, write_json
from adafocus.machine import cpu_record, package_versions
from adafocus.runtime.backends import make_backend
from adafocus.runtime.runtime import Runtime

OFF = {"call_cache_mib": None, "call_workers": 1}  # each setting's value when it is off
SETTINGS = ("on", "off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setting", choices=sorted(OFF), help="the backend setting compared")
    parser.add_argument("export", nargs="?", help="export directory (default: the built-in demo's)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (each runs every method once)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="of the methods' order in each round")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="which graphs are timed")
    parser.add_argument(
        "--thresholds", default=None, help="K+1 comma-separated exit thresholds (default: the export's calibrated ones)"
    )
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args()

    export = open_export(args.export) if args.export else demo_export()
    thresholds = None if args.thresholds is None else [float(t) for t in args.thresholds.split(",")]
    videos = bench_videos(export, args.batch).numpy()
    arrivals = list(bench_videos(export, 4 * args.batch, seed=1).numpy())  # streaming: separate arrays

    methods, counts, rows, gflops = {}, {}, {}, {}
    for setting in SETTINGS:
        chosen = {args.setting: OFF[args.setting]} if setting == "off" else {}
        common = {"threads": args.threads, "precision": args.precision} | chosen
        runtime = Runtime.load(export.path, "onnxruntime", **common)
        if thresholds is not None:
            runtime.set_thresholds(thresholds)
        dense = make_backend(export, "onnxruntime", graphs=(DENSE,), **common)
        rows[setting] = {g: runtime.backend.rows_per_call(g) for g in GRAPH_NAMES} | {DENSE: dense.rows_per_call(DENSE)}
        gflops["adaptive"] = float(runtime.predict(videos).gflops.mean())
        methods[f"adaptive/{setting}"] = lambda r=runtime: r.predict(videos)
        methods[f"streaming/{setting}"] = lambda r=runtime: sum(1 for _ in r.stream(iter(arrivals), args.batch))
        methods[f"dense/{setting}"] = lambda d=dense: d.run(DENSE, {"videos": videos})
        counts |= {f"adaptive/{setting}": args.batch, f"streaming/{setting}": 4 * args.batch}
        counts[f"dense/{setting}"] = args.batch
    gflops["dense"] = export.dense_gflops
    # two warm-ups: ONNX Runtime allocates a new shape's planned memory on its second run
    seconds = timed_in_turns(methods, args.rounds, args.seed, warmup=2, log=lambda line: print(line, flush=True))

    def per_round(f, *names):
        return statistics.median(f(*times) for times in zip(*(seconds[n] for n in names)))

    cost = gflops["dense"] / gflops["adaptive"]
    report = {
        "export": str(export.path),
        "preset": export.preset.name,
        "setting": args.setting,
        "precision": args.precision,
        "thresholds": thresholds,
        "batch": args.batch,
        "rounds": args.rounds,
        "threads": args.threads,
        "rows_per_call": rows,
        "videos_per_s": {name: counts[name] / statistics.median(s) for name, s in seconds.items()},
        "speedup": {
            m: per_round(lambda off, on: off / on, f"{m}/off", f"{m}/on") for m in ("adaptive", "streaming", "dense")
        },
        "realisation": {s: per_round(lambda a, d: (d / a) / cost, f"adaptive/{s}", f"dense/{s}") for s in SETTINGS},
        "gflops_per_video": gflops,
        "seconds": seconds,
        "machine": cpu_record(),
        "versions": package_versions(),
    }
    print(dumps({k: v for k, v in report.items() if k in ("rows_per_call", "videos_per_s", "speedup", "realisation")}))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
