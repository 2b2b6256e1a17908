"""The `adafocus` command: a thin click layer over the Python API."""

from __future__ import annotations

import json
import sys

import click

from adafocus.errors import AdaFocusError


class _Group(click.Group):
    """Shows an AdaFocusError as one clean message (exit code 1), not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AdaFocusError as e:
            raise click.ClickException(str(e)) from None


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
        click.echo(json.dumps({"presets": [p.to_dict() for p in PRESETS.values()], "aliases": ALIASES}, indent=2))
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
        json.dump(report.to_dict(), sys.stdout, indent=2)
        click.echo()
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
