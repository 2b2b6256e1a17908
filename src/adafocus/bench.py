"""adafocus-bench: videos/s of adaptive inference against the dense baseline, measured in one run on
the same backend, plus the PyTorch-eager reference loop.

    report = run(export, ["onnxruntime"], batch=128)     # a dict: strict JSON
    json_file, png_file = write(report, "adafocus-results")
    print(format_report(report))

Method (per backend): `warmup` untimed runs, then `repeats` timed runs of each method on the same
videos (one batch, or `videos` of them in batches of `batch`); medians and spread are reported. Two
warm-ups by default: ONNX Runtime plans the memory of a new input shape on its first run and
allocates that plan, touching fresh pages, on the second (the demo's dense graph at batch 128: ~90k
page faults and 4x a steady run's time there, none after), so with one warm-up the first timed run
is a warm-up too and p99 reports it.

The realisation says how much of the compute saving turns into speed: (adaptive videos/s ÷ dense
videos/s) ÷ (dense GFLOPs ÷ adaptive GFLOPs); 1.0 means time scales exactly with GFLOPs.
"""

from __future__ import annotations

import gc
import math
import os
import random
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from adafocus.calibration.calibrate import collect
from adafocus.calibration.thresholds import thresholds_for_budget, thresholds_from_json, thresholds_to_json
from adafocus.data.synthetic import SyntheticTask
from adafocus.errors import AdaFocusError
from adafocus.export.graphs import DENSE
from adafocus.export.manifest import Export
from adafocus.figures import new_figure, save_png
from adafocus.files import write_json
from adafocus.machine import cpu_record, package_versions
from adafocus.model.numerics import strict_fp32
from adafocus.model.reference import adaptive_inference
from adafocus.runtime import Runtime
from adafocus.runtime.backends import make_backend
from adafocus.runtime.runtime import budget_entry

STREAM_BATCHES = 4  # the streaming mode runs this many batches of videos, so refilling matters


def machine() -> dict:
    """Where a report was measured. The CPU's vector flags are part of it: the development machines
    change between AVX2-only and AVX-512 CPUs, which rank the graphs differently."""
    return {
        **cpu_record(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        **package_versions(),
    }


def run(
    export: Export,
    backends: Sequence[str] = ("onnxruntime",),
    *,
    batch: int = 128,
    videos: int | None = None,
    repeats: int = 5,
    warmup: int = 2,
    threads: int | None = None,
    thresholds: Sequence[float] | None = None,
    budget: float | None = None,
    precision: str | None = None,
    device: str | None = None,
    reference: bool = True,
    max_call_gflops: float | None | str = "default",
    call_workers: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The whole benchmark of `export` on each of `backends`: one report, strict JSON.
    `max_call_gflops`: the backends' bound on one graph call ("default": theirs; None: no bound);
    `call_workers`: ONNX Runtime's parts of a call run at once on the CPU (None: its default).
    `videos`: how many videos are timed, in batches of `batch` (None: one batch). An adaptive method's
    compute depends on which videos come, so a small batch alone is a small sample of it."""
    count = batch if videos is None else videos
    if count % batch:
        raise AdaFocusError(
            f"{count} videos do not make whole batches of {batch}", f"give a multiple of {batch} videos"
        )
    others = [b for b in backends if b != "onnxruntime"]
    if call_workers is not None and others:
        raise AdaFocusError(
            f"call_workers is ONNX Runtime's setting, not {' or '.join(others)}'s (they run a call's parts in turn)",
            "benchmark those backends without it",
        )
    export.graph(DENSE)  # the baseline of every ratio: an export made with --no-dense is refused before any work
    chosen, how = choose_thresholds(export, thresholds, budget, count, device or "cpu")
    log(f"preset {export.preset.name}, {count} videos in batches of {batch}, {repeats} runs after {warmup} warm-up")
    log(f"thresholds {', '.join(f'{t:.4g}' for t in chosen)} ({how})")
    timed = bench_videos(export, count)
    options = {"repeats": repeats, "warmup": warmup, "threads": threads, "precision": precision, "device": device}
    options |= {"max_call_gflops": max_call_gflops, "call_workers": call_workers}
    return {
        "preset": export.preset.name,
        "export": str(export.path),
        "batch": batch,
        "videos": count,
        "thresholds": thresholds_to_json(chosen),  # ±1e9 for ±inf: JSON has no infinities
        "thresholds_from": how,
        "precision": precision or "backend default",
        "inputs_on_device": True,
        "machine": machine(),
        "backends": [
            bench_backend(export, name, timed, chosen, batch=batch, reference=reference, log=log, **options)
            for name in backends
        ],
    }


def choose_thresholds(export: Export, thresholds, budget, count: int, device: str = "cpu") -> tuple[list[float], str]:
    """The thresholds to benchmark with, and how they were chosen: given; the calibrated entry for a
    budget; solved for a budget on generated videos (exports without a table); or the export's own."""
    k1 = export.preset.num_exits
    if thresholds is not None and budget is not None:
        raise AdaFocusError("give thresholds or a budget, not both")
    if thresholds is not None:
        if len(thresholds) != k1:
            raise AdaFocusError(f"{export.preset.name!r} needs {k1} thresholds (steps 0..{k1 - 1})")
        return [float(t) for t in thresholds], "given with --thresholds"
    if budget is not None and export.budgets:
        entry = budget_entry(export, budget)
        return thresholds_from_json(
            entry["thresholds"]
        ), f"calibrated entry {entry['gflops']:.4f} GFLOPs for budget {budget}"
    if budget is not None:
        videos = bench_videos(export, count, seed=1)  # not the videos that are timed
        outputs = collect(
            export, videos, torch.zeros(count, dtype=torch.int64), desc="solving for the budget", device=device
        )
        values, realised = thresholds_for_budget(outputs.entropy, export.exit_gflops, budget)
        return values, f"solved for budget {budget} on {count} generated videos ({realised:.3f} GFLOPs there)"
    if export.thresholds is None:
        return [-math.inf] * k1, "none calibrated: every video uses all cubes"
    return thresholds_from_json(export.thresholds), "the export's default (calibrated) thresholds"


def bench_videos(export: Export, count: int, seed: int = 0) -> torch.Tensor:
    """Generated videos of the export's shape (the synthetic task: structured content, not noise)."""
    videos, _ = SyntheticTask.for_preset(export.preset, seed=seed).batch("test", range(count))
    return videos


def bench_backend(
    export: Export,
    backend: str,
    videos: torch.Tensor,
    thresholds: list[float],
    *,
    batch: int | None = None,
    repeats: int,
    warmup: int,
    threads: int | None,
    precision: str | None = None,
    device: str | None = None,
    max_call_gflops: float | None | str = "default",
    call_workers: int | None = None,
    reference: bool,
    log: Callable[[str], None],
) -> dict:
    """All methods on one backend, on the same videos, in batches of `batch` (None: one batch). The
    videos are moved to the backend's device once, before timing: the figure is the device's
    throughput, not the host-to-device copy's. Times are per batch."""
    options = {"threads": threads} if backend == "onnxruntime" and threads else {}
    if call_workers is not None:
        options["call_workers"] = call_workers
    if max_call_gflops != "default":
        options["max_call_gflops"] = max_call_gflops
    runtime = Runtime.load(export.path, backend, device, precision=precision, **options)
    runtime.set_thresholds(thresholds)
    batches = videos.to(runtime.backend.device).split(batch or len(videos))
    methods = _adaptive_methods(runtime, batches, repeats, warmup, log)
    _, profile = runtime.profile_predict(batches[0])
    peak = {"after_adaptive": _peak_rss_mib()}  # the process's high-water mark so far
    described, settings = runtime.backend.describe(), runtime.backend.settings
    # each method's sessions and memory arenas go before the next starts: at batch 128 of a paper
    # preset they hold several GB each
    runtime = None
    gc.collect()
    log(f"[{backend}] dense baseline")
    methods["dense"] = _dense_method(export, backend, settings, batches, repeats, warmup)
    peak["after_dense"] = _peak_rss_mib()
    gc.collect()
    if settings["precision"] == "int8":  # the same batch in fp32 beside it, in the same run
        log(f"[{backend}] adaptive and dense in fp32, beside int8")
        methods |= _fp32_methods(export, backend, settings, batches, thresholds, repeats, warmup)
        peak["after_fp32"] = _peak_rss_mib()
        gc.collect()
    if reference:
        log(f"[{backend}] PyTorch-eager reference loop")
        methods["torch_eager"] = _eager_method(export, batches, thresholds, settings["precision"], repeats, warmup)
    a, d = methods["adaptive"], methods["dense"]
    report = {
        "backend": described,
        "batch": len(batches[0]),
        "videos": len(videos),
        "videos_per_s": {name: m["videos_per_s"] for name, m in methods.items()},
        "gflops_per_video": {name: m["gflops_per_video"] for name, m in methods.items()},
        "realisation": (a["videos_per_s"] / d["videos_per_s"]) / (d["gflops_per_video"] / a["gflops_per_video"]),
        "loop_overhead": profile["host_loop_share"],
        "speedup_vs_torch_eager": a["videos_per_s"] / methods["torch_eager"]["videos_per_s"] if reference else None,
        "seconds_per_stage": profile["seconds"],
        "exits_per_step": a["exits_per_step"],
        "methods": methods,
        "max_call_gflops": described["max_call_gflops"],
        "call_cache_mib": described["call_cache_mib"],
        "call_workers": described["call_workers"],
        "peak_rss_mib": _peak_rss_mib(),
        "peak_rss_mib_by_stage": peak,
    }
    if "adaptive_fp32" in methods:
        rate = report["videos_per_s"]
        report["int8"] = {
            "dense_precision": methods["dense"]["precision"],
            "adaptive_int8_vs_dense_fp32": rate["adaptive"] / rate["dense_fp32"],
            "adaptive_int8_vs_adaptive_fp32": rate["adaptive"] / rate["adaptive_fp32"],
            "adaptive_fp32_vs_dense_fp32": rate["adaptive_fp32"] / rate["dense_fp32"],
            "dense_int8_vs_dense_fp32": rate["dense"] / rate["dense_fp32"]
            if methods["dense"]["precision"] == "int8"
            else None,
        }
    if batches[0].device.type == "cuda":
        report["peak_cuda_mib"] = torch.cuda.max_memory_allocated(batches[0].device) / 2**20
    return report


def _adaptive_methods(runtime: Runtime, batches, repeats: int, warmup: int, log) -> dict[str, dict]:
    name, batch, sync = runtime.backend.name, len(batches[0]), runtime.backend.synchronize
    log(f"[{name}] adaptive, per-batch mode")
    adaptive = _per_batch_method(runtime, batches, repeats, warmup)
    gflops = adaptive["gflops_per_video"]
    # Whole passes over the same videos, at least STREAM_BATCHES batches' worth so that slots freed by
    # exits get refilled: the streamed videos then exit as in per-batch mode, so its GFLOPs hold for them
    passes = -(-STREAM_BATCHES // len(batches))
    rounds = passes * len(batches)
    log(f"[{name}] adaptive, streaming mode ({rounds} batches' worth through a pool of {batch})")
    # one video per item (as a decoder hands them over: each is copied into the staging batch), then
    # the same videos a batch per item (as a DataLoader yields them: admitted as views, no copy)
    single = [video for part in batches for video in part] * passes
    whole = list(batches) * passes
    methods = {"adaptive": adaptive}
    for method, items in (("adaptive_stream", single), ("adaptive_stream_batches", whole)):
        seconds = _timed(lambda items=items: list(runtime.stream(iter(items), batch_size=batch)), repeats, warmup, sync)
        methods[method] = _summary([s / rounds for s in seconds], batch, gflops)
    return methods


def _per_batch_method(runtime: Runtime, batches, repeats: int, warmup: int) -> dict:
    """`Runtime.predict` on each batch in turn, timed (seconds per batch); with the compute and the
    exits of an untimed run."""
    results = [runtime.predict(videos) for videos in batches]

    def every_batch():
        for videos in batches:
            runtime.predict(videos)

    seconds = _timed(every_batch, repeats, warmup, runtime.backend.synchronize)
    gflops = float(np.concatenate([r.gflops for r in results]).mean())
    method = _summary([s / len(batches) for s in seconds], len(batches[0]), gflops)
    exits = np.concatenate([r.exit_step for r in results])
    method["exits_per_step"] = np.bincount(exits, minlength=runtime.preset.num_exits).tolist()
    return method


def _dense_method(export: Export, backend: str, settings: dict, batches, repeats: int, warmup: int) -> dict:
    """The dense graph on the same kind of backend (same device, provider and binding); an int8 run's
    baseline is the int8 dense graph where the export has one (`adafocus-calibrate --int8-graphs`),
    else fp32."""
    precision = settings["precision"]
    if precision == "int8" and "int8" not in export.graph(DENSE).variants:
        precision = "fp32"
    dense = make_backend(export, backend, **(settings | {"precision": precision, "graphs": (DENSE,)}))

    def every_batch():
        for videos in batches:
            dense.run(DENSE, {"videos": dense.videos(videos)})

    seconds = _timed(every_batch, repeats, warmup, dense.synchronize)
    return _summary([s / len(batches) for s in seconds], len(batches[0]), export.dense_gflops) | {
        "precision": precision
    }


def _fp32_methods(export: Export, backend: str, settings: dict, batches, thresholds, repeats: int, warmup: int):
    """Adaptive (per batch, same thresholds) and dense in fp32: what an int8 run is compared with."""
    fp32 = settings | {"precision": "fp32"}
    runtime = Runtime(export, make_backend(export, backend, **fp32))
    runtime.set_thresholds(thresholds)
    adaptive = _per_batch_method(runtime, batches, repeats, warmup) | {"precision": "fp32"}
    runtime = None
    gc.collect()
    return {"adaptive_fp32": adaptive, "dense_fp32": _dense_method(export, backend, fp32, batches, repeats, warmup)}


def _eager_method(export: Export, batches, thresholds, precision: str, repeats: int, warmup: int) -> dict:
    """The PyTorch reference loop, in the backend's arithmetic (fp16 autocast for an fp16 GPU run; fp32
    for an int8 run). Its compute is that of its own exits: in another arithmetic than the backend's
    (fp32 beside int8, fp16 autocast) videos can exit at other steps."""
    device = batches[0].device
    model = export.load_model().to(device)
    fp16 = precision == "fp16" and device.type == "cuda"
    spent: list[torch.Tensor] = []  # each video's GFLOPs in the last timed run

    def eager():
        spent.clear()
        with strict_fp32(), torch.autocast("cuda", torch.float16, enabled=fp16):
            for videos in batches:
                spent.append(adaptive_inference(model, videos, thresholds).gflops)

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    seconds = _timed(eager, repeats, warmup, sync)
    gflops = float(torch.cat(spent).mean())
    return _summary([s / len(batches) for s in seconds], len(batches[0]), gflops)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_in_turns(
    methods: dict[str, Callable[[], object]],
    rounds: int,
    seed: int,
    warmup: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, list[float]]:
    """Seconds of each method per round, for paired comparisons (benchmarks/paired_*.py): `warmup`
    untimed runs of each, then `rounds` rounds that run every method once in a new random order
    (seeded), so that a change of the machine's load falls on all methods of a round alike and
    per-round ratios see through it."""
    for run in methods.values():
        for _ in range(warmup):
            run()
    order = random.Random(seed)
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(rounds):
        for name in order.sample(list(methods), len(methods)):
            started = time.perf_counter()
            methods[name]()
            seconds[name].append(time.perf_counter() - started)
        log(f"round {r + 1}/{rounds}")
    return seconds


def _timed(fn: Callable[[], object], repeats: int, warmup: int, sync: Callable[[], None]) -> list[float]:
    for _ in range(warmup):
        fn()
        sync()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - started)
    return seconds


def _summary(seconds: list[float], videos: int, gflops: float) -> dict:
    ms = sorted(1e3 * s for s in seconds)
    return {
        "videos_per_s": videos / statistics.median(seconds),
        "ms_per_batch_p50": statistics.median(ms),
        "ms_per_batch_p99": float(np.percentile(ms, 99)),
        "ms_per_batch_min": ms[0],
        "ms_per_batch_max": ms[-1],
        "runs": len(seconds),
        "gflops_per_video": gflops,
    }


# the report ---------------------------------------------------------------------------------------
def default_name(report: dict) -> str:
    """bench-PRESET-BACKENDS[-DEVICE][-PRECISION].json"""
    names = "-".join(b["backend"]["backend"] for b in report["backends"])
    device = str(report["backends"][0]["backend"]["device"]).split(":")[0] if report["backends"] else "cpu"
    suffix = (f"-{device}" if device != "cpu" else "") + (
        f"-{report['precision']}" if report["precision"] != "backend default" else ""
    )
    return f"bench-{report['preset']}-{names}{suffix}.json"


def write(report: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """The report as JSON and a PNG beside it; `out` a folder (default file name) or a .json file."""
    path = Path(out)
    if path.suffix != ".json":
        path = path / default_name(report)
    write_json(path, report)
    return path, plot_report(report, path.with_suffix(".png"))


def plot_report(report: dict, path: Path) -> Path:
    rows = [
        (b["backend"]["backend"], name, b["videos_per_s"][name], b["gflops_per_video"][name])
        for b in report["backends"]
        for name in b["videos_per_s"]
    ]
    fig, (left, right) = new_figure(figsize=(11, 4), dpi=110, cols=2)
    labels = [f"{backend}\n{name}" for backend, name, _, _ in rows]
    left.bar(labels, [r[2] for r in rows], color="tab:blue")
    left.set_ylabel("videos / s")
    left.set_title(f"throughput, batch {report['batch']}{_over(report)}")
    right.bar(labels, [r[3] for r in rows], color="tab:orange")
    right.set_ylabel("GFLOPs / video")
    right.set_title("compute")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=7, rotation=45)
    on_gpu = any(str(b["backend"]["device"]).startswith(("cuda", "tensorrt")) for b in report["backends"])
    fig.suptitle(f"{report['preset']} — {report['machine']['gpu'] if on_gpu else report['machine']['cpu']}")
    fig.tight_layout()
    return save_png(fig, path)


def _over(report: dict) -> str:
    videos = report.get("videos", report["batch"])  # reports before `videos` timed one batch
    return f" ({videos} videos)" if videos != report["batch"] else ""


def format_report(report: dict) -> str:
    """The report as the table the command prints."""
    lines = []
    for r in report["backends"]:
        lines.append(f"\n{r['backend']['backend']} ({r['backend']['device']}), batch {report['batch']}{_over(report)}")
        lines.append(f"  {'method':<23} {'videos/s':>9} {'ms/batch p50':>13} {'p99':>9} {'GFLOPs/video':>13}")
        for name, m in r["methods"].items():
            lines.append(
                f"  {name:<23} {m['videos_per_s']:9.1f} {m['ms_per_batch_p50']:13.1f} "
                f"{m['ms_per_batch_p99']:9.1f} {m['gflops_per_video']:13.4f}"
            )
        speedup = r["speedup_vs_torch_eager"]
        lines.append(
            f"  realisation {r['realisation']:.2f}   loop overhead {100 * r['loop_overhead']:.1f} %   "
            + (f"speed-up vs torch eager {speedup:.2f}×   " if speedup else "")
            + "exits per step "
            + "/".join(str(e) for e in r["exits_per_step"])
        )
        if int8 := r.get("int8"):
            dense = int8["dense_int8_vs_dense_fp32"]
            lines.append(
                f"  int8: adaptive {int8['adaptive_int8_vs_dense_fp32']:.2f}× dense fp32, "
                f"{int8['adaptive_int8_vs_adaptive_fp32']:.2f}× adaptive fp32; "
                + (
                    f"dense int8 {dense:.2f}× dense fp32"
                    if dense
                    else "no int8 dense graph (adafocus-calibrate --int8-graphs ...,dense)"
                )
            )
    return "\n".join(lines)
