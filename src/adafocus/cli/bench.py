"""`adafocus-bench`: the command over `adafocus.bench.run`."""

from __future__ import annotations

import click

from adafocus.cli.common import CONTEXT, Command, backend_choice, device_choice, parse_thresholds

RESULTS_DIR = "adafocus-results"  # where reports go by default: untracked, git-ignored


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("export_dir", required=False, type=click.Path(file_okay=False, exists=True))
@click.option("--preset", default=None, help="Benchmark this preset with random weights (exported once, cached).")
@click.option(
    "--backend",
    "backends",
    type=backend_choice(),
    multiple=True,
    default=("onnxruntime",),
    show_default=True,
    help="Backend(s) to measure; repeat the option for several.",
)
@click.option("--batch", type=click.IntRange(1), default=128, show_default=True, help="Videos per batch.")
@click.option(
    "--videos",
    type=click.IntRange(1),
    default=None,
    help="Videos timed, run in batches of --batch (a multiple of it) [default: one batch]. The adaptive "
    "methods' compute depends on the videos, so a small batch alone is a small sample of it: time 128 or more.",
)
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True, help="Timed runs per method.")
@click.option(
    "--warmup",
    type=click.IntRange(0),
    default=2,
    show_default=True,
    help="Untimed runs of each method first (ONNX Runtime allocates a new shape's memory on its second run).",
)
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads (ONNX Runtime and torch).")
@click.option(
    "--thresholds",
    callback=parse_thresholds,
    default=None,
    metavar="H0,...,HK",
    help="Exit thresholds, K+1 comma-separated entropies (inf: always exit there; -inf or none: never).",
)
@click.option("--budget", type=float, default=None, help="GFLOPs/video: use the calibrated entry for this budget.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default=None,
    help="Backend precision [default: the backend's own: fp32; fp16 for tensorrt]. int8: ONNX Runtime on the "
    "graphs of `adafocus-calibrate --int8`; fp16: PyTorch on CUDA or TensorRT.",
)
@click.option(
    "--device",
    type=device_choice(),
    default=None,
    help="Where the backend runs [default: the backend's own: cpu; cuda for tensorrt]. The videos, the dense "
    "baseline and the PyTorch-eager loop go to the same device; on cuda the thresholds for --budget are also "
    "solved there.",
)
@click.option("--no-reference", is_flag=True, help="Skip the (slow) PyTorch-eager reference loop.")
@click.option(
    "--max-call-gflops",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Split any graph call doing more multiply-adds than this into parts (same results, bounded memory) "
    "[default: 150 on the CPU (600 for int8, whose activations take a quarter of the bytes), none on a GPU].",
)
@click.option(
    "--call-workers",
    type=click.IntRange(1),
    default=None,
    help="ONNX Runtime on the CPU: the parts of a split graph call run at once, each in a single-threaded "
    "session [default: --threads or the usable cores; 1: in turn, in one multi-threaded session].",
)
@click.option(
    "--out",
    type=click.Path(),
    default=RESULTS_DIR,
    show_default=True,
    help="Folder for the report (bench-PRESET-BACKENDS.json and a PNG beside it), or a .json file name. The "
    "default is git-ignored, so a run leaves the checkout as it was; recorded results go to benchmarks/results/ "
    "only when asked (--out benchmarks/results).",
)
def bench(
    export_dir,
    preset,
    backends,
    batch,
    videos,
    repeats,
    warmup,
    threads,
    thresholds,
    budget,
    precision,
    device,
    no_reference,
    max_call_gflops,
    call_workers,
    out,
):
    """Videos/s of adaptive inference vs the dense baseline and the PyTorch-eager reference loop,
    measured in one run on the same backend and the same videos (default: the built-in demo export,
    ONNX Runtime on the CPU, batch 128).

    Prints a table and writes JSON (with machine details) and a PNG. realisation = (adaptive videos/s
    ÷ dense videos/s) ÷ (dense GFLOPs ÷ adaptive GFLOPs); loop_overhead = share of the adaptive run
    spent outside the graphs.
    """
    import torch

    from adafocus import bench as b
    from adafocus.builtin import demo_export, random_export
    from adafocus.export.manifest import open_export

    if threads:
        torch.set_num_threads(threads)
    if export_dir and preset:
        raise click.UsageError("give EXPORT_DIR or --preset, not both")
    if thresholds is not None and budget is not None:
        raise click.UsageError("give --thresholds or --budget, not both")
    if videos is not None and videos % batch:
        raise click.BadParameter(f"{videos} is not a multiple of --batch {batch}", param_hint="--videos")
    export = open_export(export_dir) if export_dir else random_export(preset) if preset else demo_export()
    if thresholds is not None and len(thresholds) != export.preset.num_exits:
        k1 = export.preset.num_exits
        raise click.BadParameter(f"needs {k1} values (steps 0..{k1 - 1})", param_hint="--thresholds")
    report = b.run(
        export,
        backends,
        batch=batch,
        videos=videos,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        thresholds=None if thresholds is None else [float("-inf") if t is None else t for t in thresholds],
        budget=budget,
        precision=precision,
        device=device,
        reference=not no_reference,
        max_call_gflops="default" if max_call_gflops is None else max_call_gflops,
        call_workers=call_workers,
        log=lambda line: click.echo(line, err=True),
    )
    json_file, png_file = b.write(report, out)
    click.echo(b.format_report(report))
    click.echo(f"\nwrote {json_file} and {png_file}")
