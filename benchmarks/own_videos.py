"""The built-in demo calibrated from real encoded video files against the same videos as tensors,
decoding throughput, and INT8 with activation ranges recorded on files.

    python benchmarks/own_videos.py --videos 1000 --out benchmarks/results/own-videos-demo.json

Writes `--videos` val and test videos of the synthetic task with `adafocus synth` (lossless files)
into a temporary folder, then:
1. decoding: videos/s of `DecodedBatches` (the reader every command uses) with 1 and 2 decoder
   threads on 300 of the files, and where one video's time goes (container frame count, decode + crop, normalisation);
2. calibration of a copy of the demo export from the files (`adafocus-calibrate --data --heldout`)
   and from the same videos as uint8-rounded tensors, both solvers' fronts with held-out figures;
3. INT8: ranges from 128 val files (`--int8 --int8-data`), fp32-vs-int8 agreement on the test files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from adafocus.builtin import demo_export
from adafocus.calibration.calibrate import calibrate_export
from adafocus.cli import calibrate, main
from adafocus.data.labelled import DecodedBatches, read_labelled
from adafocus.data.synthetic import SyntheticTask
from adafocus.data.video import _count_frames, _decode_indices, to_model_input, tsn_indices
from adafocus.files import dumps, write_json
from adafocus.machine import cpu_record
from adafocus.model.preprocess import normalize
from adafocus.weights import builtin_checkpoint


def tensors(split: str, count: int, preset):
    task = SyntheticTask(preset, seed=0)
    raw = [task.raw_video(split, i) for i in range(count)]
    videos = np.stack([normalize(np.rint(v * 255) / 255) for v, _ in raw]).astype(np.float32)
    return videos, np.array([info.label for _, info in raw])


def decoding(listing: Path, export, count: int) -> dict:
    videos = read_labelled(listing, export.class_names)
    videos = dataclasses.replace(videos, paths=videos.paths[:300], labels=videos.labels[:300])
    rates: dict[int, list[float]] = {1: [], 2: []}
    for workers in (2, 1, 2, 1):  # alternating, so that a change in load hits both; medians kept
        started = time.perf_counter()
        used = sum(len(labels) for _, labels in DecodedBatches(videos, export.preset, workers=workers, progress=False))
        rates[workers].append(used / (time.perf_counter() - started))
    rows = {f"{w}_workers_videos_per_s": statistics.median(r) for w, r in rates.items()}
    preset, stages = export.preset, {"count_frames": [], "decode_and_crop": [], "normalise": []}
    for path in videos.paths[:100]:
        t0 = time.perf_counter()
        claimed, _ = _count_frames(path)
        t1 = time.perf_counter()
        indices = tsn_indices(claimed, preset.num_frames)
        kept, *_ = _decode_indices(path, indices, preset.frame_size, preset.resize_shorter_side)
        t2 = time.perf_counter()
        to_model_input(np.stack([kept[i].numpy() for i in indices]))
        t3 = time.perf_counter()
        for stage, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
            stages[stage].append(seconds)
    rows["ms_per_video_one_thread"] = {stage: 1000 * statistics.median(s) for stage, s in stages.items()}
    return rows


def front(table: list[dict]) -> list[dict]:
    keys = ("gflops", "accuracy", "heldout_gflops", "heldout_accuracy", "solver")
    return [{k: e.get(k) for k in keys} for e in table]


def main_(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=1000, help="videos per split")
    parser.add_argument("--out", type=Path, default=None, help="write the report here (JSON)")
    args = parser.parse_args(argv)
    export = demo_export()
    report = {"videos_per_split": args.videos, "checkpoint": builtin_checkpoint().name, "machine": cpu_record()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        for split in ("val", "test"):
            result = CliRunner().invoke(
                main, ["synth", "--split", split, "--videos", str(args.videos), "--out", str(root / split)]
            )
            assert result.exit_code == 0, result.output
        report["synth_seconds"] = time.perf_counter() - started
        report["decoding"] = decoding(root / "val" / "labels.txt", export, args.videos)
        print(json.dumps(report["decoding"]))

        files, as_tensors = (Path(shutil.copytree(export.path, root / name)) for name in ("files", "tensors"))
        argv_ = [str(files), "--data", str(root / "val/labels.txt"), "--heldout", str(root / "test/labels.txt")]
        argv_ += ["--int8", "--int8-data", str(root / "val/labels.txt"), "--json"]
        started = time.perf_counter()
        result = CliRunner().invoke(calibrate, argv_)
        assert result.exit_code == 0, result.output
        from_files = json.loads(result.stdout)
        report["calibrate_from_files_seconds"] = time.perf_counter() - started
        preset = export.preset
        from_tensors = calibrate_export(
            as_tensors, tensors("val", args.videos, preset), tensors("test", args.videos, preset), progress=False
        ).to_dict()
        report["from_files"] = {name: front(t) for name, t in from_files["fronts"].items()}
        report["from_tensors"] = {name: front(t) for name, t in from_tensors["fronts"].items()}
        report["fixed_cubes_heldout"] = from_files["baselines"]["fixed_cubes"]
        report["heldout_accuracy_per_step"] = {
            "files": from_files["heldout_accuracy_per_step"],
            "tensors": from_tensors["heldout_accuracy_per_step"],
        }
        report["int8_from_files"] = {k: from_files["int8"][k] for k in ("heldout", "speed", "calibration_videos")}
    print(dumps(report))
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main_()
