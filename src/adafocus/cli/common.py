"""What every command shares: an AdaFocusError becomes one clean message (exit code 1), not a
traceback; option parsers used by several commands; the registry's backends as choices."""

from __future__ import annotations

import math

import click

from adafocus.errors import AdaFocusError, error_text

CONTEXT = {"help_option_names": ["-h", "--help"]}


class _CleanErrors:
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AdaFocusError as e:
            raise click.ClickException(str(e)) from None


class Group(_CleanErrors, click.Group):
    """The `adafocus` group."""


class Command(_CleanErrors, click.Command):
    """A standalone command (`adafocus-export`, ...) that reports errors like the group does."""


def given(parameter: str) -> bool:
    """Whether the user set `parameter` (command line or environment), not left it at its default."""
    source = click.get_current_context().get_parameter_source(parameter)
    return source not in (None, click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)


def refuse_unused(parameters: tuple[str, ...], why: str, fix: str) -> None:
    """One error naming every option of `parameters` the user gave where it would do nothing (`why`):
    refused, not silently ignored."""
    names = [f"--{p.replace('_', '-')}" for p in parameters if given(p)]
    if names:
        listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise AdaFocusError(f"{listed} {'does' if len(names) == 1 else 'do'} nothing {why}", fix)


def backend_choice() -> click.Choice:
    """The registered backends (adafocus.runtime.backends)."""
    from adafocus.runtime.backends import backend_names

    return click.Choice(backend_names())


def device_choice() -> click.Choice:
    from adafocus.runtime.backends import device_names

    return click.Choice(device_names())


def parse_thresholds(ctx, param, value: str | None) -> list[float | None] | None:
    """H0,...,HK: comma-separated entropies; inf always exits, -inf or none never does."""
    if value is None:
        return None
    values: list[float | None] = []
    for part in value.split(","):
        text = part.strip().lower()
        if text in ("none", "null"):
            values.append(None)
            continue
        try:
            value = float(text)
        except ValueError:
            raise click.BadParameter(
                f"{part.strip()!r} is not a number: give comma-separated entropies, e.g. 0.5,0.4,0.3 (inf, -inf, none)"
            ) from None
        if math.isnan(value):  # float() reads "nan"; as a threshold it would compare False with every entropy
            raise click.BadParameter(
                f"{part.strip()!r} is no threshold: give an entropy, inf (always exit there) or -inf or none (never)"
            )
        values.append(value)
    return values


def parse_batch_range(ctx, param, value: str) -> tuple[int, int, int]:
    from adafocus.export.graphs import check_batch_range  # imports torch: not on every command's start

    try:
        parts = tuple(int(v) for v in value.split(":"))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise click.BadParameter(f"{value!r} is not MIN:OPT:MAX (e.g. 1:128:128)")
    try:
        return check_batch_range(parts)
    except AdaFocusError as e:
        raise click.BadParameter(error_text(e)) from None
