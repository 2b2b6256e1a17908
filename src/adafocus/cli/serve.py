"""`adafocus serve`: the command over `adafocus.serve.command.serve`."""

from __future__ import annotations

import click

from adafocus.cli.common import CONTEXT, backend_choice, device_choice

LOOPBACK = "127.0.0.1"


@click.command(context_settings=CONTEXT)
@click.argument("export_dir", required=False, type=click.Path(file_okay=False, exists=True), metavar="[EXPORT]")
@click.option(
    "--host",
    default=LOOPBACK,
    show_default=True,
    help="Address to listen on. Anything but loopback exposes the server to the network: only when asked.",
)
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="0: any free port.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True, help="0: any free.")
@click.option("--backend", type=backend_choice(), default="onnxruntime", show_default=True, help="Runtime backend.")
@click.option("--device", type=device_choice(), default=None, help="Where it runs [default: the backend's own].")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None, help="Backend precision.")
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads of each model instance's engine.")
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Videos in the serving loop's pool; the largest batch of the per-batch model.",
)
@click.option(
    "--budget",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="GFLOPS",
    help="GFLOPs per video for requests that send no budget_gflops [default: the export's thresholds].",
)
@click.option(
    "--latency-slo-ms",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Latency target: under load, newly admitted videos get cheaper calibrated budgets; past the cheapest, "
    "new requests are refused as overloaded (retryable). Needs a calibrated export.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="Requests that may wait for the pool; past it, new ones are refused as overloaded (retryable).",
)
@click.option(
    "--max-queue-delay-ms",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="An idle serving loop waits this long for more requests before it starts (0: start at once).",
)
@click.option(
    "--admit-wait-ms",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="A busy serving loop admits waiting requests once the oldest has waited this long (0: at its next turn; "
    "inf: only when its pool has drained). Holding arrivals back can lower latency on CPUs (docs/serving.md).",
)
@click.option(
    "--per-batch-delay-us",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="The per-batch model's max_queue_delay_microseconds (Triton's dynamic batcher).",
)
@click.option(
    "--max-file-mib",
    type=click.FloatRange(min=0, min_open=True),
    default=64.0,
    show_default=True,
    help="VIDEO_FILE requests larger than this are refused before decoding.",
)
@click.option(
    "--decoders",
    type=click.IntRange(0),
    default=2,
    show_default=True,
    help="Processes decoding VIDEO_FILE requests, per model instance (0: refuse VIDEO_FILE).",
)
@click.option(
    "--instances",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Model instances (processes) per model, each with its own runtime; Triton spreads requests over them.",
)
@click.option(
    "--exit-timeout-s",
    type=click.IntRange(1),
    default=30,
    show_default=True,
    help="On Ctrl-C, how long the server waits for the requests in flight before it exits anyway.",
)
def serve(
    export_dir, host, http_port, grpc_port, metrics_port, instances, per_batch_delay_us, exit_timeout_s, **options
) -> None:
    """Serve an export with Triton Inference Server (HTTP, gRPC, metrics) until Ctrl-C.

    Two models: `adafocus` batches continuously across requests and answers each video the moment it
    exits; `adafocus_per_batch` is Triton's dynamic batcher over one Runtime.predict per batch. Both
    take FRAMES (uint8 [T,3,S,S]), VIDEO (normalised float32) or VIDEO_FILE (a file's bytes) and an
    optional request parameter budget_gflops (docs/serving.md). No EXPORT: the built-in demo.

    Ctrl-C (or SIGTERM) answers every request in flight, then exits 0. Exit status 1 when a model
    process dies (Triton does not restart it) or the server stops by itself; the repository and the
    server's log are kept then and their folder named.
    """
    from adafocus.errors import AdaFocusError
    from adafocus.serve.command import serve as run
    from adafocus.serve.service import ServeOptions

    if host != LOOPBACK:
        click.echo(f"warning: listening on {host}: reachable from the network, with no authentication", err=True)
    try:
        if export_dir is None:
            from adafocus.builtin import demo_export

            export_dir = str(demo_export().path)
        status = run(
            ServeOptions(export=export_dir, **options),
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            instances=instances,
            per_batch_delay_us=per_batch_delay_us,
            exit_timeout_s=exit_timeout_s,
            log=lambda line: click.echo(line, err=True),
        )
    except AdaFocusError as e:
        raise click.ClickException(str(e)) from None
    raise SystemExit(status)
