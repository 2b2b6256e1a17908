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

The methods run in a new random order each round (seeded): with a fixed order, an A/A test of one
loop against itself read 0.95-0.965 on these machines (the method after the dense graph ran slower).

`--streaming` adds the two modes of the first export fed the same separate arrays (as videos
arrive from a decoder, `4 x --batch` of them): `per_batch_stacking` stacks each batch and calls
`predict`, `streaming` is `Runtime.stream`; `streaming_batches` streams the stacked batches
themselves, as a DataLoader yields them (admitted without a copy); `streaming_shares` gives their
per-round videos/s as shares of `per_batch` (`predict` on the same videos already stacked, batch by
batch), and `streaming_over_stacking` streaming's against `per_batch_stacking` (the same input).

Without EXPORT_DIRs: the built-in demo's export (built and calibrated once, cached). All exports
must be of one preset; the videos are `adafocus-bench`'s (the synthetic task), the thresholds each
export's own calibrated default.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from adafocus.bench import bench_videos, timed_in_turns
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
    parser.add_argument("--streaming", action="store_true", help="also time both modes on separate arrays")
    parser.add_argument("--seed", type=int, default=0, help="of the methods' order in each round")
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args()

    paths = args.exports or [demo_export().path]
    exports = [open_export(p) for p in paths]
    first = exports[0]
    if any(e.preset.name != first.preset.name for e in exports):
        parser.error("all exports must be of one preset")
    videos = bench_videos(first, args.batch).numpy()

    methods, gflops, counts = {}, {}, {}
    for i, export in enumerate(exports):
        runtime = Runtime.load(export.path, "onnxruntime", threads=args.threads)
        name = f"adaptive[{i}]"
        gflops[name] = float(runtime.predict(videos).gflops.mean())  # also the warm-up
        methods[name] = lambda runtime=runtime: runtime.predict(videos)
        counts[name] = args.batch
        if i == 0 and args.streaming:
            modes = _mode_methods(runtime, bench_videos(first, 4 * args.batch).numpy(), args.batch)
            methods |= modes
            counts |= dict.fromkeys(modes, 4 * args.batch)
    dense = make_backend(first, "onnxruntime", threads=args.threads, graphs=("dense",))
    methods["dense"] = lambda: dense.run("dense", {"videos": videos})
    counts["dense"] = args.batch
    gflops["dense"] = first.dense_gflops
    # two warm-ups: ONNX Runtime allocates a new shape's planned memory on its second run
    seconds = timed_in_turns(methods, args.rounds, args.seed, warmup=2, log=lambda line: print(line, flush=True))

    per_s = {name: counts[name] / statistics.median(s) for name, s in seconds.items()}
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
            if name.startswith("adaptive")
        },
        "paired_speedup": {
            name: statistics.median(a / b for a, b in zip(seconds["adaptive[0]"], seconds[name]))
            for name in methods
            if name.startswith("adaptive")
        },
        **(
            {
                "streaming_shares": {
                    name: statistics.median(p / m for p, m in zip(seconds["per_batch"], seconds[name]))
                    for name in ("per_batch_stacking", "streaming", "streaming_batches")
                }
                | {  # the two modes from the same separate arrays
                    "streaming_over_stacking": statistics.median(
                        p / m for p, m in zip(seconds["per_batch_stacking"], seconds["streaming"])
                    )
                }
            }
            if args.streaming
            else {}
        ),
        "seconds": seconds,
        "machine": cpu_record(),
        "versions": package_versions(),
    }
    shown = ("videos_per_s", "realisation", "paired_speedup", "streaming_shares")
    print(dumps({k: v for k, v in report.items() if k in shown}))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")


def _mode_methods(runtime: Runtime, videos: np.ndarray, batch: int) -> dict:
    """Both modes on the same videos: stacked already, and as separate arrays (one allocation each,
    as a decoder hands them over)."""
    separate = [np.array(v) for v in videos]
    chunks = [videos[i : i + batch] for i in range(0, len(videos), batch)]
    return {
        "per_batch": lambda: [runtime.predict(c) for c in chunks],
        "per_batch_stacking": lambda: [
            runtime.predict(np.stack(separate[i : i + batch])) for i in range(0, len(separate), batch)
        ],
        "streaming": lambda: list(runtime.stream(separate, batch_size=batch)),
        "streaming_batches": lambda: list(runtime.stream(chunks, batch_size=batch)),
    }


if __name__ == "__main__":
    main()
