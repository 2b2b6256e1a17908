"""`adafocus serve` as a function: write the repository of an export into a temporary folder, start
tritonserver on it, say where it listens, and stop it cleanly on SIGINT/SIGTERM (Triton answers every
request in flight before it exits). A model process that dies stops the server with an error: Triton
2.51 does not restart it, and a half-served model would fail its share of requests from then on.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
from pathlib import Path

from adafocus.errors import AdaFocusError
from adafocus.export.manifest import open_export
from adafocus.files import cache_root
from adafocus.runtime.runtime import budget_entry
from adafocus.serve.repository import CONTINUOUS, PER_BATCH, standard_models, write_repository
from adafocus.serve.service import ServeOptions
from adafocus.serve.triton_server import EXIT_GRACE_S, TritonServer

WATCH_EVERY_S = 0.5


def check_options(options: ServeOptions) -> None:
    """What the model processes would refuse, refused here first, with the fix."""
    export = open_export(options.export)
    if options.budget is not None:
        budget_entry(export, options.budget)
    if options.latency_slo_ms is not None and not export.budgets:
        raise AdaFocusError(
            f"--latency-slo-ms needs a calibrated export: {export.path} has no budgets",
            "run adafocus-calibrate on it first, or serve without a latency target",
        )


def serve(
    options: ServeOptions,
    *,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    instances: int = 1,
    per_batch_delay_us: int = 0,
    exit_timeout_s: int = 30,
    log=print,
    stop: threading.Event | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM (or `stop` is set); the exit status: 0 after a clean stop, 1 when a
    model process died or the server stopped by itself."""
    check_options(options)
    folder = Path(tempfile.mkdtemp(prefix="serve-", dir=_serve_root()))
    stop = stop or threading.Event()
    in_main = threading.current_thread() is threading.main_thread()  # only it may handle signals
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    server = None
    status = 1
    try:
        models = standard_models(options, instances=instances, per_batch_delay_us=per_batch_delay_us)
        repository = write_repository(folder / "repository", models)
        ports = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
        server = TritonServer(repository, host=host, exit_timeout_s=exit_timeout_s, **ports)
        log(f"starting tritonserver on {repository} (warming up {len(models)} models, {instances} instance(s) each)")
        server.start(stop=stop)
        if stop.is_set():  # Ctrl-C while it started: no waiting for the models to be ready first
            log("stopping: asked to before the server was ready")
            server.stop()
            status = 0
            return status
        _say_where(server, options, log)
        problem = _watch(server, stop)
        if problem:
            log(f"error: {problem}; stopping the server (log: {server.log_file})")
        else:
            log("stopping: answering the requests in flight first")
        code = server.stop()
        status = 1 if problem or code != 0 else 0
        if code != 0 and not problem:
            how = (
                f"was killed {EXIT_GRACE_S} s after its exit timeout"
                if code == -signal.SIGKILL
                else f"exited with code {code}"
            )
            log(f"error: tritonserver {how}:\n{server.log_tail()}")
        return status
    finally:
        if server is not None and server.process is not None and server.process.poll() is None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if status == 0:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            log(f"the repository and the server's log are kept in {folder}")


def _serve_root() -> Path:
    root = cache_root() / "serve"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _watch(server: TritonServer, stop: threading.Event) -> str | None:
    """Wait for a stop request; a problem of the server's meanwhile, as a sentence."""
    while not stop.wait(WATCH_EVERY_S):
        if server.process.poll() is not None:
            return f"tritonserver exited by itself with code {server.process.returncode}"
        dead = server.dead_instances()
        if dead:
            return (
                f"the process of model instance {', '.join(dead)} died; Triton does not restart it, so its "
                "requests would fail from now on"
            )
    return None


def _say_where(server: TritonServer, options: ServeOptions, log) -> None:
    export = open_export(options.export)
    budget = f", budget {options.budget:g} GFLOPs/video" if options.budget is not None else ""
    slo = f", latency target {options.latency_slo_ms:g} ms" if options.latency_slo_ms is not None else ""
    log(
        f"serving {export.path} ({export.preset.name}, {export.preset.num_classes} classes) with {options.backend} "
        f"on {options.device or 'cpu'}, pool of {options.batch_size}{budget}{slo}"
    )
    log(f"  models   {CONTINUOUS} (continuous batching), {PER_BATCH} (Triton's dynamic batching)")
    log(f"  HTTP     {server.url}    (curl {server.url}/v2/models/{CONTINUOUS})")
    log(f"  gRPC     {server.host}:{server.grpc_port}")
    log(f"  metrics  http://{server.host}:{server.metrics_port}/metrics")
    log(f"  try      adafocus-predict VIDEO.mp4 --server {server.host}:{server.grpc_port}")
    log("Ctrl-C answers what is in flight, then stops.")
