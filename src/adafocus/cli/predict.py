"""`adafocus-predict`: the command over `adafocus.predict.predict_paths`."""

from __future__ import annotations

import sys

import click

from adafocus.cli.common import CONTEXT, Command, backend_choice, parse_thresholds
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
@click.pass_context
def predict(ctx, paths, export_dir, backend, batch_size, workers, out, top_k, thresholds, budget, resume, show_dir):
    """Classify videos: one JSON line per input video.

    PATH is a video file, a directory (its .mp4 .avi .mkv .mov .webm .m4v files, recursively,
    sorted), or a .txt/.list file of paths (one a line; blank lines and # comments skipped;
    relative paths are relative to the list file).

    \b
    Each line holds the video's "path" and either
      "class", "class_index", "top_k" ([class, probability] pairs), "exit_step" (cubes used),
      "cubes" ([{"centre": [x, y, t], "start": [x0, y0, t0]}]), "gflops" and "frames" (the
      sampled source frame indices), plus "image" with --show;
    or "error", saying why the video could not be processed (unreadable, truncated, empty, too
    short). Lines are written as videos finish, in completion order.

    Exit status: 0 when the run completes, even if some videos failed (their lines say why, and a
    summary "N ok, M failed" goes to stderr); 1 if no video could be processed at all, or if the
    export or an option value is unusable (e.g. the wrong number of --thresholds); 2 for invalid
    command-line usage.
    """
    from tqdm import tqdm

    from adafocus.builtin import demo_export
    from adafocus.predict import VIDEO_EXTENSIONS, expand_paths, path_key, predict_paths, recorded_paths
    from adafocus.runtime import Runtime

    if resume and out is None:
        raise click.UsageError("--resume needs --out: the results file to continue")
    if thresholds is not None and budget is not None:
        raise click.UsageError("give --thresholds or --budget, not both")

    videos = expand_paths(paths)
    if not videos:
        raise AdaFocusError(
            f"no videos found in {', '.join(paths)}",
            f"give video files, folders holding {' '.join(VIDEO_EXTENSIONS)} files, or a .txt/.list of paths",
        )
    done = recorded_paths(out, log=lambda line: click.echo(line, err=True)) if resume else set()
    todo = [v for v in videos if path_key(v) not in done]
    skipped = len(videos) - len(todo)

    runtime = Runtime.load(export_dir or demo_export().path, backend=backend)
    if thresholds is not None:
        runtime.set_thresholds(thresholds)
    if budget is not None:
        chosen = runtime.set_budget(budget)
        click.echo(
            f"budget {budget} GFLOPs/video: calibrated point of {chosen['gflops']:.4f} GFLOPs, "
            f"accuracy {chosen['accuracy']:.3f}",
            err=True,
        )

    ok = failed = 0
    sink = open(out, "a" if resume else "w", encoding="utf-8") if out is not None else sys.stdout
    try:
        with tqdm(total=len(todo), unit="video", file=sys.stderr, disable=None) as bar:
            for record in predict_paths(
                todo, runtime, batch_size=batch_size, workers=workers, top_k=top_k, show_dir=show_dir
            ):
                sink.write(dumps(record, indent=None) + "\n")
                sink.flush()
                if "error" in record:
                    failed += 1
                else:
                    ok += 1
                bar.set_postfix(ok=ok, failed=failed, refresh=False)
                bar.update(1)
    finally:
        if out is not None:
            sink.close()

    summary = f"{ok} ok, {failed} failed"
    if skipped:
        summary += f", {skipped} skipped (already in {out})"
    if out is not None:
        summary += f"; results in {out}"
    click.echo(summary, err=True)
    if todo and ok == 0:
        ctx.exit(1)
