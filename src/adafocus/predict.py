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
from adafocus.model.checks import nonfinite_logits

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
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first path
        with open(name, encoding="utf-8-sig") as f:
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


def utf8_text(value):
    """`value` (a record, or a str, list or dict in one) with every string valid UTF-8 text.

    A file name need not be UTF-8: Python holds its other bytes as surrogate escapes (os.walk,
    sys.argv), which a UTF-8 file refuses and which are invalid UTF-8 on stdout. Each such byte is
    written `\\xNN` instead: nothing is lost (the bytes can be read back off the escapes), and the
    same input always gets the same spelling, which --resume relies on (`recorded_key`).
    """
    if isinstance(value, str):
        return os.fsencode(value).decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {key: utf8_text(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [utf8_text(item) for item in value]
    return value


def recorded_key(path: str) -> str:
    """`path_key` of the path as a results line spells it (`utf8_text`): what --resume compares."""
    return path_key(utf8_text(path))


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
        parse_math=False,  # a `$` in a file or class name is text, not the start of a formula
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")  # exotic characters in a file name
        save_png(figure, out_file)


# The longest file name most file systems take (NAME_MAX), less what `atomic_write`'s temporary
# sibling adds to it ("." + name + "." + 8 random characters + ".tmp").
_IMAGE_NAME_BYTES = 255 - 14


def image_name(path: str) -> str:
    """The PNG --show writes for `path`: its stem plus a digest of its absolute path, so videos
    with the same name in different folders do not overwrite each other's picture. A stem too long
    for a file name is cut short (whole characters): the digest still tells the videos apart."""
    stem = os.path.splitext(os.path.basename(path))[0] or "video"
    digest = hashlib.sha1(path_key(path).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    room = _IMAGE_NAME_BYTES - len(f"-{digest}.png")
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return f"{stem}-{digest}.png"


def prepare_show_dir(show_dir: str | os.PathLike) -> str:
    """--show's folder, made if missing; an AdaFocusError naming it where it cannot be."""
    name = os.fspath(show_dir)
    try:
        os.makedirs(name, exist_ok=True)
    except OSError as e:
        raise AdaFocusError(
            f"{name}: cannot make the folder for --show's pictures ({e.strerror})",
            "give --show a folder that can be made or written to",
        ) from None
    if not os.access(name, os.W_OK | os.X_OK):
        raise AdaFocusError(f"{name}: --show's folder is not writable", "give --show a folder you can write to")
    return name


# --- the pipeline ----------------------------------------------------------------------------------


def result_record(path: str, result, class_names, top_k: int, frames: list[int], decoding: str) -> dict:
    """A video's JSONL line (both engines write the same): path and the runtime's result, or error.
    `decoding` is `VideoClip.decoding` ("seek", or "sequential: <why>")."""
    if result.error is not None:
        return {"path": path, "error": result.error}
    # checked here, where both engines (local and Ray) make every line: that video's error, and the run goes on
    if (error := nonfinite_logits(path, result.logits, result.exit_step)) is not None:
        return {"path": path, "error": error_text(error)}
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

    The arguments are checked (and `show_dir` made) here, before the first video is decoded.
    """
    if batch_size < 1 or workers < 1 or top_k < 1:
        raise AdaFocusError(
            f"batch_size, workers and top_k must be >= 1 (got {batch_size}, {workers}, {top_k})", "use positive values"
        )
    show = prepare_show_dir(show_dir) if show_dir is not None else None
    return _predict([os.fspath(p) for p in paths], runtime, batch_size, workers, top_k, show, decode)


def _predict(
    names: list[str], runtime: Runtime, batch_size: int, workers: int, top_k: int, show: str | None, decode: str
) -> Iterator[dict]:
    """predict_paths' records, once its arguments are checked."""
    preset = runtime.preset
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
                record = _drawn(record, frames, preset, os.path.join(show, image_name(path)))
            yield record
        while failures:
            yield failures.popleft()
    finally:
        decoded.close()  # stops the decoder threads, also when the caller stops early


def _drawn(record: dict, frames: torch.Tensor, preset: Preset, target: str) -> dict:
    """`record` with the picture it asked for: "image" where it was written, else the video's error
    line, so that one picture that cannot be made (the disk is full, matplotlib refuses a name)
    does not end the run and lose the other videos' lines."""
    try:
        draw_result(frames, record, preset, target)
    except OSError as e:
        error = AdaFocusError(
            f"{target}: cannot write the picture ({e})", "check --show's folder is writable, with room"
        )
    except ValueError as e:  # matplotlib's refusals of text or layout
        why = " ".join(str(e).split())  # mathtext's messages span lines
        error = AdaFocusError(f"{target}: cannot draw the picture ({why})", "run it again without --show")
    else:
        return record | {"image": target}
    return {"path": record["path"], "error": error_text(error)}


# --- --resume --------------------------------------------------------------------------------------


def recorded_paths(out_file: str | os.PathLike, log: Callable[[str], None] = _stderr) -> set[str]:
    """Paths (as `recorded_key`) that already have a line in a JSONL results file.

    Every complete line is read first: one that is not a result record (the wrong file given as
    --out) is an AdaFocusError naming it, and the file is left as it is. A last line cut off by a
    crash (no newline at the end) is then removed, so that lines appended after it stay valid JSON;
    that video is simply done again.
    """
    name = os.fspath(out_file)
    if not os.path.exists(name):
        return set()
    with open(name, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    lines = data[:end].split(b"\n")[:-1]
    done = set()
    for number, line in enumerate(lines, start=1):
        if line.strip():
            done.add(recorded_key(_recorded_path(name, number, line)))
    tail = data[end:]
    if tail:
        try:
            json.loads(tail)
            cut_off = False
        except ValueError:
            cut_off = True
        if not (cut_off and tail.startswith(b"{")):  # a results line begun, then cut off
            _recorded_path(name, len(lines) + 1, tail)  # else only a whole record, short of its newline
        with open(name, "r+b") as f:
            f.truncate(end)
        log(f"{name}: removed an unfinished last line (the previous run stopped while writing it)")
    return done


def _recorded_path(name: str, number: int, line: bytes) -> str:
    """The "path" of a results line (a JSON object with "path" and "class" or "error"), else an
    AdaFocusError naming the file and line."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if isinstance(record, dict) and isinstance(record.get("path"), str) and ("class" in record or "error" in record):
        return record["path"]
    raise AdaFocusError(
        f"{name}:{number}: not a line of adafocus-predict's results, so --resume cannot continue this file "
        "(it was left as it is)",
        "give --out the JSONL file an earlier run wrote, or a new file name",
    )
