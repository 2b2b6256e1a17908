"""Writing files the way every part of the project does: whole or not at all, and JSON that strict
readers accept.

- `atomic_write`: a temporary file in the target's folder, then `os.replace`, so a reader never
  sees half a file and a crash leaves the old one (or nothing) behind.
- `dumps` / `write_json`: RFC 8259 JSON. Python's `json` writes NaN and ±Infinity by default, which
  `JSON.parse`, `jq` and most other readers reject; here such a value is an error that names where
  it sits, so the writer is fixed instead of the file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from adafocus.errors import InternalError


def atomic_write(path: str | os.PathLike, data: bytes | str, *, mode: int | None = None) -> Path:
    """Write `data` to `path` atomically. `mode` defaults to what a plain `open()` would give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        if mode is None:  # mkstemp makes the file private; what we write is not
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def non_finite_at(value, where: str = "") -> str | None:
    """The JSON path of the first NaN or ±inf float inside `value`, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where or "(top level)")
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = non_finite_at(item, f"{where}/{key}")
        if found:
            return found
    return None


def dumps(value, *, indent: int | None = 2) -> str:
    """Strict JSON text of `value` (UTF-8 characters kept as they are)."""
    try:
        return json.dumps(value, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        where = non_finite_at(value)
        if where is None:
            raise
        raise InternalError(f"a non-finite number at {where} cannot be written as JSON") from e


def write_json(path: str | os.PathLike, value) -> Path:
    """`value` as strict, indented JSON in `path`, written atomically."""
    return atomic_write(path, dumps(value) + "\n")


PARTIAL = ".partial-"  # `.NAME.partial-PID`: what a writer builds before renaming it to NAME


def partial_path(target: Path, suffix: str = "") -> Path:
    """Where this process builds `target` before renaming it into place: a hidden sibling that
    carries our PID, so that a later run can tell a dead writer's leftovers from a live one's.
    `suffix` for writers that insist on a file extension (AOTInductor wants `.pt2`)."""
    return target.parent / f".{target.name}{PARTIAL}{os.getpid()}{suffix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_partials(folder: Path, name: str = "") -> list[Path]:
    """Delete `.NAME.partial-PID` files and directories in `folder` whose process is gone (killed
    with kill -9, or by a power cut: nothing of theirs could clean up); only those of NAME `name`
    where one is given (in a shared folder such as the temporary one). Returns what was removed."""
    import re
    import shutil

    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        pattern = r"\." + (re.escape(name) if name else ".+") + re.escape(PARTIAL) + r"(\d+)(\.[A-Za-z0-9]+)?"
        match = re.fullmatch(pattern, entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def json_copy(value):
    """A deep copy of JSON-like data that keeps only what JSON can hold (what a manifest is)."""
    return json.loads(dumps(value, indent=None))


def cache_root() -> Path:
    """Where adafocus keeps what it can rebuild (the built-in exports, engine caches):
    `$ADAFOCUS_CACHE`, default ~/.cache/adafocus."""
    return Path(os.environ.get("ADAFOCUS_CACHE", Path.home() / ".cache" / "adafocus"))
