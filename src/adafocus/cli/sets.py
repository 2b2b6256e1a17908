"""Options and helpers every command that reads labelled videos shares (calibrate, evaluate, train):
a list, a CSV or a class-per-folder tree (adafocus.data.labelled), decoded like adafocus-predict."""

from __future__ import annotations

import click

LIST_FORMATS = (
    "a labels list (`path label` per line, label = class index; `#` comments), a CSV with a `path,label` "
    "header (label = class name or index), or a class-per-folder tree ROOT/<class name>/<videos>; in a "
    "list or CSV a video's several classes go in one label field separated by `;` (`a.mp4 12;57`), which "
    "makes the set multi-label: for --metric map, top-1 accuracy counting a video right when its top "
    "class is one of its labels, and not for training"
)


def set_options(command):
    """--root, --workers, --max-bad: how the videos of every given set are found and decoded."""
    options = [
        click.option(
            "--root",
            type=click.Path(file_okay=False, exists=True),
            default=None,
            help="Folder that relative paths in lists are taken against [default: each list file's folder].",
        ),
        click.option(
            "--workers",
            type=click.IntRange(1),
            default=2,
            show_default=True,
            help="Decoder threads (PyAV releases the GIL); they work at most two batches ahead.",
        ),
        click.option(
            "--max-bad",
            type=click.FloatRange(0, 1),
            default=0.05,
            show_default=True,
            help="Share of a set's videos that may be unreadable (each is named on stderr and left out); past it "
            "the command fails instead of going on with a skewed set.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


class FileSets:
    """Opens the sets of one command: labels checked against the model's class names when each is
    read (before any decoding), decoding with the command's --root, --workers and --max-bad."""

    def __init__(self, class_names, preset, *, root=None, workers: int = 2, max_bad: float = 0.05):
        self.class_names, self.preset = list(class_names), preset
        self.root, self.workers, self.max_bad = root, workers, max_bad

    def read(self, source: str):
        from adafocus.data.labelled import read_labelled

        return read_labelled(source, self.class_names, root=self.root)

    def batches(self, videos, batch_size: int, desc: str, progress: bool = True):
        from adafocus.data.labelled import DecodedBatches

        return DecodedBatches(
            videos,
            self.preset,
            batch_size=batch_size,
            workers=self.workers,
            max_bad=self.max_bad,
            progress=progress,
            desc=desc,
        )


def report_left_out(name: str, report) -> dict:
    """The end-of-pass line ("N used, M left out (see above)") on stderr, and the same as a record."""
    click.echo(f"{name}: {report.summary()}", err=True)
    return {"used": report.used, "left_out": [{"path": p, "reason": r} for p, r in report.left_out]}
