"""Serving under load: open-loop Poisson arrivals through `tritonclient.grpc.aio` against one
tritonserver on loopback, every server of the table in one run, on one machine (client included).

    python benchmarks/serve_load.py --out benchmarks/results/serve-load-demo.json

The servers (models of one repository, same export, backend, threads and instance count):
- `adafocus`: continuous batching, each video answered when it exits (pool `--batch-size`), a busy
  pool admitting arrivals at its next turn (`admit_wait_ms` 0);
- `adafocus_drained`: the same, admitting arrivals only when its pool has drained (`admit_wait_ms`
  inf): on the CPU an arrival's glance slows every running video's turn;
- `adafocus_slo`: `adafocus` with a latency target (`--slo-ms`, default 4x the unloaded p50 of
  `adafocus`, measured at the start of the run and fixed before any load phase);
- `adafocus_per_batch`: Triton's dynamic batcher, one Runtime.predict per Triton batch, in
  `PER_BATCH_VARIANTS` (max batch size x max_queue_delay_microseconds); at each load the variant with
  the best mean latency at that load is the one reported (all are kept in the JSON);
- `adafocus_dense`: the export's dense graph through Triton's dynamic batcher (what one deploys
  without AdaFocus).

First each model's saturation throughput (closed loop, `--saturation-in-flight` requests kept in
flight); then offered loads of `--loads` x the best per-batch variant's saturation, and 1.5x the
higher of the per-batch and continuous saturations (so that the overload row overloads both). At each
load every model gets the same seeded arrival times for `--duration` seconds; requests still open
`--drain` seconds after the last arrival count as lost; an arrival that finds `--max-outstanding`
requests unanswered is shed by the client (counted, not sent: what a load balancer's queue limit
does, and what keeps this process's memory bounded). Latency runs from a request's scheduled
arrival (open loop: a client that falls behind does not hide the server's queue). Reported per model
and load: answered/s, p50/p95/p99 and mean latency of answered requests, refusals (UNAVAILABLE:
overloaded), other errors, accuracy on the test videos' labels, mean GFLOPs per answered video, and
the budget the SLO mode gave. `--cheap-budget` runs the table again with every request carrying a
cheaper calibrated budget (default: the most accurate front point where most videos exit by the
first cube). Also: served videos/s at saturation over in-process `Runtime.stream` videos/s.

Inputs are FRAMES (uint8, a quarter of VIDEO's bytes: what a decoder hands over).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from adafocus.builtin import demo_export
from adafocus.data.synthetic import SyntheticTask
from adafocus.export.manifest import open_export
from adafocus.files import write_json
from adafocus.machine import cpu_record, package_versions
from adafocus.runtime import Runtime
from adafocus.serve.budgets import Budgets
from adafocus.serve.repository import ModelEntry, write_repository
from adafocus.serve.service import ServeOptions
from adafocus.serve.triton_server import TritonServer

PER_BATCH_VARIANTS = [(8, 0), (32, 0), (32, 4000)]  # (max batch size, max_queue_delay_microseconds)


def per_batch_name(batch: int, delay_us: int) -> str:
    return f"adafocus_per_batch_b{batch}_d{delay_us}"


def build_models(export_path: str, args, slo_ms: float | None) -> list[ModelEntry]:
    base = ServeOptions(str(export_path), threads=args.threads, batch_size=args.batch_size, decoders=0, max_queue=4096)
    models = [
        ModelEntry("adafocus", "continuous", base, args.instances),
        ModelEntry("adafocus_drained", "continuous", _with(base, admit_wait_ms=math.inf), args.instances),
    ]
    if slo_ms is not None:
        models.append(ModelEntry("adafocus_slo", "continuous", _with(base, latency_slo_ms=slo_ms), args.instances))
    for batch, delay in PER_BATCH_VARIANTS:
        options = _with(base, batch_size=batch)
        models.append(ModelEntry(per_batch_name(batch, delay), "per_batch", options, args.instances, delay))
    models.append(ModelEntry("adafocus_dense", "dense", base, args.instances, 0))
    return models


def _with(options: ServeOptions, **changes) -> ServeOptions:
    from dataclasses import replace

    return replace(options, **changes)


# --- the load generator ---------------------------------------------------------------------------


class Requests:
    """The test videos as FRAMES inputs, with their labels."""

    def __init__(self, export, count: int):
        task = SyntheticTask(export.preset, seed=0)
        raw = [task.raw_video("test", i) for i in range(count)]
        self.frames = [np.rint(r[0] * 255).astype(np.uint8) for r in raw]
        self.labels = np.array([r[1].label for r in raw])


BATCHED = ("adafocus_per_batch", "adafocus_dense")  # Triton's dynamic batcher: a leading batch axis


async def _one(client, grpc, model: str, frames: np.ndarray, parameters, timeout: float):
    if model.startswith(BATCHED):
        frames = frames[None]
    tensor = grpc.InferInput("FRAMES", list(frames.shape), "UINT8")
    tensor.set_data_from_numpy(frames)
    try:
        result = await client.infer(model, [tensor], parameters=parameters or None, client_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - every failure is counted by its kind
        return None, str(e.status()) if hasattr(e, "status") else type(e).__name__
    outputs = {
        n: result.as_numpy(n) for n in ("CLASS_INDEX", "GFLOPS", "BUDGET_GFLOPS") if result.as_numpy(n) is not None
    }
    return outputs, None


async def open_loop(
    address, model, requests: Requests, arrivals, parameters, drain_s: float, max_outstanding: int
) -> tuple[list, int, int]:
    """Send request i at arrivals[i] seconds (from now), unless `max_outstanding` requests are still
    unanswered: then it is shed, not sent. Returns ([(scheduled, done, video, outputs, error, lag)],
    lost, shed)."""
    import tritonclient.grpc.aio as grpc

    client = grpc.InferenceServerClient(address)
    records = []
    start = time.perf_counter() + 0.05
    horizon = arrivals[-1] + drain_s if len(arrivals) else 0
    outstanding = shed = 0

    async def send(i, at):
        nonlocal outstanding
        try:
            video = i % len(requests.frames)
            sent = time.perf_counter() - start  # later than `at` when this process falls behind its schedule
            outputs, error = await _one(client, grpc, model, requests.frames[video], parameters, horizon + 5)
            records.append((at, time.perf_counter() - start, video, outputs, error, sent - at))
        finally:
            outstanding -= 1

    tasks = []
    for i, at in enumerate(arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if outstanding >= max_outstanding:
            # a request waiting in gRPC's buffers holds its frames several times over: unbounded, the
            # backlog of an overloaded server had this client killed for memory (10.4 GB, demo, 2-core EPYC)
            shed += 1
            continue
        outstanding += 1
        tasks.append(asyncio.create_task(send(i, at)))
    pending = set()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(start + horizon - time.perf_counter(), 0.1))
    for task in pending:
        task.cancel()
    lost = len(pending)
    await client.close()
    return records, lost, shed


async def closed_loop(address, model, requests: Requests, in_flight: int, seconds: float, parameters) -> float:
    """Answered requests per second with `in_flight` requests always open."""
    import tritonclient.grpc.aio as grpc

    client = grpc.InferenceServerClient(address)
    answered = 0
    stop = time.perf_counter() + seconds
    started = time.perf_counter()

    async def worker(k):
        nonlocal answered
        i = k
        while time.perf_counter() < stop:
            outputs, error = await _one(client, grpc, model, requests.frames[i % len(requests.frames)], parameters, 60)
            answered += error is None
            i += in_flight

    await asyncio.gather(*(worker(k) for k in range(in_flight)))
    elapsed = time.perf_counter() - started
    await client.close()
    return answered / elapsed


def summarise(records, lost: int, labels, duration: float, shed: int = 0) -> dict:
    ok = [r for r in records if r[4] is None]
    latencies = np.array([r[1] - r[0] for r in ok]) * 1000
    refused = sum(1 for r in records if r[4] == "StatusCode.UNAVAILABLE")
    errors = len(records) - len(ok) - refused
    correct = [int(r[3]["CLASS_INDEX"].reshape(-1)[0]) == labels[r[2]] for r in ok]
    gflops = [float(r[3]["GFLOPS"].reshape(-1)[0]) for r in ok]
    budgets = [float(r[3]["BUDGET_GFLOPS"].reshape(-1)[0]) for r in ok if "BUDGET_GFLOPS" in r[3]]
    last = max((r[1] for r in ok), default=duration)
    return {
        "sent": len(records) + lost,
        "shed_by_client": shed,  # arrivals not sent: --max-outstanding requests were unanswered
        "answered": len(ok),
        "answered_per_s": len(ok) / max(last, duration),
        "refused": refused,
        "errors": errors,
        "lost": lost,
        "latency_ms": _percentiles(latencies),
        "client_lag_ms": _percentiles(np.array([r[5] for r in records]) * 1000),
        "accuracy": float(np.mean(correct)) if correct else None,
        "mean_gflops": float(np.mean(gflops)) if gflops else None,
        "mean_budget_gflops": float(np.mean(budgets)) if budgets else None,
        "min_budget_gflops": float(np.min(budgets)) if budgets else None,
    }


def _percentiles(latencies: np.ndarray) -> dict:
    if not len(latencies):
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(latencies.mean())}


def poisson(rate: float, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, size=int(rate * seconds * 1.5) + 10)
    times = np.cumsum(gaps)
    return times[times < seconds]


def in_process_stream(export_path, requests: Requests, threads: int, batch_size: int, seconds: float) -> float:
    """Videos/s of Runtime.stream in this process over the same videos (the serving overhead's base)."""
    from adafocus.data.video import to_model_input

    runtime = Runtime.load(export_path, "onnxruntime", threads=threads)
    videos = [to_model_input(f).numpy() for f in requests.frames]
    rates = []
    for _ in range(3):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 3:
            count += sum(1 for _ in runtime.stream(iter(videos * 4), batch_size=batch_size))
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


# --- the run --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", default=None, help="export directory (default: the built-in demo's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="the continuous models' pool")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--videos", type=int, default=256, help="distinct test videos sent in turn")
    parser.add_argument("--loads", default="0.25,0.5,0.8,1.0,1.5", help="fractions of per-batch saturation")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per model and load")
    parser.add_argument("--drain", type=float, default=20.0, help="seconds after the last arrival to answer")
    parser.add_argument("--saturation-in-flight", type=int, default=64)
    parser.add_argument("--saturation-seconds", type=float, default=10.0)
    parser.add_argument("--slo-ms", type=float, default=None, help="latency target (default: 4x unloaded p50)")
    parser.add_argument("--cheap-budget", type=float, default=None, help="GFLOPs/video of the second table")
    parser.add_argument("--no-cheap", action="store_true", help="skip the second table")
    parser.add_argument("--no-default", action="store_true", help="skip the first table (and the serving overhead)")
    parser.add_argument(
        "--max-outstanding",
        type=int,
        default=2048,
        help="unanswered requests at which the client sheds new arrivals (counted, not sent): bounds its memory",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results here (JSON, and a PNG beside it)")
    args = parser.parse_args()

    export = open_export(args.export) if args.export else demo_export()
    requests = Requests(export, args.videos)
    budgets = Budgets(export, export.thresholds)
    if not budgets.calibrated:  # the adafocus_slo model of every table steers along the budgets
        sys.exit(f"serve_load: {export.path} has no calibrated budgets; run adafocus-calibrate on it first")
    cheap = None if args.no_cheap else args.cheap_budget or _cheap_budget(export)
    report = {
        "benchmark": "serve_load",
        "export": str(export.path),
        "preset": export.preset.name,
        "machine": cpu_record(),
        "packages": package_versions(),
        "settings": vars(args) | {"per_batch_variants": PER_BATCH_VARIANTS, "cheap_budget": cheap},
        # thresholds that are no calibrated entry (set by hand) have no GFLOPs until videos run
        "default_budget_gflops": budgets.default.gflops if math.isfinite(budgets.default.gflops) else None,
    }
    with tempfile.TemporaryDirectory(prefix="serve-load-") as folder:
        slo_ms = args.slo_ms
        if slo_ms is None:  # the unloaded p50 of the continuous model, on a server without the SLO model
            slo_ms = 4 * _unloaded_p50(export, args, requests, Path(folder) / "probe")
        report["slo_ms"] = slo_ms
        log(f"latency target {slo_ms:.1f} ms")
        repository = write_repository(Path(folder) / "repository", build_models(export.path, args, slo_ms))
        with TritonServer(repository) as server:
            address = f"127.0.0.1:{server.grpc_port}"
            metrics = f"http://127.0.0.1:{server.metrics_port}/metrics"
            report["tables"] = {}
            if not args.no_default:
                report["tables"]["default"] = _table(address, metrics, requests, args, None)
                if args.out:  # what is done so far, should the next table fail
                    write_json(args.out, report)
            if not args.no_cheap:
                report["tables"]["cheap"] = _table(address, metrics, requests, args, {"budget_gflops": cheap})
        if not args.no_default:
            report["in_process_stream_videos_per_s"] = in_process_stream(
                export.path, requests, args.threads, args.batch_size, args.saturation_seconds
            )
    if not args.no_default:
        saturation = report["tables"]["default"]["saturation_per_s"]
        report["serving_overhead"] = {
            "served_over_in_process": saturation["adafocus"] / report["in_process_stream_videos_per_s"],
            "note": "adafocus's saturation through Triton over Runtime.stream in one process "
            "(same videos, threads, pool)",
        }
    print_report(report)
    if args.out:
        write_json(args.out, report)
        plot(report, Path(args.out).with_suffix(".png"))
        log(f"wrote {args.out}")


def _table(address, metrics_url, requests, args, parameters) -> dict:
    models = [
        "adafocus",
        "adafocus_drained",
        "adafocus_slo",
        *(per_batch_name(b, d) for b, d in PER_BATCH_VARIANTS),
        "adafocus_dense",
    ]
    saturation = {}
    for model in models:
        if model == "adafocus_slo":
            # warmed one request at a time: 8 in flight would overload it and leave its budget low for
            # the first load; no saturation: a closed loop overloads it by design (it refuses, the loop
            # resends at once)
            asyncio.run(closed_loop(address, model, requests, 1, 2.0, parameters))
            continue
        asyncio.run(closed_loop(address, model, requests, 8, 2.0, parameters))  # warm the path
        saturation[model] = asyncio.run(
            closed_loop(address, model, requests, args.saturation_in_flight, args.saturation_seconds, parameters)
        )
        log(f"saturation {model}: {saturation[model]:.1f} answered/s")
    per_batch_best = max(saturation[per_batch_name(b, d)] for b, d in PER_BATCH_VARIANTS)
    fractions = [float(f) for f in args.loads.split(",")]
    loads = [{"name": f"{f:.0%} of per-batch", "rate": f * per_batch_best} for f in fractions]
    top = max(per_batch_best, saturation["adafocus"], saturation["adafocus_drained"])
    loads.append({"name": "150% of the higher saturation", "rate": 1.5 * top})
    rows = []
    for k, load in enumerate(loads):
        arrivals = poisson(load["rate"], args.duration, args.seed + k)
        row = {"load": load["name"], "offered_per_s": load["rate"], "requests": len(arrivals), "models": {}}
        for model in models:
            before = triton_queue(metrics_url, model)
            records, lost, shed = asyncio.run(
                open_loop(address, model, requests, arrivals, parameters, args.drain, args.max_outstanding)
            )
            row["models"][model] = summarise(records, lost, requests.labels, args.duration, shed)
            row["models"][model]["quiet_after_s"] = wait_until_quiet(metrics_url)
            after = triton_queue(metrics_url, model)
            served = after[1] - before[1]
            row["models"][model]["triton_queue_ms_mean"] = (after[0] - before[0]) / 1000 / served if served else None
            s = row["models"][model]
            log(
                f"{load['name']:>30} {model:>32}: {s['answered_per_s']:6.1f}/s p50 {_ms(s['latency_ms']['p50'])} "
                f"p99 {_ms(s['latency_ms']['p99'])} refused {s['refused']} "
                f"lost {s['lost']} shed {s['shed_by_client']} acc {s['accuracy']} "
                f"client lag p99 {_ms(s['client_lag_ms']['p99'])} triton queue {s['triton_queue_ms_mean']}"
            )
        variants = {per_batch_name(b, d): row["models"][per_batch_name(b, d)] for b, d in PER_BATCH_VARIANTS}
        best = min(variants, key=lambda m: _mean_or_inf(variants[m]))
        row["per_batch_best"] = best
        rows.append(row)
    return {
        "parameters": parameters or {},
        "saturation_per_s": saturation,
        "per_batch_best_saturation": per_batch_best,
        "rows": rows,
    }


def triton_metrics(metrics_url: str, names: tuple[str, ...], model: str | None = None) -> dict[str, float]:
    """The sums of Triton's metrics `names` (of `model`, or of every model). A busy server may answer
    its metrics endpoint slowly: a few tries, a generous timeout."""
    import urllib.request

    for attempt in range(3):
        try:
            text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
            break
        except OSError:
            if attempt == 2:
                raise
            time.sleep(1)
    found: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in names and (model is None or f'model="{model}"' in line):
            found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    if missing := set(names) - set(found):
        raise RuntimeError(f"Triton's metrics have no {sorted(missing)} (for model {model})")
    return found


def triton_queue(metrics_url: str, model: str) -> tuple[float, float]:
    """Triton's own count for `model` so far: (microseconds requests spent queued before the model's
    execute, requests that succeeded). Differences over a phase give the mean wait in front of the
    model, which the model itself cannot see."""
    found = triton_metrics(metrics_url, ("nv_inference_queue_duration_us", "nv_inference_request_success"), model)
    return found["nv_inference_queue_duration_us"], found["nv_inference_request_success"]


def wait_until_quiet(metrics_url: str, limit_s: float = 180.0) -> float:
    """Wait until the server holds no request (Triton's pending count, and the continuous models'
    own queues and pools, every model): a client that gave up on requests (counted lost) does not
    take them off the server, which would still be working through them in the next phase. Returns
    the seconds waited."""
    held = ("nv_inference_pending_request_count", "adafocus_queue_length", "adafocus_pool_occupancy")
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        try:
            if sum(triton_metrics(metrics_url, held).values()) == 0:
                return time.perf_counter() - started
        except OSError:  # a server still busy may not answer its metrics endpoint in time: ask again
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server still held requests {limit_s:g} s after a phase ended")


def _mean_or_inf(summary: dict) -> float:
    mean = summary["latency_ms"]["mean"]
    incomplete = summary["lost"] or summary["shed_by_client"] or summary["answered"] < 0.95 * summary["sent"]
    return math.inf if mean is None or incomplete else mean


def _unloaded_p50(export, args, requests, folder: Path) -> float:
    models = [
        ModelEntry(
            "adafocus",
            "continuous",
            ServeOptions(str(export.path), threads=args.threads, batch_size=args.batch_size, decoders=0),
            args.instances,
        )
    ]
    repository = write_repository(folder, models)
    with TritonServer(repository) as server:
        address = f"127.0.0.1:{server.grpc_port}"
        asyncio.run(closed_loop(address, "adafocus", requests, 1, 2.0, None))
        arrivals = np.arange(0, 5.0, 0.05)  # one at a time, 20/s: nobody waits for anybody
        records, _, _ = asyncio.run(open_loop(address, "adafocus", requests, arrivals, None, 10, len(arrivals)))
    return summarise(records, 0, requests.labels, 5.0)["latency_ms"]["p50"]


def _cheap_budget(export) -> float:
    """The most accurate calibrated entry where most (held-out) videos exit by the first cube."""
    by_first = [b for b in export.budgets if sum(b.get("heldout_exit_fractions", b["exit_fractions"])[:2]) > 0.5]
    if not by_first:
        sys.exit(f"serve_load: no budget of {export.path} exits most videos by the first cube; give --cheap-budget")
    return max(by_first, key=lambda b: b["accuracy"])["gflops"]


def _ms(value) -> str:
    return "   -  " if value is None else f"{value:6.1f}"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def print_report(report: dict) -> None:
    for name, table in report["tables"].items():
        print(f"\n{name} budgets ({table['parameters'] or 'the export default'})")
        columns = ("ans/s", "p50", "p95", "p99", "mean", "refused", "acc", "GFLOPs")
        print(f"{'load':>30} {'model':>34} " + " ".join(f"{c:>7}" for c in columns))
        for row in table["rows"]:
            for model, s in row["models"].items():
                if model.startswith("adafocus_per_batch") and model != row["per_batch_best"]:
                    continue
                lat = s["latency_ms"]
                acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
                gfl = "-" if s["mean_gflops"] is None else f"{s['mean_gflops']:.4f}"
                print(
                    f"{row['load']:>30} {model:>34} {s['answered_per_s']:7.1f} {_ms(lat['p50'])} {_ms(lat['p95'])} "
                    f"{_ms(lat['p99'])} {_ms(lat['mean'])} {s['refused']:7d} {acc:>6} {gfl:>7}"
                )
    if "serving_overhead" in report:
        print(f"\nserving overhead: {report['serving_overhead']['served_over_in_process']:.2f} of in-process streaming")


def plot(report: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from adafocus.figures import save_png

    tables = report["tables"]
    figure = Figure(figsize=(6 * len(tables), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(tables), squeeze=False)[0]
    for ax, (name, table) in zip(axes, tables.items()):
        for model, style in (
            ("adafocus", "o-"),
            ("adafocus_slo", "s-"),
            ("per_batch", "^--"),
            ("adafocus_dense", "x:"),
        ):
            xs, ys = [], []
            for row in table["rows"]:
                key = row["per_batch_best"] if model == "per_batch" else model
                p99 = row["models"][key]["latency_ms"]["p99"]
                if p99 is not None:
                    xs.append(row["offered_per_s"])
                    ys.append(p99)
            ax.plot(xs, ys, style, label=model if model != "per_batch" else "adafocus_per_batch (best variant)")
        ax.axhline(report["slo_ms"], color="grey", linewidth=0.8, label="latency target")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_title(f"{report['preset']}: {name} budgets")
        ax.legend(fontsize=7)
    save_png(figure, path)


if __name__ == "__main__":
    main()
