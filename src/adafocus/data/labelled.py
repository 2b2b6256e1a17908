"""Labelled video sets: the user's own videos for calibration, evaluation, INT8 ranges and training.

    videos = read_labelled("val/labels.txt", class_names)        # or a .csv, or a class-per-folder tree
    for frames, labels in decode_batches(videos, preset):       # decoded like adafocus-predict does
        ...

Three ways to name a set (`read_labelled` picks by what SOURCE is):

- an annotation list, `path label` per line, whitespace-separated, the label an integer index into
  the class names (the mmaction2 / TSN convention; a path may hold spaces: the label is the last
  field);
- a CSV file (`.csv`, or a first line `path,label`) with a header naming the columns `path` and
  `label`, the label a class name or an index;
- a directory: a class-per-folder tree, ROOT/<class name>/<video files>; its classes, in sorted
  order, must be exactly the model's.

In lists and CSVs a video may carry several classes (ActivityNet, FCVID): its label field holds
them separated by `;`, each written as a single label would be and each class at most once
(`videos/a.mp4 12;57`, or in a CSV `videos/a.mp4,Archery;Getting a haircut`; no spaces around `;`
in a list, whose label is its last whitespace-separated field). A set with at least one such row is
multi-label: its `labels` are an (N, C) bool multi-hot array instead of (N,) class indices, for
`--metric map` (mean average precision) in calibration and evaluation; top-1 accuracy on it counts
a video right when its top class is one of its labels. Training takes one label per video. A
class-per-folder tree is always single-label.

In lists, blank lines and lines starting with `#` are skipped, and relative paths are taken against
the list file's folder (or `root=`). Labels are checked against the model's class names when the
set is read, before anything is decoded: one error names the first offenders and the fix (and one
names every field of several labels with an empty part or a class given twice, one every video
listed twice).

Decoding is `adafocus.data.video.load_clip_for`, the code adafocus-predict runs, in a pool of
decoder threads (PyAV releases the GIL) that works at most two batches ahead, so memory is bounded
whatever the size of the set. A video that cannot be used is reported (path and reason) and left
out; past `max_bad` (a fraction of the set) the pass stops with an error instead of going on with a
skewed set.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from adafocus.errors import AdaFocusError, error_text, first_of

if TYPE_CHECKING:
    from adafocus.model.presets import Preset

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
LABEL_SEPARATOR = ";"  # between the classes of a video that carries several (a multi-label set)
DEFAULT_MAX_BAD = 0.05  # the share of a set that may be unreadable before a command refuses it
T, R = TypeVar("T"), TypeVar("R")


@dataclass(frozen=True)
class LabelledVideos:
    """Video files and their labels, in the order the source gives: one class index (into
    `class_names`) per video, or, in a multi-label set (a row of its list names several classes),
    a multi-hot row of C = len(class_names) flags per video."""

    source: str  # the list file or the tree's root, as given
    paths: tuple[str, ...]
    labels: np.ndarray  # (N,) int64 class indices; (N, C) bool multi-hot rows when the set is multi-label
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def multi_label(self) -> bool:
        """Whether a video may carry several classes: `labels` is (N, C) bool, not (N,) int64."""
        return self.labels.ndim == 2

    def digest(self) -> str:
        """sha256 of what the set is: every path (absolute), its label (in a multi-label set its
        sorted class indices joined by `;`), and its file's size and modification time, so that a
        cache keyed by it goes stale when a file is replaced."""
        if self.multi_label:
            written = [LABEL_SEPARATOR.join(str(i) for i in np.flatnonzero(row).tolist()) for row in self.labels]
        else:
            written = self.labels.tolist()
        h = hashlib.sha256()
        for path, label in zip(self.paths, written):
            try:
                stat = os.stat(path)
                seen = f"{stat.st_size} {stat.st_mtime_ns}"
            except OSError:
                seen = "missing"
            h.update(f"{os.path.abspath(path)}\t{label}\t{seen}\n".encode("utf-8", "surrogatepass"))
        return h.hexdigest()


def read_labelled(
    source: str | os.PathLike, class_names: Sequence[str], *, root: str | os.PathLike | None = None
) -> LabelledVideos:
    """The set named by `source` (see the module docstring), labels checked against `class_names`."""
    name = os.fspath(source)
    class_names = tuple(class_names)
    if os.path.isdir(name):
        if root is not None:
            raise AdaFocusError(f"--root is for lists; {name} is a folder tree", "drop --root, or give a list file")
        return _read_tree(name, class_names)
    if not os.path.exists(name):
        raise AdaFocusError(f"{name}: no such list file or folder", "give a list, a CSV or a class-per-folder tree")
    try:
        # utf-8-sig: a byte-order mark (Windows editors, Excel's "CSV UTF-8") is not part of the
        # first line, which may be a CSV's header
        with open(name, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise AdaFocusError(f"{name}: cannot read the list ({e})", "give a UTF-8 text file") from None
    folder = os.fspath(root) if root is not None else os.path.dirname(name)
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if name.lower().endswith(".csv") or (lines and lines[0][1].replace(" ", "").lower() == "path,label"):
        rows = _csv_rows(name, lines)
        by_name = True
    else:
        rows = [_list_row(name, n, line) for n, line in lines]
        by_name = False
    if not rows:
        raise AdaFocusError(f"{name}: lists no videos", "give one `path label` line per video")
    label_sets, offenders, malformed = [], [], []
    for number, _, label in rows:
        indices, unknown, problem = _label_set(label, class_names, by_name)
        offenders += [f"line {number}: {part!r}" for part in unknown]
        if problem is not None:
            malformed.append(f"line {number}: {label!r} {problem}")
        label_sets.append(indices)
    if malformed:
        raise AdaFocusError(
            f"{name}: {len(malformed)} field{'s' if len(malformed) != 1 else ''} of several labels "
            f"{'are' if len(malformed) != 1 else 'is'} malformed ({first_of(malformed)}); nothing was decoded",
            f"separate a video's classes with `{LABEL_SEPARATOR}`, each class once and no part empty "
            f"(e.g. `12{LABEL_SEPARATOR}57`)",
        )
    if offenders:
        raise _label_error(name, offenders, class_names, by_name)
    paths = tuple(p if os.path.isabs(p) else os.path.join(folder, p) for _, p, _ in rows)
    _refuse_repeats(name, [number for number, _, _ in rows], paths)
    if any(len(indices) > 1 for indices in label_sets):
        labels = np.zeros((len(label_sets), len(class_names)), bool)
        for row, indices in enumerate(label_sets):
            labels[row, indices] = True
    else:
        labels = np.asarray([indices[0] for indices in label_sets], np.int64)
    return LabelledVideos(name, paths, labels, class_names)


def _refuse_repeats(name: str, numbers: list[int], paths: Sequence[str]) -> None:
    """A video listed twice is counted twice in every metric and trained on twice as often, and with
    two different labels it contradicts itself: one error naming the lines, before any decoding."""
    first_line: dict[str, int] = {}
    repeats = []
    for number, path in zip(numbers, paths):
        key = os.path.normcase(os.path.abspath(path))
        if key in first_line:
            repeats.append(f"line {number} repeats line {first_line[key]}: {path}")
        else:
            first_line[key] = number
    if repeats:
        raise AdaFocusError(
            f"{name}: {len(repeats)} video{'s are' if len(repeats) != 1 else ' is'} listed more than once "
            f"({first_of(repeats)}); nothing was decoded",
            f"list each video once; give a video's several classes in one field separated by `{LABEL_SEPARATOR}`",
        )


def top1_hits(classes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Whether each predicted class is right: (N,) or (N, steps) class indices against (N,) labels, or
    against (N, C) multi-hot rows of a multi-label set, where a video is right when its top class is
    one of its labels."""
    classes, labels = np.asarray(classes), np.asarray(labels)
    if labels.ndim == 2:
        rows = classes if classes.ndim == 2 else classes[:, None]
        hits = np.take_along_axis(labels.astype(bool), rows, axis=1)
        return hits if classes.ndim == 2 else hits[:, 0]
    return classes == (labels[:, None] if classes.ndim == 2 else labels)


def tree_classes(root: str | os.PathLike) -> list[str]:
    """The class names of a class-per-folder tree: its visible sub-folders, sorted."""
    name = os.fspath(root)
    return sorted(e.name for e in os.scandir(name) if e.is_dir() and not e.name.startswith("."))


def _read_tree(root: str, class_names: tuple[str, ...]) -> LabelledVideos:
    found = tree_classes(root)
    if not found:
        raise AdaFocusError(
            f"{root}: no class folders (ROOT/<class name>/<videos>)",
            "give a folder with one sub-folder per class, or a labels list (e.g. its labels.txt)",
        )
    extra = [c for c in found if c not in class_names]
    missing = [c for c in class_names if c not in found]
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"folders that are not classes of the model: {first_of(extra)}")
        if missing:
            parts.append(f"classes without a folder: {first_of(missing)}")
        raise AdaFocusError(
            f"{root}: the tree's classes differ from the model's ({'; '.join(parts)})",
            f"name the folders after the model's classes ({first_of(list(class_names))}), or give a labels list",
        )
    paths, labels = [], []
    for class_name in found:
        for path in _videos_in(os.path.join(root, class_name)):
            paths.append(path)
            labels.append(class_names.index(class_name))
    if not paths:
        raise AdaFocusError(f"{root}: no video files in its class folders", f"video files end in {VIDEO_EXTENSIONS}")
    return LabelledVideos(root, tuple(paths), np.asarray(labels, np.int64), class_names)


def _videos_in(folder: str) -> list[str]:
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(current, f) for f in sorted(files) if f.lower().endswith(VIDEO_EXTENSIONS)]
    return found


def _list_row(name: str, number: int, line: str) -> tuple[int, str, str]:
    fields = line.rsplit(None, 1)
    if len(fields) != 2:
        raise AdaFocusError(f"{name}:{number}: expected `path label`, got {line!r}", "write one `path label` per line")
    if fields[0].endswith(LABEL_SEPARATOR):  # `a.mp4 12; 57`: the label is the last field, the rest the path
        raise AdaFocusError(
            f"{name}:{number}: a space after `{LABEL_SEPARATOR}` in {line!r} splits its labels",
            f"write several labels without spaces: `path 12{LABEL_SEPARATOR}57`",
        )
    return number, fields[0], fields[1]


def _csv_rows(name: str, lines: list[tuple[int, str]]) -> list[tuple[int, str, str]]:
    reader = csv.reader(io.StringIO("\n".join(line for _, line in lines)))
    rows = list(reader)
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "path" not in header or "label" not in header:
        raise AdaFocusError(f"{name}: a CSV list needs a header with `path` and `label`", "start it with: path,label")
    at_path, at_label = header.index("path"), header.index("label")
    out = []
    for (number, _), row in zip(lines[1:], rows[1:]):
        if len(row) <= max(at_path, at_label):
            raise AdaFocusError(f"{name}:{number}: expected {len(header)} columns, got {row}", "fix that line")
        out.append((number, row[at_path].strip(), row[at_label].strip()))
    return out


def _label_set(label: str, class_names: tuple[str, ...], by_name: bool) -> tuple[list[int], list[str], str | None]:
    """One label field: its class indices, its parts that are no class of the model, and what is
    wrong with its form (an empty part, a class given twice), or None. A field without `;` is one
    label, checked exactly as before there were several."""
    if LABEL_SEPARATOR not in label or (by_name and label in class_names):  # a class name may hold `;`
        index = _label_index(label, class_names, by_name)
        return ([], [label], None) if index is None else ([index], [], None)
    parts = [part.strip() for part in label.split(LABEL_SEPARATOR)]
    indices, unknown = [], []
    for part in filter(None, parts):
        index = _label_index(part, class_names, by_name)
        if index is None:
            unknown.append(part)
        else:
            indices.append(index)
    if not all(parts):
        return indices, unknown, "has an empty label"
    twice = sorted({index for index in indices if indices.count(index) > 1})
    if twice:
        return indices, unknown, f"gives {first_of(repr(class_names[i]) for i in twice)} twice"
    return indices, unknown, None


def _label_index(label: str, class_names: tuple[str, ...], by_name: bool) -> int | None:
    if by_name and label in class_names:
        return class_names.index(label)
    try:
        index = int(label)
    except ValueError:
        return None
    return index if 0 <= index < len(class_names) else None


def _label_error(name: str, offenders: list[str], class_names: tuple[str, ...], by_name: bool) -> AdaFocusError:
    accepted = f"indices 0..{len(class_names) - 1}"
    if by_name:
        accepted = f"the model's class names ({first_of(list(class_names))}) or {accepted}"
    return AdaFocusError(
        f"{name}: {len(offenders)} label{'s are' if len(offenders) != 1 else ' is'} not a class of the model "
        f"({first_of(offenders)}); nothing was decoded",
        f"use {accepted}",
    )


def check_left_out(videos: LabelledVideos, left_out: int, max_bad: float) -> None:
    """Refuse a set once more than `max_bad` of its videos are left out (a skewed set)."""
    if left_out > int(max_bad * len(videos) + 1e-9):
        raise AdaFocusError(
            f"{videos.source}: more than {max_bad:.0%} of its {len(videos)} videos cannot be used "
            f"({left_out} so far, see above)",
            "fix or remove the broken files, or allow more with --max-bad FRACTION",
        )


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass
class DecodeReport:
    """What a pass over a set used and left out (path, reason), filled in as it goes."""

    total: int
    used: int = 0
    left_out: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        if not self.left_out:
            return f"{self.used} used"
        return f"{self.used} used, {len(self.left_out)} left out (see above)"


def decode_ahead(
    items: Iterable[T], load: Callable[[T], R], workers: int, ahead: int
) -> Iterator[tuple[T, R | None, Exception | None]]:
    """(item, load(item), None) or (item, None, the exception) for every item, in input order, with
    `workers` threads loading at most `ahead` items beyond the one handed out (bounded memory however
    many items there are). A failing item does not stop the others: each file may be broken in its
    own way. When the consumer stops early, loads not yet started are cancelled."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="adafocus-decode")
    pending: deque = deque()
    remaining = iter(items)

    def top_up() -> None:
        for item in remaining:
            pending.append((item, pool.submit(load, item)))
            if len(pending) >= ahead:
                return

    try:
        top_up()
        while pending:
            item, future = pending.popleft()
            top_up()
            try:
                result = future.result()
            except Exception as e:  # handed to the consumer, which names it and goes on
                yield item, None, e
            else:
                yield item, result, None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class DecodedBatches:
    """Iterable of (frames (B, T, 3, S, S) float32, labels) batches of a set's videos, decoded for
    `preset` by `workers` threads; `report` says what was used and left out. Labels are the rows of
    the set's `labels` for the videos used: (B,) int64 class indices, or (B, C) torch.bool multi-hot
    rows for a multi-label set (`videos.multi_label`).

    `load` decodes one path (default: `load_clip_for(path, preset).frames`, what adafocus-predict
    feeds the runtime). A video that fails is written to `log` and left out; once more than
    `max_bad` × len(set) are left out, iteration raises AdaFocusError. Iterating again decodes again.
    """

    def __init__(
        self,
        videos: LabelledVideos,
        preset: Preset,
        *,
        batch_size: int = 64,
        workers: int = 2,
        max_bad: float = DEFAULT_MAX_BAD,
        progress: bool = True,
        desc: str = "decoding",
        log: Callable[[str], None] | None = None,
        load: Callable[[str], torch.Tensor] | None = None,
    ):
        if batch_size < 1 or workers < 1:
            raise AdaFocusError(f"batch_size and workers must be >= 1 (got {batch_size}, {workers})")
        if not 0 <= max_bad <= 1:
            raise AdaFocusError(f"max_bad must be a fraction in [0, 1], got {max_bad}")
        self.videos, self.preset = videos, preset
        self.batch_size, self.workers, self.max_bad = batch_size, workers, max_bad
        self.progress, self.desc, self.log = progress, desc, log
        self.load = load or self._load_clip
        self.report = DecodeReport(len(videos))

    def _load_clip(self, path: str) -> torch.Tensor:
        from adafocus.data.video import decoder_threads, load_clip_for  # PyAV only where videos are decoded

        return load_clip_for(path, self.preset, threads=decoder_threads(self.workers)).frames

    def __len__(self) -> int:
        return len(self.videos)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from tqdm import tqdm

        self.report = report = DecodeReport(len(self.videos))
        items = zip(self.videos.paths, range(len(self.videos)))  # (path, row of videos.labels)
        frames, rows = [], []
        ahead = max(2 * self.batch_size, self.workers)
        decoded = decode_ahead(items, lambda item: self.load(item[0]), self.workers, ahead)
        with (
            tqdm(total=len(self.videos), desc=self.desc, unit="video", disable=not self.progress, leave=False) as bar,
            contextlib.closing(decoded),  # the decoders stop at once when this pass ends early (an error, a break)
        ):
            log = self.log or (lambda line: bar.write(line, file=sys.stderr))
            for (path, row), clip, error in decoded:
                if error is not None:
                    report.left_out.append((path, error_text(error)))
                    log(f"left out {path}: {error_text(error)}")
                    check_left_out(self.videos, len(report.left_out), self.max_bad)
                else:
                    frames.append(clip)
                    rows.append(row)
                    report.used += 1
                bar.update(1)
                if len(frames) == self.batch_size:
                    yield torch.stack(frames), self._labels(rows)
                    frames, rows = [], []
            if frames:
                yield torch.stack(frames), self._labels(rows)
        if report.used == 0:
            raise AdaFocusError(f"{self.videos.source}: none of its videos could be used (see above)")

    def _labels(self, rows: list[int]) -> torch.Tensor:
        """The labels of these rows of the set: (B,) int64, or (B, C) bool for a multi-label set."""
        labels = self.videos.labels[np.asarray(rows, np.intp)]
        return torch.from_numpy(labels.astype(bool if self.videos.multi_label else np.int64))
