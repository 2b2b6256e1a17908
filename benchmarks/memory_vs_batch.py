"""Peak resident memory against batch size: the adaptive loop and the dense baseline, each in a
process of its own (a process's high-water mark cannot be reset), ONNX Runtime on the CPU.

    python benchmarks/memory_vs_batch.py [--preset sthsth-v1] [--batches 16,32,64,128] [--out FILE.json]

Every graph call is bounded by the backend's `max_call_gflops` (150 GMACs on the CPU by default):
what lets batch 128 of a paper preset run on a 24 GB machine. `--max-call-gflops 0` turns the bound
off (one call per graph and batch) to show what it saves; `--call-cache-mib 0` turns off the other
bound, parts whose largest tensor stays near 8 MiB (one video a part for a paper preset).
Thresholds: those recorded in benchmarks/results/bench-sthsth-v1-t12-onnxruntime.json (solved for
14 GFLOPs/video), so that no calibration runs in the measured process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

CHILD = r"""
import json, sys, time
from adafocus import bench
from adafocus.builtin import random_export
from adafocus.export.graphs import DENSE
from adafocus.runtime import Runtime
from adafocus.runtime.backends import make_backend

preset, method = sys.argv[1], sys.argv[3]
batch, limit, thresholds = int(sys.argv[2]), float(sys.argv[4]), json.loads(sys.argv[5])
cache = float(sys.argv[6])
export = random_export(preset)
videos = bench.bench_videos(export, batch).numpy()
options = {"threads": 2, "max_call_gflops": None if limit == 0 else limit}
options["call_cache_mib"] = None if cache == 0 else cache
def status(key):  # /proc: VmHWM is this program's own peak (ru_maxrss would include the parent's at fork)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
before = status("VmRSS:")
started = time.perf_counter()
if method == "adaptive":
    runtime = Runtime.load(export.path, "onnxruntime", **options)
    runtime.set_thresholds(thresholds)
    result = runtime.predict(videos)
    gflops = float(result.gflops.mean())
else:
    dense = make_backend(export, "onnxruntime", graphs=(DENSE,), **options)
    dense.run(DENSE, {"videos": videos})
    gflops = export.dense_gflops
seconds = time.perf_counter() - started
peak = status("VmHWM:")
print(json.dumps({"batch": batch, "method": method, "peak_rss_mib": peak, "rss_before_mib": before,
                  "videos_bytes_mib": videos.nbytes / 2**20, "seconds": seconds, "gflops_per_video": gflops}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sthsth-v1")
    parser.add_argument("--batches", default="16,32,64,128")
    parser.add_argument("--max-call-gflops", type=float, default=150.0, help="0: no bound")
    parser.add_argument("--call-cache-mib", type=float, default=8.0, help="0: no bound")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    recorded = json.loads((RESULTS / "bench-sthsth-v1-t12-onnxruntime.json").read_text(encoding="utf-8"))
    thresholds = recorded["thresholds"]
    from adafocus.builtin import random_export
    from adafocus.errors import AdaFocusError
    from adafocus.files import write_json
    from adafocus.machine import cpu_record, package_versions
    from adafocus.model import get_preset

    # the recorded thresholds are that preset's: any other preset's adaptive rows all failed (wrong
    # count of thresholds), and the run still ended "successfully" with a table of errors
    if get_preset(args.preset).name != recorded["preset"]:
        raise AdaFocusError(
            f"--preset {args.preset}: the thresholds this script uses were recorded for {recorded['preset']}",
            "give --preset sthsth-v1",
        )

    random_export(args.preset)  # exported (and cached) once, outside the measured processes
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for method in ("adaptive", "dense"):
            command = [
                sys.executable,
                "-c",
                CHILD,
                args.preset,
                str(batch),
                method,
                str(args.max_call_gflops),
                json.dumps(thresholds),
                str(args.call_cache_mib),
            ]
            done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8")
            if done.returncode != 0:  # kept in the report (a batch may not fit), and the run exits 1
                row = {"batch": batch, "method": method, "error": done.stderr.strip()[-600:]}
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "preset": args.preset,
        "backend": "onnxruntime, 2 threads",
        "max_call_gflops": args.max_call_gflops or None,
        "call_cache_mib": args.call_cache_mib or None,
        "thresholds": thresholds,
        "rows": rows,
        "machine": cpu_record(),
        "packages": package_versions(),
    }
    if args.out:
        write_json(args.out, report)
    if failed := [row for row in rows if "error" in row]:
        sys.exit(f"error: {len(failed)} of {len(rows)} measurements failed (their rows say why)")


if __name__ == "__main__":
    main()
