"""adafocus-bench: videos/s of adaptive inference against the dense baseline, measured in one run on
the same backend, plus the PyTorch-eager reference loop.

Method (per backend): warm up, then `repeats` timed runs of each method on the same batch of videos;
medians and spread are reported. The realisation says how much of the compute saving turns into
speed: (adaptive videos/s ÷ dense videos/s) ÷ (dense GFLOPs ÷ adaptive GFLOPs); 1.0 means time
scales exactly with GFLOPs.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from adafocus.errors import AdaFocusError
from adafocus.export.graphs import DENSE, graph_specs
from adafocus.export.manifest import Export
from adafocus.files import write_json
from adafocus.model.checkpoint import load_checkpoint
from adafocus.model.reference import adaptive_inference
from adafocus.runtime import Runtime
from adafocus.runtime.backends import OnnxRuntimeBoundBackend, make_backend, strict_fp32

STREAM_BATCHES = 4  # the streaming mode runs this many batches of videos, so refilling matters


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    for dist in ("adafocus-deploy", "torch", "onnxruntime", "onnx", "numpy", "tensorrt"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return info


def _device_sync(device) -> Callable[[], None]:
    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


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
    median = statistics.median(seconds)
    return {
        "videos_per_s": videos / median,
        "ms_per_batch_p50": statistics.median(ms),
        "ms_per_batch_p99": float(np.percentile(ms, 99)),
        "ms_per_batch_min": ms[0],
        "ms_per_batch_max": ms[-1],
        "runs": len(seconds),
        "gflops_per_video": gflops,
    }


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_backend(
    export: Export,
    backend: str,
    videos: torch.Tensor,
    thresholds: list[float],
    *,
    repeats: int,
    warmup: int,
    threads: int | None,
    precision: str | None = None,
    device: str | None = None,
    reference: bool,
    log: Callable[[str], None],
) -> dict:
    """All methods on one backend, on the same batch. The videos are moved to the backend's device
    once, before timing: the figure is the device's throughput, not the host-to-device copy's."""
    if DENSE not in export.manifest["graphs"]:
        raise AdaFocusError(f"{export.path} has no dense baseline graph", "re-export it with this adafocus-deploy")
    options = {"threads": threads} if backend == "onnxruntime" and threads else {}
    if precision:
        options["precision"] = precision
    runtime = Runtime.load(export.path, backend, device, **options)
    runtime.set_thresholds(thresholds)
    sync = runtime.backend.synchronize
    batch = videos.shape[0]
    videos = videos.to(runtime.backend.device)
    methods: dict[str, dict] = {}

    log(f"[{backend}] adaptive, per-batch mode")
    result = runtime.predict(videos)
    adaptive_gflops = float(result.gflops.mean())
    seconds = _timed(lambda: runtime.predict(videos), repeats, warmup, sync)
    methods["adaptive"] = _summary(seconds, batch, adaptive_gflops)
    methods["adaptive"]["exits_per_step"] = np.bincount(result.exit_step, minlength=runtime.preset.num_exits).tolist()

    log(f"[{backend}] adaptive, streaming mode ({STREAM_BATCHES} batches' worth through a pool of {batch})")
    stream = [videos[i % batch] for i in range(STREAM_BATCHES * batch)]  # slots freed by exits get refilled
    seconds = _timed(lambda: list(runtime.stream(iter(stream), batch_size=batch)), repeats, warmup, sync)
    methods["adaptive_stream"] = _summary([s / STREAM_BATCHES for s in seconds], batch, adaptive_gflops)

    log(f"[{backend}] profile of the per-batch mode")
    profiled = Runtime(export, runtime.backend, profile=True)
    profiled.set_thresholds(thresholds)
    profiled.predict(videos)
    profile = profiled.profile_report()
    described = runtime.backend.describe()
    dense = _dense_runner(export, runtime.backend)
    sync = _device_sync(runtime.backend.device)
    # each method's sessions and memory arenas go before the next starts: at batch 128 of a paper
    # preset they hold several GB each
    runtime = profiled = None
    gc.collect()

    log(f"[{backend}] dense baseline")
    seconds = _timed(lambda: dense(videos), repeats, warmup, sync)
    methods["dense"] = _summary(seconds, batch, export.manifest["gflops"]["dense_baseline"])
    dense = None
    gc.collect()

    if reference:
        log(f"[{backend}] PyTorch-eager reference loop")
        model = load_checkpoint(export.path / export.manifest["pytorch"]).model.to(videos.device)
        fp16 = precision == "fp16" and videos.device.type == "cuda"  # the same arithmetic as the backend

        def eager():
            with strict_fp32(), torch.autocast("cuda", torch.float16, enabled=fp16):
                return adaptive_inference(model, videos, thresholds)

        seconds = _timed(eager, repeats, warmup, sync)
        methods["torch_eager"] = _summary(seconds, batch, adaptive_gflops)
        model = None

    a, d = methods["adaptive"], methods["dense"]
    report = {
        "backend": described,
        "batch": batch,
        "videos_per_s": {name: m["videos_per_s"] for name, m in methods.items()},
        "gflops_per_video": {name: m["gflops_per_video"] for name, m in methods.items()},
        "realisation": (a["videos_per_s"] / d["videos_per_s"]) / (d["gflops_per_video"] / a["gflops_per_video"]),
        "loop_overhead": profile["host_loop_share"],
        "speedup_vs_torch_eager": a["videos_per_s"] / methods["torch_eager"]["videos_per_s"] if reference else None,
        "seconds_per_stage": profile["seconds"],
        "exits_per_step": methods["adaptive"]["exits_per_step"],
        "methods": methods,
        "peak_rss_mib": _peak_rss_mib(),
    }
    if videos.device.type == "cuda":
        report["peak_cuda_mib"] = torch.cuda.max_memory_allocated(videos.device) / 2**20
    return report


def _dense_runner(export: Export, backend) -> Callable[[torch.Tensor], object]:
    """The dense graph on the same kind of backend; keeps no reference to `backend` itself, so the
    loop's sessions can be freed while it runs."""
    name, device, precision = backend.name, backend.device, getattr(backend, "precision", "fp32")
    if name == "onnxruntime":  # same provider, same binding; int8 has no dense graph, so fp32 there
        dense = make_backend(
            export,
            name,
            getattr(backend, "provider_device", "cpu"),
            threads=backend.threads,
            precision="fp32" if precision == "int8" else precision,
            io_binding=isinstance(backend, OnnxRuntimeBoundBackend),
            graphs=(DENSE,),
        )
        return lambda videos: dense.run(DENSE, {"videos": dense.videos(videos)})
    if name == "pytorch":
        fp16 = precision == "fp16"
        model = load_checkpoint(export.path / export.manifest["pytorch"]).model.to(device)
        module = graph_specs(model)[DENSE].module

        def run(videos):
            with torch.inference_mode(), strict_fp32(), torch.autocast("cuda", torch.float16, enabled=fp16):
                return module(videos.to(device))

        return run
    if name == "tensorrt":
        from adafocus.runtime.tensorrt_engine import TensorRTEngine

        engine = TensorRTEngine(export.engine_path(DENSE, precision), device=device)
        return lambda videos: engine.run({"videos": videos.to(device).contiguous()})
    raise AdaFocusError(f"no dense runner for backend {name}")


def bench_videos(export: Export, count: int, seed: int = 0) -> torch.Tensor:
    """Generated videos of the export's shape (the synthetic task: structured content, not noise)."""
    from adafocus.train.synthetic import SyntheticTask

    preset = export.preset
    task = SyntheticTask(dataclasses.replace(preset, num_classes=min(preset.num_classes, 10)), seed=seed)
    videos, _ = task.batch("test", range(count))
    return videos


def thresholds_for_budget(export: Export, budget: float, count: int, device: str = "cpu") -> tuple[list[float], float]:
    """Exit thresholds whose cost on `count` generated videos is the largest not above `budget`, for
    exports without a calibrated table (random weights: accuracy plays no part, the exit mix does).
    Solved like calibration (exit proportions q_k ∝ p^k, thresholds midway between samples)."""
    from adafocus.calibration.calibrate import collect
    from adafocus.calibration.thresholds import exit_proportions, simulate, solve_thresholds

    videos = bench_videos(export, count, seed=1)  # not the videos that are timed
    labels = torch.zeros(count, dtype=torch.int64)
    outputs = collect(export, videos, labels, desc="calibrating to the budget", device=device)
    cost = export.exit_gflops
    best: tuple[list[float], float] | None = None
    for p in np.logspace(-3, 3, 601):
        thresholds = solve_thresholds(outputs.entropy, exit_proportions(p, export.preset.max_cubes))
        realised = simulate(outputs.entropy, outputs.correct, cost, thresholds).gflops
        if realised <= budget and (best is None or realised > best[1]):
            best = ([float(t) for t in thresholds], realised)
    if best is None:
        raise AdaFocusError(
            f"no exit mix of {export.preset.name} costs <= {budget} GFLOPs/video (glance alone: {cost[0]:.3f})",
            f"ask for at least {cost[0]:.3f}",
        )
    return best


def write_report(report: dict, path: Path) -> None:
    write_json(path, report)


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        (b["backend"]["backend"], name, b["videos_per_s"][name], b["gflops_per_video"][name])
        for b in report["backends"]
        for name in b["videos_per_s"]
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{backend}\n{name}" for backend, name, _, _ in rows]
    left.bar(labels, [r[2] for r in rows], color="tab:blue")
    left.set_ylabel("videos / s")
    left.set_title(f"throughput, batch {report['batch']}")
    right.bar(labels, [r[3] for r in rows], color="tab:orange")
    right.set_ylabel("GFLOPs / video")
    right.set_title("compute")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=7, rotation=45)
    on_gpu = any(str(b["backend"]["device"]).startswith(("cuda", "tensorrt")) for b in report["backends"])
    fig.suptitle(f"{report['preset']} — {report['machine']['gpu'] if on_gpu else report['machine']['cpu']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
