"""`adafocus-predict`: classify video files with an export, one JSON line per video.

Decoding overlaps inference: a few decoder threads (PyAV releases the GIL while it decodes) work
ahead of the runtime, at most about two batches ahead, so memory stays bounded whatever the number
of inputs. The runtime's streaming mode (continuous batching) consumes the decoded clips in input
order and hands results back in completion order; each is written and flushed at once, so a run
that stops half-way can be continued with --resume.

Library use:

    runtime = Runtime.load("exports/demo")
    for record in predict_paths(expand_paths(["videos/"]), runtime):
        print(record["path"], record.get("class") or record["error"])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from adafocus.data.labelled import VIDEO_EXTENSIONS, decode_ahead
from adafocus.errors import AdaFocusError, error_text
from adafocus.figures import save_png

if TYPE_CHECKING:
    import torch

    from adafocus.model.presets import Preset
    from adafocus.runtime import Runtime


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


LIST_EXTENSIONS = (".txt", ".list")


# --- inputs ----------------------------------------------------------------------------------------


def read_path_list(list_file: str | os.PathLike) -> list[str]:
    """Paths in a list file, one a line: blank lines and lines starting with `#` are skipped, and
    relative paths are taken relative to the list file's folder."""
    name = os.fspath(list_file)
    try:
        with open(name, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AdaFocusError(f"{name}: cannot read the list of videos ({e})", "give a UTF-8 text file") from None
    folder = os.path.dirname(name)
    paths = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        entry = os.path.expanduser(entry)
        paths.append(entry if os.path.isabs(entry) else os.path.join(folder, entry))
    return paths


def find_videos(folder: str | os.PathLike) -> list[str]:
    """Video files under `folder`, recursively, sorted; hidden files and folders are skipped."""
    root = os.fspath(folder)
    found = []
    for current, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            os.path.join(current, f) for f in files if not f.startswith(".") and f.lower().endswith(VIDEO_EXTENSIONS)
        ]
    return sorted(found)


def expand_paths(args: Iterable[str | os.PathLike]) -> list[str]:
    """Command-line PATHs -> video paths: a directory gives its videos (recursively, sorted), a
    `.txt`/`.list` file the paths it lists, anything else is taken as a video. A video named twice
    is kept once, at its first position."""
    paths: list[str] = []
    for arg in args:
        name = os.fspath(arg)
        if os.path.isdir(name):
            paths += find_videos(name)
        elif name.lower().endswith(LIST_EXTENSIONS):
            paths += read_path_list(name)
        else:
            paths.append(name)
    seen: set[str] = set()
    unique = []
    for path in paths:
        key = path_key(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def path_key(path: str) -> str:
    """What makes two spellings of a path the same input (for de-duplication and --resume)."""
    return os.path.normcase(os.path.abspath(path))


# --- drawing ---------------------------------------------------------------------------------------


def _numbered_boxes(result: dict, preset: Preset) -> list[tuple]:
    """(number, frame, x0, y0, width, height) of each used cube on each of its frames, or of each
    Uni-AdaFocus patch (a real-valued window on one frame)."""
    boxes = []
    for number, cube in enumerate(result.get("cubes", []), start=1):
        x0, y0, t0 = (int(v) for v in cube["start"])
        size = preset.cube_size
        boxes += [(number, t, x0, y0, size, size) for t in range(t0, t0 + preset.cube_frames)]
    for number, patch in enumerate(result.get("patches", []), start=1):
        boxes.append((number, int(patch["frame"]), *(float(v) for v in patch["box"])))
    return boxes


def cube_boxes(result: dict, preset: Preset) -> list[tuple[int, int, int, int]]:
    """Where each used cube lies: (frame, x0, y0, size) per frame of each cube, in cube order.

    `frame` indexes the preset's num_frames sampled frames; x0, y0, size are pixels of the
    frame_size² model input (the coordinates the runtime cropped in). A cube of cube_frames frames
    starting at t0 gives one box on each of frames t0 .. t0 + cube_frames - 1.
    """
    return [box[1:5] for box in _numbered_boxes(result, preset) if "cubes" in result]


def draw_result(frames: torch.Tensor, result: dict, preset: Preset, out_file: str | os.PathLike) -> None:
    """A PNG of the sampled frames (de-normalised model input) with a numbered box per used cube."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from adafocus.model.preprocess import denormalize

    # Figure + FigureCanvasAgg is matplotlib's Agg backend without pyplot: no display needed, no
    # global state, and a caller's own backend choice is left alone.
    images = np.clip(denormalize(np.asarray(frames, dtype=np.float32)), 0.0, 1.0).transpose(0, 2, 3, 1)
    count = len(images)
    cols = min(count, math.ceil(math.sqrt(1.5 * count)))
    rows = math.ceil(count / cols)
    figure = Figure(figsize=(2.2 * cols, 2.3 * rows + 0.7), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    colours = [f"C{i}" for i in range(10)]
    boxes = _numbered_boxes(result, preset)
    used_frames = {box[1] for box in boxes}
    source = result.get("frames") or list(range(count))
    for t, ax in enumerate(axes):
        ax.set_axis_off()
        if t >= count:
            continue
        ax.imshow(images[t], interpolation="nearest", alpha=1.0 if t in used_frames else 0.45)
        ax.set_title(f"frame {t} (source {source[t]})", fontsize=8)
    for number, t, x0, y0, width, height in boxes:
        colour = colours[(number - 1) % len(colours)]
        # pixel i covers [i - 0.5, i + 0.5] in imshow's coordinates
        axes[t].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), width, height, fill=False, edgecolor=colour, linewidth=2))
        axes[t].text(
            x0 + 1,
            y0 + 1,
            str(number),
            color="white",
            fontsize=8,
            va="top",
            ha="left",
            bbox={"facecolor": colour, "edgecolor": "none", "pad": 1},
        )
    steps = result["exit_step"]
    unit = "patch" if "patches" in result else "cube"
    plural = "es" if unit == "patch" else "s"
    cubes = (
        f"exited at the glance (no {unit}{plural})"
        if steps == 0
        else f"exit after {steps} {unit}{plural if steps != 1 else ''}"
    )
    probability = result["top_k"][0][1] if result.get("top_k") else None
    confidence = f" ({probability:.0%})" if probability is not None else ""
    figure.suptitle(
        f"{os.path.basename(result.get('path', ''))}\n{result['class']}{confidence}, {cubes}, "
        f"{result['gflops']:.4f} GFLOPs",
        fontsize=10,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")  # exotic characters in a file name
        save_png(figure, out_file)


def image_name(path: str) -> str:
    """The PNG --show writes for `path`: its stem plus a digest of its absolute path, so videos
    with the same name in different folders do not overwrite each other's picture."""
    stem = os.path.splitext(os.path.basename(path))[0] or "video"
    digest = hashlib.sha1(path_key(path).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{stem}-{digest}.png"


# --- the pipeline ----------------------------------------------------------------------------------


def result_record(path: str, result, class_names, top_k: int, frames: list[int], decoding: str) -> dict:
    """A video's JSONL line (both engines write the same): path and the runtime's result, or error.
    `decoding` is `VideoClip.decoding` ("seek", or "sequential: <why>")."""
    if result.error is not None:
        return {"path": path, "error": result.error}
    record = {"path": path, **result.to_dict(class_names, top_k)}
    del record["index"]  # the position in this run's stream: meaningless to the caller
    record["frames"] = frames
    return record | decoding_fields(decoding)


def decoding_fields(decoding: str) -> dict:
    """`decoded_by` ("seek" or "sequential") and `decode_fallback` (why sequential; null for seek)."""
    method, _, why = decoding.partition(": ")
    return {"decoded_by": method, "decode_fallback": why or None}


def predict_paths(
    paths: Iterable[str | os.PathLike],
    runtime: Runtime,
    *,
    batch_size: int = 16,
    workers: int = 2,
    top_k: int = 5,
    show_dir: str | os.PathLike | None = None,
    decode: str = "auto",
) -> Iterator[dict]:
    """One dict per path, in completion order.

    Success: path, class, class_index, top_k ([name, probability] pairs), exit_step, cubes
    ([{centre, start}] of the cubes used), gflops, frames (the sampled source frame indices),
    decoded_by and decode_fallback (`decoding_fields`), and image (the PNG written) with `show_dir`.
    Failure (the file cannot be decoded, is too short, or the runtime refused it): path and error.
    Every path gets exactly one dict.

    `decode` is `adafocus.data.video.load_clip`'s method: "auto" (seek where exact) or "sequential".
    `workers` decoder threads decode ahead of the runtime, at most max(2 * batch_size, workers)
    clips beyond what the runtime holds.
    """
    if batch_size < 1 or workers < 1 or top_k < 1:
        raise AdaFocusError(
            f"batch_size, workers and top_k must be >= 1 (got {batch_size}, {workers}, {top_k})", "use positive values"
        )
    names = [os.fspath(p) for p in paths]
    preset = runtime.preset
    show = os.fspath(show_dir) if show_dir is not None else None
    if show is not None:
        os.makedirs(show, exist_ok=True)
    from adafocus.data.video import (  # PyAV only where videos are decoded: `adafocus bench` runs without it
        decoder_threads,
        load_clip_for,
    )

    failures: deque[dict] = deque()  # decode errors, reported with the next result
    admitted: dict[int, tuple[str, list[int], str, torch.Tensor | None]] = {}  # stream position -> video

    threads = decoder_threads(workers)
    decoded = decode_ahead(
        names,
        lambda path: load_clip_for(path, preset, method=decode, threads=threads),
        workers,
        max(2 * batch_size, workers),
    )

    def clips() -> Iterator[torch.Tensor]:
        """Decoded clips in input order; runs in the caller's thread, pulled by runtime.stream."""
        position = 0
        for path, clip, error in decoded:
            if error is not None:  # any file may be broken in its own way; the others go on
                failures.append({"path": path, "error": error_text(error)})
                continue
            admitted[position] = (path, clip.indices, clip.decoding, clip.frames if show is not None else None)
            position += 1
            yield clip.frames

    try:
        for result in runtime.stream(clips(), batch_size=batch_size):
            while failures:
                yield failures.popleft()
            path, indices, decoding, frames = admitted.pop(result.index)
            record = result_record(path, result, runtime.class_names, top_k, indices, decoding)
            if show is not None and "error" not in record:
                target = os.path.join(show, image_name(path))
                try:
                    draw_result(frames, record, preset, target)
                except OSError as e:
                    raise AdaFocusError(f"{target}: cannot write the picture ({e})", "check OUT_DIR is writable") from e
                record["image"] = target
            yield record
        while failures:
            yield failures.popleft()
    finally:
        decoded.close()  # stops the decoder threads, also when the caller stops early


# --- --resume --------------------------------------------------------------------------------------


def recorded_paths(out_file: str | os.PathLike, log: Callable[[str], None] = _stderr) -> set[str]:
    """Paths (as `path_key`) that already have a line in a JSONL results file.

    A last line cut off by a crash (no newline at the end) is removed from the file, so that lines
    appended after it stay valid JSON; that video is simply done again.
    """
    name = os.fspath(out_file)
    if not os.path.exists(name):
        return set()
    with open(name, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(name, "r+b") as f:
            f.truncate(end)
        log(f"{name}: removed an unfinished last line (the previous run stopped while writing it)")
    done = set()
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done.add(path_key(record["path"]))
        except (ValueError, TypeError, KeyError):
            log(f"{name}:{number}: not a result line, ignored")
    return done
