"""The `adafocus` command and its standalone twins (`adafocus-export`, `-bench`, `-calibrate`,
`-predict`): a thin click layer over the Python API, one module per command that needs more than a
screen. Heavy imports happen inside the commands, so `--help` and light commands start fast."""

from __future__ import annotations

import click

from adafocus.cli.bench import bench
from adafocus.cli.calibrate import calibrate
from adafocus.cli.common import CONTEXT, Group
from adafocus.cli.export import export
from adafocus.cli.predict import predict
from adafocus.files import dumps

__all__ = ["bench", "calibrate", "export", "main", "predict"]


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


for command in (export, bench, calibrate, predict):
    main.add_command(command)
