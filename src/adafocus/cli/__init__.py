"""The `adafocus` command and its standalone twins (`adafocus-export`, `-bench`, `-calibrate`,
`-predict`): a thin click layer over the Python API, one module per command that needs more than a
screen. Heavy imports happen inside the commands, so `--help` and light commands start fast."""

from __future__ import annotations

import click

from adafocus.cli.bench import bench
from adafocus.cli.calibrate import calibrate
from adafocus.cli.common import CONTEXT, Group, backend_choice, device_choice, refuse_unused
from adafocus.cli.export import export
from adafocus.cli.predict import predict
from adafocus.cli.serve import serve
from adafocus.cli.sets import LIST_FORMATS, FileSets, report_left_out, set_options
from adafocus.errors import AdaFocusError
from adafocus.files import dumps

__all__ = ["bench", "calibrate", "export", "main", "predict", "serve"]


@click.group(cls=Group, context_settings=CONTEXT)
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
    from adafocus.model.flops import count_flops
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
        # Uni-AdaFocus: the stacked step heads compute the other heads too, not in the costs below
        *((("  + unused step heads (computed)", r.classifier_step_unused),) if r.classifier_step_unused else ()),
        *((f"exit after {t} cube{'s' if t != 1 else ''}", g) for t, g in enumerate(r.exit_cumulative)),
        ("dense baseline", r.dense_baseline),
    ]
    click.echo(f"GFLOPs (multiply-adds) per video, preset {r.preset}")
    for label, value in rows:
        click.echo(f"  {label:<32} {value:9.4f}")


@main.command()
@click.option("--preset", default=None, help="Model preset to train [default: --init's, else demo].")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory (state + model.pt).")
@click.option(
    "--data",
    type=click.Path(exists=True),
    default=None,
    help="Your training videos: " + LIST_FORMATS + ". Clips are sampled with TSN's random offsets. "
    "[default: the synthetic 'find the detail' task]",
)
@click.option("--val-data", type=click.Path(exists=True), default=None, help="With --data: validation videos.")
@click.option(
    "--init",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Fine-tune this checkpoint (its preset and class names) instead of starting from random weights.",
)
@click.option(
    "--glance-weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="Start the glance encoder from this torchvision mobilenet_v2 ImageNet state dict on disk (not downloaded).",
)
@click.option(
    "--local-weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="Start the local encoder from this torchvision resnet50/resnet18 ImageNet state dict on disk.",
)
@set_options
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
    type=click.Choice(["two-stage", "joint", "refine"]),
    default="two-stage",
    show_default=True,
    help="two-stage (appendix C): encoders+classifier under a random policy, then the policy alone; "
    "joint: all networks together from the start; refine (needs --init): the local encoder and the "
    "classifier alone, on the cubes the checkpoint's frozen policy picks (AdaFocus V1's stage III).",
)
@click.option("--val-every", type=click.IntRange(1), default=200, show_default=True, help="Validate every N steps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data order and the initialisation.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads (default: all cores).")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out (same options).")
@click.option("--stop-at", type=click.IntRange(1), default=None, help="Pause after step N; continue with --resume.")
def train(preset, out, data, val_data, init, glance_weights, local_weights, root, workers, max_bad, **options) -> None:
    """Train a model: on the synthetic 'find the detail' task (see README), or on your labelled
    videos (--data, validated on --val-data), decoded exactly as adafocus-predict decodes them by a
    DataLoader of --workers processes.

    Class names come from --init's checkpoint, else from a class-per-folder tree's folders, else
    the preset's (class_0 ...); the model gets as many classes as there are. Progress, periodic
    validation (accuracy after t cubes) and a resumable state in OUT; the result is OUT/model.pt.
    """
    import torch

    from adafocus.train.trainer import TrainConfig
    from adafocus.train.trainer import train as run_training

    if options["threads"]:
        torch.set_num_threads(options["threads"])
    if data is None:  # given, not compared with the defaults: `--workers 2` alone is refused too
        for_files = ("val_data", "root", "workers", "max_bad")
        refuse_unused(for_files, "without --data: they are for your videos", "give --data")
    if options["schedule"] == "refine" and init is None:
        raise AdaFocusError(
            "--schedule refine trains fL and fC under a trained policy, and there is none without --init",
            "give --init CHECKPOINT (e.g. the model.pt of a two-stage run)",
        )
    model_preset, class_names, start_from = _training_start(preset, data, init, glance_weights, local_weights)
    keys = ("steps", "batch_size", "lr", "gradient", "schedule", "val_every", "seed")
    config = TrainConfig(**{k: options[k] for k in keys})
    source = None
    if data is not None:
        from adafocus.train.sources import FileSource

        files = FileSets(class_names, model_preset, root=root, workers=workers, max_bad=max_bad)
        train_set = files.read(data)  # every label checked before anything is decoded
        val_set = files.read(val_data) if val_data else None
        log = lambda line: click.echo(line, err=True)  # noqa: E731
        source = FileSource(
            train_set, val_set, model_preset, seed=config.seed, workers=workers, max_bad=max_bad, log=log
        )
    path = run_training(
        model_preset,
        out,
        config,
        source=source,
        start_from=start_from,
        resume=options["resume"],
        stop_at=options["stop_at"],
        log=click.echo,
    )
    if source is not None and source.left_out:
        click.echo(f"{data}: {len(source.left_out)} videos left out (see above)", err=True)
    if path is not None:
        click.echo(f"wrote {path}")


def _training_start(preset, data, init, glance_weights, local_weights):
    """The preset, the class names and the initialisation of `adafocus train` (see its help)."""
    import dataclasses
    import os

    from adafocus.model import build_model
    from adafocus.model.checkpoint import default_class_names, load_checkpoint
    from adafocus.model.presets import get_preset
    from adafocus.model.pretrained import load_encoder_weights

    loaded = load_checkpoint(init) if init else None
    chosen = get_preset(preset) if preset else (loaded.preset if loaded else get_preset("demo"))
    if chosen.family != "adafocusv3":
        raise AdaFocusError(
            f"preset {chosen.name!r} is a Uni-AdaFocus model: `adafocus train` trains AdaFocusV3 models only",
            "start from the published Uni-AdaFocus weights (adafocus-export --checkpoint FILE --preset "
            f"{chosen.name}) or pick an AdaFocusV3 preset",
        )
    if loaded is not None:
        if chosen.to_dict() != loaded.preset.to_dict():
            raise AdaFocusError(f"{init} is a {loaded.preset.name!r} model, not {chosen.name!r}", "drop --preset")
        class_names = loaded.class_names
    elif data is not None and os.path.isdir(data):
        from adafocus.data.labelled import tree_classes

        class_names = tree_classes(data)
    else:
        class_names = default_class_names(chosen)
    if len(class_names) != chosen.num_classes:
        chosen = dataclasses.replace(chosen, num_classes=len(class_names))  # the data's classes, not the preset's

    def start_from(model) -> dict:
        done = {}
        if loaded is not None:
            model.load_state_dict(loaded.model.state_dict())
            done["checkpoint"] = os.fspath(init)
        if glance_weights:
            done["glance"] = load_encoder_weights(model.glance, glance_weights, "glance")
        if local_weights:
            done["local"] = load_encoder_weights(model.local, local_weights, "local")
        return done

    if glance_weights or local_weights:  # a missing or mismatched file fails now, not after the data is read
        start_from(build_model(chosen))
    return chosen, class_names, start_from


@main.command()
@click.option(
    "--export",
    "export_dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Evaluate this export through a deployed engine [default with --data: the built-in demo export].",
)
@click.option(
    "--data",
    type=click.Path(exists=True),
    default=None,
    help="Your held-out videos: " + LIST_FORMATS + ". [default with --export: the synthetic 'test' split]",
)
@click.option("--backend", type=backend_choice(), default="onnxruntime", show_default=True, help="With --export.")
@click.option("--device", type=device_choice(), default=None, help="With --export: where the backend runs.")
@click.option(
    "--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None, help="With --export: graph precision."
)
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="With --export: write the front (PNG).")
@click.option(
    "--metric",
    type=click.Choice(["accuracy", "map"]),
    default="accuracy",
    show_default=True,
    help="With --export: measure mean average precision too (map: for multi-label sets, labels written `12;57`) "
    "and show it instead of accuracy.",
)
@set_options
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Videos per forward pass.")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Without --export: the model to evaluate on the synthetic task [default: the built-in demo model].",
)
@click.option(
    "--pixel-checkpoint",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="The same model trained with pixel-based gradients [default: the built-in one, with the demo model].",
)
@click.option("--videos", type=click.IntRange(1), default=1000, show_default=True, help="Synthetic held-out videos.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate(
    export_dir,
    data,
    backend,
    device,
    precision,
    plot,
    metric,
    batch_size,
    checkpoint,
    pixel_checkpoint,
    videos,
    as_json,
    **sets,
):
    """Accuracy against GFLOPs on held-out videos.

    With --export (or --data): the export runs through the runtime on --backend, early exit off,
    on your videos (--data) or synthetic ones: accuracy after t cubes for every video (t = 0..K) and
    the accuracy-vs-GFLOPs front of the export's calibrated budgets (paper Fig. 3), each realised on
    these videos. JSON keys: metric, accuracy_per_step (list over t; and map_per_step with --metric
    map), budgets ([{gflops, accuracy, (map,) ...}]), videos, left_out, fixed_cubes, gflops_per_exit_step.

    Without: a PyTorch checkpoint on the synthetic task: accuracy after t cubes with the learned
    policy, a random one and pixel-based gradients, and early exit at a few thresholds.
    """
    if export_dir is not None or data is not None:
        refuse_unused(
            ("checkpoint", "pixel_checkpoint"),
            "with --export or --data, which evaluate an export",
            "leave them out, or evaluate the checkpoint on the synthetic task without --export and --data "
            "(or export it with adafocus-export and give --export)",
        )
        if data is not None:
            refuse_unused(("videos",), "with --data: every listed video is evaluated", "leave --videos out")
        report = _evaluate_export(export_dir, data, backend, device, precision, plot, metric, batch_size, videos, sets)
        if as_json:
            click.echo(dumps(report))
            return
        click.echo(
            f"{report['preset']} export {report['export']} on {report['engine']['backend']} "
            f"({report['engine']['device']}, {report['engine']['precision']}): {report['videos']} videos"
        )
        name = {"accuracy": "accuracy", "map": "mAP"}[metric]
        click.echo(f"{name} after t cubes, every video (no exit):")
        for point in report["fixed_cubes"]:
            click.echo(f"  t={point['cubes']}  {100 * point[metric]:5.1f}%  @ {point['gflops']:.4f} GFLOPs")
        click.echo(f"calibrated budgets (entropy exit), {name} realised on these videos:")
        for b in report["budgets"]:
            click.echo(f"  budget {b['budget_gflops']:.4f}: {100 * b[metric]:5.1f}% @ {b['gflops']:.4f} GFLOPs")
        if not report["budgets"]:
            click.echo("  none: the export is not calibrated (adafocus-calibrate)")
        if plot:
            click.echo(f"wrote {report['plot']}")
        return
    refuse_unused(
        ("backend", "device", "precision", "plot"),
        "without --export or --data: a PyTorch checkpoint is evaluated",
        "give --export (or --data) to evaluate an export on that backend, or leave them out",
    )
    refuse_unused(("root", "workers", "max_bad"), "without --data: they are for your videos", "give --data")
    if metric != "accuracy":
        raise AdaFocusError("--metric is measured on an export", "give --export (or --data)")
    from adafocus.data.synthetic import SyntheticTask
    from adafocus.model.checkpoint import load_checkpoint
    from adafocus.train.evaluate import evaluate as run_evaluation
    from adafocus.weights import DEMO_PIXEL, builtin_checkpoint

    if checkpoint is None:
        checkpoint = builtin_checkpoint()
        pixel_checkpoint = pixel_checkpoint or builtin_checkpoint(DEMO_PIXEL)
    loaded = load_checkpoint(checkpoint)
    pixel = load_checkpoint(pixel_checkpoint, preset=loaded.preset).model if pixel_checkpoint else None
    seed = loaded.meta.get("train_config", {}).get("seed", 0)
    task = SyntheticTask(loaded.preset, seed=seed)
    results = run_evaluation(loaded.model, task, count=videos, pixel_model=pixel, batch=batch_size, progress=True)
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


def _evaluate_export(export_dir, data, backend, device, precision, plot, metric, batch_size, videos, sets) -> dict:
    """evaluate --export: the export through the runtime on your videos or the synthetic task's."""
    from adafocus.builtin import demo_export, task_for_export
    from adafocus.calibration.evaluate import evaluate_export
    from adafocus.calibration.plot import plot_curve
    from adafocus.export.manifest import open_export
    from adafocus.runtime import Runtime

    export = open_export(export_dir) if export_dir else demo_export()
    options = {"precision": precision} if precision else {}
    files = FileSets(export.class_names, export.preset, **sets)
    labelled = files.read(data) if data else None  # labels checked before the engine loads or anything decodes
    engine = Runtime.load(export.path, backend, device, **options)
    if labelled is not None:
        batches = files.batches(labelled, batch_size, "evaluating")
        report = evaluate_export(engine, batches, metric=metric)
        report |= {"data": labelled.source} | report_left_out(f"videos ({labelled.source})", batches.report)
    else:
        from adafocus.data.synthetic import TaskVideos

        task, seed, meaningful = task_for_export(export)
        report = evaluate_export(engine, TaskVideos(task, "test", videos, batch_size), progress=True, metric=metric)
        report |= {"data": {"synthetic": {"seed": seed, "split": "test"}, "accuracy_meaningful": meaningful}}
        report |= {"used": report["videos"], "left_out": []}
    if plot:
        table = [{"gflops": b["gflops"], metric: b[metric]} for b in report["budgets"]]
        title = f"{report['preset']}: calibrated budgets on {report['videos']} videos ({backend})"
        baselines = {"fixed_cubes": report["fixed_cubes"]}
        report["plot"] = str(plot_curve(table, baselines, plot, title=title, metric=metric))
    return report


@main.command()
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="val", show_default=True)
@click.option("--videos", type=click.IntRange(1), default=200, show_default=True, help="How many videos.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for the videos and labels.txt.")
@click.option("--preset", default="demo", show_default=True, help="Shapes of the videos (frames, size).")
@click.option("--seed", type=int, default=0, show_default=True, help="Task seed (the demo model was trained on 0).")
@click.option("--start", type=click.IntRange(0), default=0, show_default=True, help="Index of the first video.")
def synth(split, videos, out, preset, seed, start) -> None:
    """Write synthetic-task videos as real video files plus a labels list (OUT/labels.txt: `path
    label` per line), so that every command that reads video files can be shown and tested on them.

    The files are lossless: H.264 in RGB at qp 0 (libx264rgb), which decodes back to exactly the
    generated pixels. The glyphs' textures are one pixel wide: chroma subsampling (yuv420p) or any
    lossy setting erases them, so do not re-encode these files.
    """
    from adafocus.data.synthetic import SyntheticTask, write_split
    from adafocus.model.presets import get_preset

    task = SyntheticTask(get_preset(preset), seed=seed)
    labels = write_split(task, split, videos, out, start=start)
    click.echo(f"wrote {videos} videos and {labels}")


for command in (export, bench, calibrate, predict, serve):
    main.add_command(command)
