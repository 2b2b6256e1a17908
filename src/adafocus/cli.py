"""The `adafocus` command: a thin click layer over the Python API."""

from __future__ import annotations

import click

from adafocus.clicommon import Command as _Command
from adafocus.clicommon import Group as _Group
from adafocus.files import dumps


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adafocus-deploy")
def main() -> None:
    """adafocus-deploy: AdaFocusV3 video recognition, exported and run fast with early exit."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print every field of every preset as JSON.")
def presets(as_json: bool) -> None:
    """List the model presets: the paper's configurations and the small demo."""
    from adafocus.model.presets import ALIASES, PRESETS

    if as_json:
        click.echo(dumps({"presets": [p.to_dict() for p in PRESETS.values()], "aliases": ALIASES}))
        return
    header = f"{'name':<20} {'classes':>7} {'frames':>6} {'glance':>6} {'cube (h×w×t)':>13} {'K':>3}  backbones"
    click.echo(header)
    click.echo("-" * len(header) + "-" * 24)
    for p in PRESETS.values():
        cube = f"{p.cube_size}²×{p.cube_frames}"
        glance = f"MobileNetV2×{p.glance_width:g}@{p.glance_size}"
        backbones = f"{'TSM ' if p.tsm else ''}{glance} + {p.local_arch}"
        click.echo(
            f"{p.name:<20} {p.num_classes:>7} {p.num_frames:>6} {p.glance_frames:>6} {cube:>13} "
            f"{p.max_cubes:>3}  {backbones}"
        )
    click.echo("\naliases: " + ", ".join(f"{a} = {n}" for a, n in ALIASES.items()))


@main.command()
@click.argument("preset")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (GFLOPs per video).")
def flops(preset: str, as_json: bool) -> None:
    """Multiply-adds ("GFLOPs" in the paper) of PRESET, counted from the PyTorch modules.

    Per sub-network, per exit step (the cost of a video that stops after t cubes) and for the
    dense baseline (the local network on every glance frame at full resolution, plus the glance).
    """
    from adafocus.flops import count_flops
    from adafocus.model.presets import get_preset

    report = count_flops(get_preset(preset))
    if as_json:
        click.echo(dumps(report.to_dict()))
        return
    r = report
    rows = [
        ("glance fG (all glance frames)", r.glance),
        ("  per frame", r.glance_per_frame),
        ("classifier, glance step (p0)", r.classifier_glance),
        ("policy π", r.policy),
        ("local fL, one cube", r.cube),
        ("  per cube frame", r.local_per_frame),
        ("classifier, per cube", r.classifier_step),
        *((f"exit after {t} cube{'s' if t != 1 else ''}", g) for t, g in enumerate(r.exit_cumulative)),
        ("dense baseline", r.dense_baseline),
    ]
    click.echo(f"GFLOPs (multiply-adds) per video, preset {r.preset}")
    for label, value in rows:
        click.echo(f"  {label:<32} {value:9.4f}")


@main.command()
@click.option("--preset", default="demo", show_default=True, help="Model preset to train.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory (state + model.pt).")
@click.option("--steps", type=click.IntRange(1), default=1200, show_default=True, help="Optimisation steps.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Videos per step.")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak AdamW learning rate (cosine decay).")
@click.option(
    "--gradient",
    type=click.Choice(["deep", "pixel"]),
    default="deep",
    show_default=True,
    help="How the policy learns: deep-feature (paper Eq. 5-6) or pixel-based (Eq. 2-4) gradient estimation.",
)
@click.option(
    "--schedule",
    type=click.Choice(["two-stage", "joint"]),
    default="two-stage",
    show_default=True,
    help="two-stage (appendix C): encoders+classifier under a random policy, then the policy alone; "
    "joint: all networks together from the start.",
)
@click.option("--val-every", type=click.IntRange(1), default=200, show_default=True, help="Validate every N steps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the task and the initialisation.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads (default: all cores).")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out (same options).")
@click.option("--stop-at", type=click.IntRange(1), default=None, help="Pause after step N; continue with --resume.")
def train(preset, out, steps, batch_size, lr, gradient, schedule, val_every, seed, threads, resume, stop_at) -> None:
    """Train a model on the synthetic 'find the detail' task (see README).

    Progress, periodic validation (accuracy after t cubes) and a resumable state in OUT; the result
    is OUT/model.pt.
    """
    import torch

    from adafocus.model.presets import get_preset
    from adafocus.train.trainer import TrainConfig
    from adafocus.train.trainer import train as run_training

    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, gradient=gradient, schedule=schedule, val_every=val_every, seed=seed
    )
    path = run_training(get_preset(preset), out, config, resume=resume, stop_at=stop_at, log=click.echo)
    if path is not None:
        click.echo(f"wrote {path}")


@main.command()
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Model to evaluate [default: the built-in demo model].",
)
@click.option(
    "--pixel-checkpoint",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="The same model trained with pixel-based gradients [default: the built-in one, with the demo model].",
)
@click.option("--videos", type=click.IntRange(1), default=1000, show_default=True, help="Held-out videos.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate(checkpoint, pixel_checkpoint, videos, as_json) -> None:
    """Held-out accuracy after t cubes (learned vs random policy vs pixel-based gradients) and
    early exit at a few thresholds, on the synthetic task."""
    from adafocus.model.checkpoint import load_checkpoint
    from adafocus.train.evaluate import evaluate as run_evaluation
    from adafocus.train.synthetic import SyntheticTask
    from adafocus.weights import DEMO_PIXEL, builtin_checkpoint

    if checkpoint is None:
        checkpoint = builtin_checkpoint()
        pixel_checkpoint = pixel_checkpoint or builtin_checkpoint(DEMO_PIXEL)
    loaded = load_checkpoint(checkpoint)
    pixel = load_checkpoint(pixel_checkpoint, preset=loaded.preset).model if pixel_checkpoint else None
    seed = loaded.meta.get("train_config", {}).get("seed", 0)
    task = SyntheticTask(loaded.preset, seed=seed)
    results = run_evaluation(loaded.model, task, count=videos, pixel_model=pixel, progress=True)
    if as_json:
        click.echo(dumps(results))
        return
    steps = results["accuracy_per_step"]
    click.echo(f"held-out accuracy after t cubes ({videos} {results['split']} videos, preset {results['preset']})")
    click.echo("  t        " + "".join(f"{t:>8}" for t in range(len(steps["learned"]))))
    for name, values in steps.items():
        if values is not None:
            click.echo(f"  {name:<9}" + "".join(f"{100 * a:>7.1f}%" for a in values))
    click.echo("early exit (entropy threshold at every step):")
    for point in results["early_exit"]:
        click.echo(
            f"  η={point['threshold']:<5} accuracy {100 * point['accuracy']:5.1f}%  "
            f"GFLOPs/video {point['gflops']:.4f}  exits per step "
            + " ".join(f"{f:.2f}" for f in point["exit_fractions"])
        )


def _batch_range(ctx, param, value: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in value.split(":"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise click.BadParameter(f"{value!r} is not MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX (e.g. 1:128:128)")
    return parts


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Trained model (adafocus checkpoint or a foreign state dict with --preset) "
    "[default: the built-in demo model; with --preset alone: random weights of that preset].",
)
@click.option("--preset", default=None, help="Preset of the model (see `adafocus presets`).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights (--preset alone).")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Export directory to write [default: exports/PRESET].",
)
@click.option("--opset", type=click.IntRange(18), default=18, show_default=True, help="ONNX opset (18 or newer).")
@click.option(
    "--exporter",
    type=click.Choice(["dynamo", "torchscript"]),
    default="dynamo",
    show_default=True,
    help="torch.onnx exporter; dynamo falls back to torchscript (recorded in the manifest) if it fails.",
)
@click.option("--validate-batch", type=click.IntRange(2), default=5, show_default=True, help="Larger validation batch.")
@click.option("--trt", is_flag=True, help="Also build TensorRT engines (needs tensorrt and an NVIDIA GPU).")
@click.option(
    "--precision",
    type=click.Choice(["fp16", "fp32"]),
    multiple=True,
    default=("fp16",),
    show_default=True,
    help="TensorRT engine precision (repeat for both). Strongly typed: fp16 engines come from fp16 graphs.",
)
@click.option(
    "--batch-range",
    default="1:128:128",
    show_default=True,
    callback=_batch_range,
    help="TensorRT optimisation profile MIN:OPT:MAX over the batch sizes the runtime will use.",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def export(checkpoint, preset, seed, out, opset, exporter, validate_batch, trt, precision, batch_range, force) -> None:
    """Export a model to ONNX: glance, policy, crop, local and classifier graphs with a dynamic batch
    axis, each validated against PyTorch in ONNX Runtime, plus manifest.json (shapes, GFLOPs counted
    from the graphs, validation errors, sha256 of every file). With --trt, TensorRT engines too.

    Nothing is left behind if any step fails: the directory appears only when complete.
    """
    from adafocus.export.exporter import export_model

    model, class_names, weights = _model_to_export(checkpoint, preset, seed)
    out = out or f"exports/{model.preset.name}"
    export_model(
        model,
        out,
        class_names=class_names,
        weights=weights,
        opset=opset,
        exporter=exporter,
        validate_batch=validate_batch,
        trt=trt,
        precisions=precision,
        batch_range=batch_range,
        force=force,
        log=click.echo,
    )


def _model_to_export(checkpoint, preset_name, seed):
    import torch

    from adafocus.export.manifest import sha256_file
    from adafocus.model import build_model, get_preset, load_checkpoint
    from adafocus.model.checkpoint import default_class_names
    from adafocus.weights import builtin_checkpoint

    preset = get_preset(preset_name) if preset_name else None
    if checkpoint is None and preset is not None:
        torch.manual_seed(seed)
        model = build_model(preset)
        return model, default_class_names(preset), {"source": "random", "seed": seed}
    path = checkpoint or builtin_checkpoint()
    loaded = load_checkpoint(path, preset=preset)
    source = "built-in demo model" if checkpoint is None else str(path)
    return loaded.model, loaded.class_names, {"source": source, "sha256": sha256_file(path)}


main.add_command(export)


def _floats(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


RESULTS_DIR = "adafocus-results"  # where reports go by default: untracked, git-ignored


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dir", required=False, type=click.Path(file_okay=False, exists=True))
@click.option("--preset", default=None, help="Benchmark this preset with random weights (exported once, cached).")
@click.option(
    "--backend",
    "backends",
    type=click.Choice(["onnxruntime", "pytorch", "tensorrt"]),
    multiple=True,
    default=("onnxruntime",),
    show_default=True,
    help="Backend(s) to measure; repeat the option for several.",
)
@click.option("--batch", type=click.IntRange(1), default=128, show_default=True, help="Videos per batch.")
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True, help="Timed runs per method.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads (ONNX Runtime and torch).")
@click.option("--thresholds", callback=_floats, default=None, help="Exit thresholds, K+1 comma-separated entropies.")
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
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Where the backend runs [default: cpu; cuda for tensorrt]. The videos, the dense baseline and the "
    "PyTorch-eager loop go to the same device; on cuda the thresholds for --budget are also solved there.",
)
@click.option("--no-reference", is_flag=True, help="Skip the (slow) PyTorch-eager reference loop.")
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
    repeats,
    warmup,
    threads,
    thresholds,
    budget,
    precision,
    device,
    no_reference,
    out,
):
    """Videos/s of adaptive inference vs the dense baseline and the PyTorch-eager reference loop,
    measured in one run on the same backend and the same videos (default: the built-in demo export,
    ONNX Runtime on the CPU, batch 128).

    Prints a table and writes JSON (with machine details) and a PNG. realisation = (adaptive videos/s
    ÷ dense videos/s) ÷ (dense GFLOPs ÷ adaptive GFLOPs); loop_overhead = share of the adaptive run
    spent outside the graphs.
    """
    from pathlib import Path

    import torch

    from adafocus import bench as b
    from adafocus.calibration.thresholds import thresholds_to_json
    from adafocus.export.builtin import demo_export, random_export
    from adafocus.export.manifest import open_export

    if threads:
        torch.set_num_threads(threads)
    if export_dir and preset:
        raise click.UsageError("give EXPORT_DIR or --preset, not both")
    export = open_export(export_dir) if export_dir else random_export(preset) if preset else demo_export()
    runtime_thresholds, how = _bench_thresholds(export, thresholds, budget, batch, device or "cpu")
    shown = ", ".join(f"{t:.4g}" for t in runtime_thresholds)
    click.echo(f"preset {export.preset.name}, batch {batch}, {repeats} runs after {warmup} warm-up", err=True)
    click.echo(f"thresholds {shown} ({how})", err=True)
    videos = b.bench_videos(export, batch)
    report = {
        "preset": export.preset.name,
        "export": str(export.path),
        "batch": batch,
        "thresholds": thresholds_to_json(runtime_thresholds),  # ±1e9 for ±inf: JSON has no infinities
        "thresholds_from": how,
        "precision": precision or "backend default",
        "inputs_on_device": True,
        "machine": b.machine(),
        "backends": [
            b.bench_backend(
                export,
                name,
                videos,
                runtime_thresholds,
                repeats=repeats,
                warmup=warmup,
                threads=threads,
                precision=precision,
                device=device,
                reference=not no_reference,
                log=lambda line: click.echo(line, err=True),
            )
            for name in backends
        ],
    }
    suffix = (f"-{device}" if device and device != "cpu" else "") + (f"-{precision}" if precision else "")
    out = Path(out)
    if out.suffix != ".json":
        out = out / f"bench-{export.preset.name}-{'-'.join(backends)}{suffix}.json"
    b.write_report(report, out)
    b.plot_report(report, out.with_suffix(".png"))
    for r in report["backends"]:
        click.echo(f"\n{r['backend']['backend']} ({r['backend']['device']}), batch {batch}")
        click.echo(f"  {'method':<16} {'videos/s':>9} {'ms/batch p50':>13} {'p99':>9} {'GFLOPs/video':>13}")
        for name, m in r["methods"].items():
            click.echo(
                f"  {name:<16} {m['videos_per_s']:9.1f} {m['ms_per_batch_p50']:13.1f} "
                f"{m['ms_per_batch_p99']:9.1f} {m['gflops_per_video']:13.4f}"
            )
        click.echo(
            f"  realisation {r['realisation']:.2f}   loop overhead {100 * r['loop_overhead']:.1f} %   "
            + (f"speed-up vs torch eager {r['speedup_vs_torch_eager']:.2f}×   " if r["speedup_vs_torch_eager"] else "")
            + "exits per step "
            + "/".join(str(e) for e in r["exits_per_step"])
        )
    click.echo(f"\nwrote {out} and {out.with_suffix('.png')}")


def _bench_thresholds(export, thresholds, budget, count: int, device: str) -> tuple[list[float], str]:
    """The thresholds to benchmark with, and how they were chosen."""
    import math

    from adafocus.bench import thresholds_for_budget
    from adafocus.runtime.runtime import budget_entry

    def finite(values):
        return [-math.inf if t is None else float(t) for t in values]

    k1 = export.preset.num_exits
    if thresholds is not None and budget is not None:
        raise click.UsageError("give --thresholds or --budget, not both")
    if thresholds is not None:
        if len(thresholds) != k1:
            raise click.BadParameter(f"needs {k1} values (steps 0..{k1 - 1})", param_hint="--thresholds")
        return thresholds, "given with --thresholds"
    if budget is not None and export.manifest["budgets"]:
        entry = budget_entry(export, budget)
        return finite(entry["thresholds"]), f"calibrated entry {entry['gflops']:.4f} GFLOPs for budget {budget}"
    if budget is not None:
        values, realised = thresholds_for_budget(export, budget, count, device)
        return values, f"solved for budget {budget} on {count} generated videos ({realised:.3f} GFLOPs there)"
    stored = export.manifest["thresholds"]
    if stored is None:
        return [-math.inf] * k1, "none calibrated: every video uses all cubes"
    return finite(stored), "the export's default (calibrated) thresholds"


main.add_command(bench)

# commands that live beside their API; imported last because they use _Command
from adafocus.calibration.cli import calibrate  # noqa: E402
from adafocus.predict import predict  # noqa: E402

main.add_command(calibrate)
main.add_command(predict)
