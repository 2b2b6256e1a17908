"""Realisation measured paired: the adaptive loop of one or more exports and the dense graph timed
in turns, in one process, so that every figure sees the same load.

    python benchmarks/paired_realisation.py --out benchmarks/results/paired-realisation-demo.json
    python benchmarks/paired_realisation.py OLD_EXPORT NEW_EXPORT --rounds 15

`adafocus-bench` times its methods one after another (all adaptive repeats, then all dense ones),
which it must for the paper presets (the sessions of both at batch 128 do not fit in memory
together). On the shared development machines the load changes within a minute, and the ratio of
two blocks timed a minute apart moves with it (the main job's realisation read 0.38-0.61 in five
runs in a row). Here each round runs every export's `Runtime.predict` and the first export's dense
graph once; `realisation` and `paired_speedup` (each export against the first) are computed per
round and their medians reported, `videos_per_s` are the medians of each method's times. When the
load switches between levels during a run, the ratio of two medians can fall in different levels;
the per-round figures cannot.

Without EXPORT_DIRs: the built-in demo's export (built and calibrated once, cached). All exports
must be of one preset; the videos are `adafocus-bench`'s (the synthetic task), the thresholds each
export's own calibrated default.
"""

from __future__ import annotations

import argparse
import statistics
import time

from adafocus.bench import bench_videos
from adafocus.builtin import demo_export
from adafocus.export.manifest import open_export
from adafocus.files import dumps, write_json
from adafocus.machine import cpu_record, package_versions
from adafocus.runtime.backends import make_backend
from adafocus.runtime.runtime import Runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="*", help="export directories (default: the built-in demo's)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (each runs every method once)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args()

    paths = args.exports or [demo_export().path]
    exports = [open_export(p) for p in paths]
    first = exports[0]
    if any(e.preset.name != first.preset.name for e in exports):
        parser.error("all exports must be of one preset")
    videos = bench_videos(first, args.batch).numpy()

    methods, gflops = {}, {}
    for i, export in enumerate(exports):
        runtime = Runtime.load(export.path, "onnxruntime", threads=args.threads)
        name = f"adaptive[{i}]"
        gflops[name] = float(runtime.predict(videos).gflops.mean())  # also the warm-up
        methods[name] = lambda runtime=runtime: runtime.predict(videos)
    dense = make_backend(first, "onnxruntime", threads=args.threads, graphs=("dense",))
    methods["dense"] = lambda: dense.run("dense", {"videos": videos})
    methods["dense"]()
    gflops["dense"] = first.dense_gflops

    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.rounds):
        for name, run in methods.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
        print(f"round {r + 1}/{args.rounds}", flush=True)

    per_s = {name: args.batch / statistics.median(s) for name, s in seconds.items()}
    report = {
        "exports": [str(e.path) for e in exports],
        "preset": first.preset.name,
        "batch": args.batch,
        "rounds": args.rounds,
        "threads": args.threads,
        "videos_per_s": per_s,
        "gflops_per_video": gflops,
        # per round, then the median: the load moves between rounds, not within one
        "realisation": {
            name: statistics.median(
                (d / a) / (gflops["dense"] / gflops[name]) for a, d in zip(seconds[name], seconds["dense"])
            )
            for name in methods
            if name != "dense"
        },
        "paired_speedup": {
            name: statistics.median(a / b for a, b in zip(seconds["adaptive[0]"], seconds[name]))
            for name in methods
            if name.startswith("adaptive")
        },
        "seconds": seconds,
        "machine": cpu_record(),
        "versions": package_versions(),
    }
    print(dumps({k: report[k] for k in ("videos_per_s", "realisation", "paired_speedup")}))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
