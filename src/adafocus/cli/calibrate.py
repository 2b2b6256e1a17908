"""`adafocus-calibrate`: exit thresholds for a range of FLOPs budgets, written into an export."""

from __future__ import annotations

import click

from adafocus.cli.common import CONTEXT, Command
from adafocus.export.manifest import Export
from adafocus.files import dumps


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("export_dir", required=False, type=click.Path(file_okay=False, exists=True))
@click.option(
    "--videos",
    "calibration_videos",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Calibration videos, from the synthetic task's 'val' split (thresholds are solved on them).",
)
@click.option(
    "--heldout",
    "heldout_videos",
    type=click.IntRange(0),
    default=1000,
    show_default=True,
    help="Held-out videos, from the 'test' split, to measure each budget's accuracy and realised GFLOPs (0: skip).",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed of the synthetic task [default: the checkpoint's training seed (train_config.seed), else 0].",
)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Videos per forward pass.")
@click.option(
    "--max-drop",
    type=click.FloatRange(0, 1),
    default=0.01,
    show_default=True,
    help="Default operating point (manifest thresholds): the cheapest budget whose calibration accuracy is "
    "within this much (absolute, 0.01 = 1 point) of the best.",
)
@click.option(
    "--plot", type=click.Path(dir_okay=False), default=None, help="Write the accuracy-GFLOPs curve here (PNG)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole result (table, baselines) as JSON, not text.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads (default: all cores).")
@click.option(
    "--int8",
    is_flag=True,
    help="Then quantise the glance and local graphs to INT8 (QDQ, ONNX Runtime static quantisation) on inputs "
    "recorded through the fp32 loop, and compare fp32 and int8 on the held-out videos (accuracy, exit and "
    "class changes, CPU videos/s).",
)
@click.option(
    "--int8-videos",
    type=click.IntRange(1),
    default=128,
    show_default=True,
    help="With --int8: calibration videos for the activation ranges (the first of the 'val' split).",
)
@click.option(
    "--int8-weight-bits",
    type=click.Choice(["7", "8"]),
    default="7",
    show_default=True,
    help="With --int8: weight precision. 7 bits cannot saturate ONNX Runtime's x86 kernels, so the graphs give "
    "the same answers on every x86 CPU; 8 bits are slightly more accurate but clip on CPUs without VNNI, where "
    "they then run in a slower exact mode.",
)
def calibrate(
    export_dir,
    calibration_videos,
    heldout_videos,
    seed,
    batch_size,
    max_drop,
    plot,
    as_json,
    threads,
    int8,
    int8_videos,
    int8_weight_bits,
):
    """Calibrate early exit for EXPORT_DIR [default: the built-in demo export, in its cache directory].

    Runs the export's PyTorch model without early exit on synthetic-task videos, solves entropy
    thresholds for a sweep of exit proportions (MSDNet dynamic evaluation, paper Eq. 7), keeps the
    accuracy-vs-GFLOPs front, measures it on held-out videos and writes it into the manifest
    (`budgets`, and a default `thresholds`), so `Runtime.set_budget(GFLOPs)` can choose.

    Models of the paper's presets (random weights, up to 174 classes) get a task of at most 10
    classes: their accuracy is meaningless, but the exit mix and realised GFLOPs are realistic.

    With --int8, `<graph>.int8.onnx` graphs are added and recorded in the manifest, so that
    `Runtime.load(dir, "onnxruntime", precision="int8")` runs them (see adafocus.quantize.int8).
    """
    from adafocus.builtin import demo_export, task_for_export
    from adafocus.calibration.calibrate import calibrate_export
    from adafocus.calibration.plot import plot_curve
    from adafocus.calibration.report import format_table
    from adafocus.data.synthetic import TaskVideos
    from adafocus.export.manifest import open_export
    from adafocus.quantize import describe

    if threads:
        import torch

        torch.set_num_threads(threads)
    export = open_export(export_dir) if export_dir else demo_export()
    task, seed, meaningful = task_for_export(export, seed)
    if not meaningful:
        click.echo(
            f"note: {export.path} was not trained on the synthetic task ({task.preset.num_classes} classes used): "
            "accuracy is meaningless, the exit mix is realistic",
            err=True,
        )
    info = {
        "task": "synthetic 'find the detail' videos",
        "seed": seed,
        "calibration_split": "val",
        "calibration_videos": calibration_videos,
        "heldout_split": "test",
        "heldout_videos": heldout_videos,
        "accuracy_meaningful": meaningful,
    }
    result = calibrate_export(
        export.path,
        TaskVideos(task, "val", calibration_videos, batch_size),
        TaskVideos(task, "test", heldout_videos, batch_size) if heldout_videos else None,
        batch_size=batch_size,
        max_drop=max_drop,
        info=info,
    )
    report = result.to_dict() | {"default_rule": result.export.calibration["default_rule"]}
    if plot:
        title = f"{report['preset']}: early exit by entropy, {calibration_videos} calibration videos"
        title += f", {heldout_videos} held-out" if heldout_videos else ""
        report["plot"] = str(plot_curve(result.table, result.baselines, plot, title=title))
    if int8:
        batches = {"val": int8_videos, "test": heldout_videos, "batch_size": batch_size}
        report["int8"] = _quantise(result.export, task, batches, seed, meaningful, int(int8_weight_bits))
    if as_json:
        click.echo(dumps(report))
        return
    click.echo(format_table(report))
    click.echo(f"\nwrote {len(result.table)} budgets to {result.export.path / 'manifest.json'}")
    if plot:
        click.echo(f"wrote {report['plot']}")
    if int8:
        click.echo("\n" + describe(report["int8"]))


SPEED_BATCH = 128
SPEED_THREADS = 2


def _quantise(export: Export, task, videos: dict, seed: int, meaningful: bool, weight_bits: int) -> dict:
    """--int8: quantise on 'val' videos, compare fp32 and int8 on the held-out ones, store the comparison."""
    from adafocus.data.synthetic import TaskVideos
    from adafocus.quantize import compare_precisions, measure_speed, quantize_export, record_report

    info = {"task": "synthetic 'find the detail' videos", "seed": seed, "split": "val"}
    calibration = TaskVideos(task, "val", videos["val"], videos["batch_size"])
    quantize_export(export.path, calibration, weight_bits=weight_bits, info=info)
    report: dict = {}
    if videos["test"]:
        heldout = TaskVideos(task, "test", videos["test"], SPEED_BATCH)
        report["heldout"] = compare_precisions(export.path, heldout, threads=SPEED_THREADS)
        report["heldout"] |= {"split": "test", "accuracy_meaningful": meaningful}
    speed_videos, _ = task.batch("test", range(SPEED_BATCH))
    report["speed"] = measure_speed(export.path, speed_videos, threads=SPEED_THREADS)
    return record_report(export.path, report).int8
