"""`adafocus-calibrate`: exit thresholds for a range of FLOPs budgets, written into an export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from adafocus.clicommon import Command as _Command
from adafocus.export.manifest import Export
from adafocus.files import dumps

SYNTHETIC_TASK = "adafocus.train.synthetic.SyntheticTask"
MAX_TASK_CLASSES = 10  # the synthetic task's textures stay far apart for up to this many classes


def _meta_of(path: Path) -> dict:
    import torch

    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a foreign or unreadable file simply has no training record
        return {}
    meta = record.get("meta") if isinstance(record, dict) else None
    return meta if isinstance(meta, dict) else {}


def training_meta(export: Export) -> dict:
    """The training record (meta) of the checkpoint an export was made from, or {}.

    The export's own model.pt keeps only the weights' provenance, so the original checkpoint is
    found by the sha256 in `manifest["weights"]`: the built-in checkpoints, or the recorded path.
    """
    from adafocus.export.manifest import sha256_file
    from adafocus.weights import DEMO, DEMO_PIXEL, builtin_checkpoint

    meta = _meta_of(export.path / export.manifest["pytorch"])
    if "train_config" in meta:
        return meta
    weights = export.manifest.get("weights", {})
    digest = weights.get("sha256")
    if not digest:  # no digest to match: trust only the built-in model's own label
        return _meta_of(builtin_checkpoint(DEMO)) if weights.get("source") == "built-in demo model" else {}
    candidates = [builtin_checkpoint(DEMO), builtin_checkpoint(DEMO_PIXEL), Path(weights.get("source", ""))]
    for path in candidates:
        if path.is_file() and sha256_file(path) == digest:
            return _meta_of(path)
    return {}


def synthetic_task(export: Export, seed: int | None):
    """The synthetic task for this export's preset (classes capped at 10), with the training seed and
    easy share when the checkpoint records them; also says whether accuracy means anything."""
    from adafocus.train.synthetic import SyntheticTask

    meta = training_meta(export)
    config = meta.get("train_config") or {}
    seed = int(config.get("seed", 0)) if seed is None else seed
    preset = export.preset
    task_preset = dataclasses.replace(preset, num_classes=min(preset.num_classes, MAX_TASK_CLASSES))
    task = SyntheticTask(task_preset, seed=seed, easy_share=float(config.get("easy_share", 0.25)))
    meaningful = meta.get("task") == SYNTHETIC_TASK and task_preset.num_classes == preset.num_classes
    return task, seed, meaningful


SE_NOISE = 1e-9  # a standard error below this share of the mean cost is rounding, not spread


def format_table(report: dict) -> str:
    """The budget table as text, from `Calibration.to_dict()` (or the --json output)."""
    exits = len(report["exit_gflops"])
    lines = [
        f"{report['preset']} export {report['export']}",
        f"calibration: {report['calibration_videos']} '{report['calibration_split']}' videos; held-out: "
        f"{report['heldout_videos']} '{report['heldout_split']}' videos; task seed {report['seed']}",
        "GFLOPs/video by exit step: " + ", ".join(f"{g:.4f}" for g in report["exit_gflops"]),
    ]
    held = report["heldout_accuracy_per_step"] is not None
    head = f"  {'budget':>8} {'cal acc':>8}"
    if held:
        head += f" {'held acc':>8} {'realised':>9} {'diff':>8} {'diff/se':>7}"
    head += "  exit fractions t=0.." + str(exits - 1)
    lines += ["", head]
    for i, e in enumerate(report["budgets"]):
        mark = "*" if i == report["default_entry"] else " "
        row = f"{mark} {e['gflops']:8.4f} {100 * e['accuracy']:7.1f}%"
        if held:
            diff = e["heldout_gflops_minus_budget"]
            se = e["heldout_gflops_stderr"]
            # every held-out video costing the same (one exit step) leaves float noise, ~1e-19, as
            # the standard error: there is no spread to divide by
            z = f"{diff / se:7.2f}" if se > SE_NOISE * e["heldout_gflops"] else f"{'—':>7}"
            row += f" {100 * e['heldout_accuracy']:7.1f}% {e['heldout_gflops']:9.4f} {diff:+8.4f} {z}"
        row += "  " + " ".join(f"{f:.3f}" for f in e["exit_fractions"])
        lines.append(row)
    lines.append("")
    lines.append("* default (manifest thresholds): " + report["default_rule"])
    if held:
        lines.append(
            "diff = realised held-out GFLOPs - calibration GFLOPs; se = standard error of the held-out mean cost"
        )
    per_step = report["heldout_accuracy_per_step"] if held else report["calibration_accuracy_per_step"]
    lines.append(
        f"fixed t cubes for every video ({'held-out' if held else 'calibration'}): "
        + ", ".join(f"t={t}: {100 * a:.1f}% @ {g:.4f}" for t, (a, g) in enumerate(zip(per_step, report["exit_gflops"])))
    )
    if not report.get("accuracy_meaningful", True):
        lines.append(
            "note: this model was not trained on the synthetic task, so its accuracies mean nothing; "
            "the exit mix and GFLOPs are realistic"
        )
    return "\n".join(lines)


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
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
    `Runtime.load(dir, "onnxruntime", precision="int8")` runs them (see adafocus.calibration.int8).
    """
    from adafocus.calibration.calibrate import TaskVideos, calibrate_export
    from adafocus.calibration.plot import plot_curve
    from adafocus.export.manifest import open_export

    if threads:
        import torch

        torch.set_num_threads(threads)
    if export_dir is None:
        from adafocus.export.builtin import demo_export

        export = demo_export()
    else:
        export = open_export(export_dir)
    task, seed, meaningful = synthetic_task(export, seed)
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
    report = result.to_dict()
    report["default_rule"] = result.export.manifest["calibration"]["default_rule"]
    if plot:
        title = f"{report['preset']}: early exit by entropy, {calibration_videos} calibration videos"
        if heldout_videos:
            title += f", {heldout_videos} held-out"
        report["plot"] = str(plot_curve(result.table, result.baselines, plot, title=title))
    if int8:
        report["int8"] = _quantise(
            result.export, task, int8_videos, heldout_videos, batch_size, seed, meaningful, int(int8_weight_bits)
        )
    if as_json:
        click.echo(dumps(report))
        return
    click.echo(format_table(report))
    click.echo(f"\nwrote {len(result.table)} budgets to {result.export.path / 'manifest.json'}")
    if plot:
        click.echo(f"wrote {report['plot']}")
    if int8:
        click.echo("\n" + format_int8(report["int8"]))


SPEED_BATCH = 128
SPEED_THREADS = 2


def _quantise(
    export: Export, task, videos: int, heldout: int, batch_size: int, seed: int, meaningful: bool, weight_bits: int
) -> dict:
    """--int8: quantise on 'val' videos, compare fp32 and int8 on the held-out ones, store the comparison."""
    from adafocus.calibration.calibrate import TaskVideos
    from adafocus.calibration.int8 import compare_precisions, measure_speed, quantize_export, record_report

    info = {"task": "synthetic 'find the detail' videos", "seed": seed, "split": "val"}
    quantize_export(export.path, TaskVideos(task, "val", videos, batch_size), weight_bits=weight_bits, info=info)
    report: dict = {}
    if heldout:
        report["heldout"] = compare_precisions(
            export.path, TaskVideos(task, "test", heldout, SPEED_BATCH), threads=SPEED_THREADS
        )
        report["heldout"] |= {"split": "test", "accuracy_meaningful": meaningful}
    speed_videos, _ = task.batch("test", range(SPEED_BATCH))
    report["speed"] = measure_speed(export.path, speed_videos, threads=SPEED_THREADS)
    return record_report(export.path, report).manifest["int8"]


def format_int8(record: dict) -> str:
    """The manifest's `int8` record as text."""
    quantised = [g for g, r in record["graphs"].items() if r["quantized"]]
    lines = [
        f"INT8: {', '.join(f'{g}.int8.onnx' for g in quantised)} ({record['format']}; {record['method']} ranges "
        f"from {record['calibration_videos']} '{record['split']}' videos through the fp32 loop; "
        f"onnxruntime {record['onnxruntime']}); other graphs stay fp32",
    ]
    if held := record.get("heldout"):
        lines.append(
            f"  held-out ({held['videos']} '{held['split']}' videos, manifest thresholds): accuracy "
            f"fp32 {100 * held['fp32_accuracy']:.1f}% -> int8 {100 * held['int8_accuracy']:.1f}%; "
            f"exit step changed for {100 * held['exit_step_changed']:.1f}%, "
            f"class for {100 * held['class_changed']:.1f}%; "
            f"GFLOPs/video {held['fp32_gflops']:.4f} -> {held['int8_gflops']:.4f}"
        )
        if not held["accuracy_meaningful"]:
            lines.append("  (this model was not trained on the synthetic task: its accuracies mean nothing)")
    speed = record["speed"]
    lines.append(
        f"  CPU speed (Runtime.predict, batch {speed['batch']}, {speed['threads']} threads, median of "
        f"{speed['runs']}): fp32 {speed['fp32_videos_per_s']:.0f} videos/s, int8 {speed['int8_videos_per_s']:.0f} "
        f"videos/s ({speed['speedup']:.2f}x); load average {speed['load_average'][0]:.1f} on {speed['cpus']} CPUs"
    )
    return "\n".join(lines)


main = calibrate  # console-script entry point: adafocus.calibration.cli:calibrate (or :main)

if __name__ == "__main__":  # python -m adafocus.calibration.cli, until the console script is registered
    calibrate()
