"""Click classes shared by every command: an AdaFocusError becomes one clean message (exit code 1),
not a traceback. In a module of their own so that command modules and `adafocus.cli` can import
them without importing each other."""

from __future__ import annotations

import click

from adafocus.errors import AdaFocusError


class Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AdaFocusError as e:
            raise click.ClickException(str(e)) from None


class Command(click.Command):
    """A standalone command (`adafocus-export`, ...) that reports errors like the group does."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AdaFocusError as e:
            raise click.ClickException(str(e)) from None
