"""`adafocus-predict`: the command over `adafocus.predict.predict_paths`."""

from __future__ import annotations

import os
import sys

import click

from adafocus.cli.common import CONTEXT, Command, backend_choice, given, parse_thresholds, refuse_unused
from adafocus.errors import AdaFocusError
from adafocus.files import dumps


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True), metavar="PATH...")
@click.option(
    "--export",
    "export_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Export directory (from adafocus-export) [default: the built-in demo export].",
)
@click.option(
    "--backend",
    type=backend_choice(),
    default="onnxruntime",
    show_default=True,
    help="Runtime backend.",
)
@click.option(
    "--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Videos in the runtime's pool."
)
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True, help="Decoder threads.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="JSONL file to write (replaced, or appended to with --resume) [default: stdout].",
)
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True, help="Classes listed per video.")
@click.option(
    "--thresholds",
    callback=parse_thresholds,
    default=None,
    metavar="H0,...,HK",
    help="Exit thresholds: K+1 comma-separated entropies, one per step 0..K (inf: always exit there; "
    "-inf or none: never) [default: the export's].",
)
@click.option(
    "--budget",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="GFLOPS",
    help="Use the export's calibrated thresholds for at most this many GFLOPs per video (not with --thresholds).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="With --out: skip inputs that already have a line in the file, and append the others.",
)
@click.option(
    "--show",
    "show_dir",
    type=click.Path(file_okay=False),
    default=None,
    metavar="OUT_DIR",
    help="Write a PNG per video: the sampled frames with a numbered box per cube the model looked at.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process, decoder threads beside the runtime. ray: a Ray Data pipeline (decoding as CPU "
    "tasks, the runtime in a pool of actors), on a local or remote cluster (needs the [scale] extra).",
)
@click.option(
    "--address",
    default=None,
    help='With --engine ray: the cluster to join ("auto" on a node of it, or HEAD:6379; not ray://: Ray Data does '
    "not run through Ray Client).",
)
@click.option("--actors", type=click.IntRange(1), default=1, show_default=True, help="With --engine ray: runtimes.")
@click.option(
    "--gpus-per-actor", type=click.FloatRange(0), default=0.0, show_default=True, help="With --engine ray: GPUs each."
)
@click.option(
    "--cpus-per-actor",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="With --engine ray: CPUs each actor reserves (fractions share a core: on a small machine, actors + "
    "decoders must fit in its CPUs or the pipeline waits for room).",
)
@click.option(
    "--decoders", type=click.IntRange(1), default=1, show_default=True, help="With --engine ray: decoder tasks."
)
@click.option(
    "--decode",
    type=click.Choice(["auto", "sequential"]),
    default="auto",
    show_default=True,
    help="auto: decode only the sampled frames, seeking to each one's keyframe, where that is exact "
    "(mp4/mov/mkv/webm with sound timestamps), else from the first frame; sequential: always from the first "
    "frame (the slower reference, for checks). Each line's decoded_by says which ran.",
)
@click.option(
    "--server",
    default=None,
    metavar="HOST:PORT",
    help="Send the videos to a running `adafocus serve` (its gRPC port, model adafocus) instead of running the "
    "model here: files go as VIDEO_FILE, --in-flight at a time, --budget as each request's budget_gflops.",
)
@click.option(
    "--in-flight", type=click.IntRange(1), default=8, show_default=True, help="With --server: requests at once."
)
@click.pass_context
def predict(
    ctx,
    paths,
    export_dir,
    backend,
    batch_size,
    workers,
    out,
    top_k,
    thresholds,
    budget,
    resume,
    show_dir,
    engine,
    address,
    actors,
    gpus_per_actor,
    cpus_per_actor,
    decoders,
    decode,
    server,
    in_flight,
):
    """Classify videos: one JSON line per input video.

    PATH is a video file, a directory (its .mp4 .avi .mkv .mov .webm .m4v files, recursively,
    sorted), or a .txt/.list file of paths (one a line; blank lines and # comments skipped;
    relative paths are relative to the list file).

    \b
    Each line holds the video's "path" (absolute) and either
      "class", "class_index", "top_k" ([class, probability] pairs), "exit_step" (cubes used),
      "cubes" ([{"centre": [x, y, t], "start": [x0, y0, t0]}]; a Uni-AdaFocus export writes
      "patches" ([{"frame": t, "box": [x0, y0, width, height]}]) instead), "gflops", "frames" (the
      sampled source frame indices), "decoded_by" ("seek": only the frames sampled were decoded;
      "sequential": from the first frame, "decode_fallback" saying why), plus "image" with --show;
    or "error", saying why the video could not be processed (unreadable, truncated, empty, too
    short, or the model gave it NaN or inf logits). Lines are written as videos finish, in
    completion order.

    Exit status: 0 when the run completes, even if some videos failed (their lines say why, and a
    summary "N ok, M failed" goes to stderr); 1 if no video could be processed at all, or if the
    export or an option value is unusable (e.g. the wrong number of --thresholds); 2 for invalid
    command-line usage.
    """
    from adafocus.builtin import demo_export
    from adafocus.predict import VIDEO_EXTENSIONS, expand_paths, prepare_show_dir, recorded_key, recorded_paths

    if resume and out is None:
        raise click.UsageError("--resume needs --out: the results file to continue")
    if thresholds is not None and budget is not None:
        raise click.UsageError("give --thresholds or --budget, not both")
    if engine == "ray" and show_dir is not None:
        raise click.UsageError("--show draws in this process: use it with --engine local")
    # options of the ways of running not chosen would be silently ignored: refused instead
    if engine == "local":
        ray_sizes = ("address", "actors", "gpus_per_actor", "cpus_per_actor", "decoders")
        refuse_unused(ray_sizes, "without --engine ray", "add --engine ray, or leave them out")
    else:
        refuse_unused(("workers",), "with --engine ray, whose decoders are Ray tasks", "give --decoders instead")
    if server is None:
        refuse_unused(("in_flight",), "without --server", "add --server HOST:PORT, or leave it out")
    if engine == "ray":
        from adafocus.scale import require_ray

        require_ray()  # the install hint before any work
    if server is not None:
        local_only = {"--export": export_dir, "--thresholds": thresholds, "--show": show_dir}
        local_only["--decode sequential"] = "sequential" if decode == "sequential" else None
        named = [name for name, value in local_only.items() if value is not None] + ["--engine ray"] * (engine == "ray")
        # the server decodes and batches with its own engine: these would be ignored
        named += [f"--{p.replace('_', '-')}" for p in ("backend", "workers", "batch_size") if given(p)]
        if named:
            raise click.UsageError(
                f"--server runs the model on the server: not with {', '.join(named)} "
                "(the server serves its own export; --budget goes with each request)"
            )
    # Where the results and pictures go is checked before anything is loaded or decoded.
    if out is not None:
        _check_out(out)
    if show_dir is not None:
        prepare_show_dir(show_dir)
    # Each line names its video by its absolute path, which --resume matches from any folder
    # (a path as given, relative, would name another file from another working directory).
    videos = [os.path.abspath(v) for v in expand_paths(paths)]
    if not videos:
        raise AdaFocusError(
            f"no videos found in {', '.join(paths)}",
            f"give video files, folders holding {' '.join(VIDEO_EXTENSIONS)} files, or a .txt/.list of paths",
        )
    done = recorded_paths(out, log=lambda line: click.echo(line, err=True)) if resume else set()
    todo = [v for v in videos if recorded_key(v) not in done]
    stats = None
    options = {"batch_size": batch_size, "top_k": top_k, "thresholds": thresholds, "budget": budget, "decode": decode}
    if server is not None:
        from adafocus.serve.triton_client import predict_on_server

        records = predict_on_server(todo, server, top_k=top_k, budget=budget, in_flight=in_flight)
    elif engine == "local":
        records = _local(todo, export_dir or str(demo_export().path), backend, workers, show_dir, **options)
    else:
        from adafocus.scale import ScaleStats, predict_dataset

        stats = ScaleStats()
        ray_options = {"address": address, "actors": actors, "gpus_per_actor": gpus_per_actor, "decoders": decoders}
        ray_options["cpus_per_actor"] = cpus_per_actor
        export_dir = export_dir or str(demo_export().path)
        records = predict_dataset(todo, export_dir, backend=backend, stats=stats, **ray_options, **options)
    ok = _write(records, out, resume, len(todo))
    summary = f"{ok} ok, {len(todo) - ok} failed"
    if len(videos) > len(todo):
        summary += f", {len(videos) - len(todo)} skipped (already in {out})"
    if out is not None:
        summary += f"; results in {out}"
    click.echo(summary, err=True)
    if stats is not None and todo:  # with nothing left to do no cluster was started: no Ray figures to give
        click.echo(stats.summary(), err=True)
    if todo and ok == 0:
        ctx.exit(1)


def _local(todo, export_dir, backend, workers, show_dir, *, batch_size, top_k, thresholds, budget, decode):
    from adafocus.predict import predict_paths
    from adafocus.runtime import Runtime

    runtime = Runtime.load(export_dir, backend=backend)
    if thresholds is not None:
        runtime.set_thresholds(thresholds)
    if budget is not None:
        chosen = runtime.set_budget(budget)
        click.echo(
            f"budget {budget} GFLOPs/video: calibrated point of {chosen['gflops']:.4f} GFLOPs, "
            f"accuracy {chosen['accuracy']:.3f}",
            err=True,
        )
    # Runtime.stream checks batch_size (TensorRT engines and AOTInductor packages end at a largest
    # batch) only when the first line is asked for, after _write has opened --out and emptied it:
    # its checks run here, on no videos, before anything is written.
    list(runtime.stream(iter(()), batch_size=batch_size))
    return predict_paths(
        todo, runtime, batch_size=batch_size, workers=workers, top_k=top_k, show_dir=show_dir, decode=decode
    )


def _check_out(out: str) -> None:
    """--out's folder exists and can be written to (click checks only a file that exists)."""
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise AdaFocusError(f"{out}: no folder {folder} to write the results in", "create it, or give another --out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AdaFocusError(f"{out}: the folder {folder} is not writable", "give an --out you can write to")


def _write(records, out, resume: bool, total: int) -> int:
    """Each line as it comes, flushed (so --resume can continue a run that stopped); returns how many
    videos succeeded. Lines are valid UTF-8 whatever the file names (`utf8_text`)."""
    from tqdm import tqdm

    from adafocus.predict import utf8_text

    ok = failed = 0
    sink = open(out, "a" if resume else "w", encoding="utf-8") if out is not None else sys.stdout
    try:
        with tqdm(total=total, unit="video", file=sys.stderr, disable=None) as bar:
            for record in records:
                sink.write(dumps(utf8_text(record), indent=None) + "\n")
                sink.flush()
                failed += "error" in record
                ok += "error" not in record
                bar.set_postfix(ok=ok, failed=failed, refresh=False)
                bar.update(1)
    finally:
        if out is not None:
            sink.close()
    return ok
