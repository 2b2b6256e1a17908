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
import re
import tempfile
from pathlib import Path
from stat import S_ISDIR

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


PARTIAL = ".partial-"  # `.NAME.partial-PID-WHERE`: what a writer builds before renaming it to NAME

# WHERE in the names below: the PID namespace a PID counts in (`_namespace`). Neither "-" nor ".":
# it is one field of names split at "-", and the "." after it in a temporary folder's name sets it
# apart from the random letters that `tempfile.mkdtemp` adds (and from the names older versions
# made, which those versions therefore leave alone).
_WHERE = r"ns\d{1,20}_[0-9a-f]{12}"


def _namespace() -> str | None:
    """The PID namespace this process's PIDs count in, as WHERE: `ns` + its inode + `_` + the
    first 12 hex digits of the SHA-256 of this host's name; None where /proc cannot tell (another
    OS).

    A PID means something only in its own namespace. A process in another container that shares a
    folder with us (a mounted cache volume, a shared /tmp) has PIDs that are free here, or that
    belong to some other process here. The inode alone names a namespace only on one machine: the
    first namespace has the same one (0xEFFFFFFC) on every machine, and containers' are numbered
    from one small range. The host's name tells machines sharing a folder (a network volume) apart;
    unlike the boot's id it stays across a reboot, so that what a power cut left on this machine is
    still removed (the first namespace's inode is fixed). Read each time: a child forked after an
    unshare is in another namespace."""
    import hashlib

    try:
        inode = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    host = hashlib.sha256(os.uname().nodename.encode("utf-8", "surrogateescape")).hexdigest()
    return f"ns{inode}_{host[:12]}"


def _ours(where: str | None, ours: str | None) -> bool:
    """Whether a name's PID counts in our namespace, so that its writer can be looked up here. A
    name without WHERE (made before the namespace was written, or where /proc could not tell) is
    taken as ours, as it always was. One of another namespace or another host is not: its writer
    may be alive where we cannot see it. (A container restarted has a new namespace: what its
    earlier run left stays.)"""
    return where is None or where == ours


def partial_path(target: Path, suffix: str = "", *, pid: int | None = None) -> Path:
    """Where this process builds `target` before renaming it into place: a hidden sibling
    `.NAME.partial-PID-WHERE` that carries our PID and the namespace it counts in, so that a later
    run can tell a dead writer's leftovers from a live one's. `suffix` for writers that insist on a
    file extension (AOTInductor wants `.pt2`). `.NAME.partial-PID` where /proc cannot tell WHERE.
    `pid`: where process `pid` of our namespace builds it instead (a child we started)."""
    where = _namespace()
    pid = os.getpid() if pid is None else pid
    return target.parent / f".{target.name}{PARTIAL}{pid}{'' if where is None else '-' + where}{suffix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OverflowError:  # past any PID: not a name we made, so not ours to remove
        return True
    return True


def remove_stale_partials(folder: Path, name: str = "") -> list[Path]:
    """Delete `.NAME.partial-PID-WHERE` files and directories in `folder` whose process is gone
    (killed with kill -9, or by a power cut: nothing of theirs could clean up); only those of NAME
    `name` where one is given (in a shared folder such as the temporary one). Returns what was
    removed.

    Only a partial of our PID namespace is judged by its PID (`_ours`). Another container's or
    another machine's stays: such leftovers cost disk, never files."""
    import shutil

    removed = []
    if not folder.is_dir():
        return removed
    ours = _namespace()
    pattern = re.compile(
        r"\." + (re.escape(name) if name else ".+") + re.escape(PARTIAL) + rf"(\d+)(?:-({_WHERE}))?(\.[A-Za-z0-9]+)?"
    )
    for entry in folder.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or not _ours(match.group(2), ours) or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _started(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (field 22 of Linux's /proc/PID/stat);
    None where that cannot be read (another OS, /proc mounted with hidepid, a process gone, a /proc
    of another PID namespace). Read as bytes: the command name in it may be any bytes."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            # /proc mounted for another PID namespace (an unshare without a /proc of its own): its
            # /proc/PID is another process than our PID
            return None
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()  # after "PID (COMMAND) ", which may hold spaces
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def owner_prefix(prefix: str) -> str:
    """`prefix` + our PID + our start time + our PID namespace, for `tempfile.mkdtemp(prefix=...)`:
    a name (`prefix`PID-START-WHERE.RANDOM) that says which process owns the folder, so that
    `remove_orphans` can remove it once that process is gone.

    A PID alone is reused (pid_max is often 32768; a restarted container gives the same PIDs in the
    same order), and `remove_stale_partials` then keeps a dead owner's folder while another process
    holds its PID. A PID with its start time names one process for good ("x" where /proc cannot
    tell it: then the PID alone decides) in the namespace WHERE (left out where /proc cannot tell
    it: `prefix`PID-START-RANDOM, the name older versions made)."""
    started = _started(os.getpid())
    where = _namespace()
    return f"{prefix}{os.getpid()}-{'x' if started is None else started}-{'' if where is None else where + '.'}"


def _owner_alive(pid: int, started: int | None) -> bool:
    """Whether the process that made a folder named (pid, started) may still use it. In doubt,
    yes: a folder kept too long costs disk, one removed under a live process loses its files.
    (An exited process not yet reaped counts as alive: a thread group whose first thread ended
    looks the same, and lives on.)"""
    if not _alive(pid):
        return False
    now = _started(pid)
    return started is None or now is None or now == started  # another start time: the PID was reused


def remove_orphans(folder: Path, prefix: str) -> list[Path]:
    """Delete the folders `owner_prefix(prefix)` named in `folder` (the temporary one) whose owner
    is gone (killed with kill -9, by the OOM killer: nothing of theirs could clean up). A folder of
    a live process, of another user, or of a name this did not make is left alone, and so is one
    of another PID namespace (another container sharing /tmp) or another host (`_ours`): such
    folders cost disk, never files. Returns what was removed."""
    import shutil

    pattern = re.compile(re.escape(prefix) + rf"(\d{{1,10}})-(\d{{1,20}}|x)-(?:({_WHERE})\.)?[A-Za-z0-9_]+")
    removed = []
    if not folder.is_dir():
        return removed
    ours = _namespace()
    uid = os.getuid() if hasattr(os, "getuid") else None
    for entry in folder.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or not _ours(match.group(3), ours):
            continue
        try:
            info = entry.lstat()
        except OSError:  # removed meanwhile
            continue
        if not S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid):
            continue  # not a folder we could have made (a link, another user's)
        pid, started = int(match.group(1)), match.group(2)
        if _owner_alive(pid, None if started == "x" else int(started)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def json_copy(value):
    """A deep copy of JSON-like data that keeps only what JSON can hold (what a manifest is)."""
    return json.loads(dumps(value, indent=None))


def cache_root() -> Path:
    """Where adafocus keeps what it can rebuild (the built-in exports, engine caches):
    `$ADAFOCUS_CACHE`, default ~/.cache/adafocus."""
    return Path(os.environ.get("ADAFOCUS_CACHE", Path.home() / ".cache" / "adafocus"))
