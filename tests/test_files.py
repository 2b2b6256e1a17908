"""The clean-up of what killed writers leave (`remove_stale_partials`, `remove_orphans`) in a folder
shared with processes of another PID namespace (another container's, on a mounted volume or a
shared /tmp), where a PID means nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from adafocus.files import owner_prefix, partial_path, remove_orphans, remove_stale_partials

DECODE = "adafocus-decode-"  # the serving decoder's prefix (serve/decoders.py)


def _unshare() -> list[str]:
    """The command that runs what follows it as PID 1 of a new PID namespace with a /proc of its
    own, killed with it; skips where no such namespace can be made (another OS, no unshare, not
    root and no user namespaces)."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        pytest.skip("needs Linux's unshare to make a second PID namespace")
    tried = []
    for user in ([], ["--user", "--map-root-user"]):  # as root; else in a user namespace of our own
        command = ["unshare", *user, "--pid", "--fork", "--kill-child", "--mount-proc"]
        probe = subprocess.run([*command, "true"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return command
        tried.append(f"{' '.join(command)}: {probe.stderr.strip()}")
    pytest.skip("cannot make a PID namespace here (" + "; ".join(tried) + ")")


def _free_pid() -> int:
    """A PID that no process holds here: a process that holds it in another namespace is, to
    `os.kill`, no process at all."""
    for pid in range(300, 5000):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free PID below 5000")


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# PID 1 of the new namespace forks until it has a child of PID `target` (PIDs are handed out in
# order, and nothing else runs there), which writes as an export and a decoder pool would and waits.
_WRITER = textwrap.dedent(
    """
    import os, sys, tempfile, time
    from pathlib import Path
    from adafocus.files import owner_prefix, partial_path
    folder, target = Path(sys.argv[1]), int(sys.argv[2])
    while True:
        pid = os.fork()
        if pid == 0:
            if os.getpid() != target:
                os._exit(0)
            partial = partial_path(folder / "X")
            partial.mkdir()
            (partial / "glance.onnx").write_bytes(b"half an export")
            owned = Path(tempfile.mkdtemp(prefix=owner_prefix("adafocus-decode-"), dir=folder))
            (owned / "upload").write_bytes(b"a client's video")
            print(partial, owned, sep="\\n", flush=True)
            time.sleep(600)
            os._exit(0)
        os.waitpid(pid, 0) if pid != target else None
        if pid >= target:
            break
    os.waitpid(pid, 0)
    """
)


@pytest.fixture
def foreign_writer(tmp_path):
    """(partial, decode folder) of a live writer in another PID namespace, in a folder shared with
    us, under a PID that no process of ours holds."""
    command = _unshare()
    target = _free_pid()
    process = subprocess.Popen(
        [*command, sys.executable, "-c", _WRITER, str(tmp_path), str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        partial, owned = Path(process.stdout.readline().strip()), Path(process.stdout.readline().strip())
        assert partial.is_dir() and owned.is_dir(), f"the writer at PID {target} of the new namespace did not start"
        yield partial, owned
    finally:
        process.kill()  # and with it (--kill-child) the namespace's PID 1, and so all of the namespace
        process.wait(60)
        process.stdout.close()


def test_a_live_writers_partial_in_another_pid_namespace_stays(foreign_writer, tmp_path):
    """Another container's export under construction on a shared cache volume: its PID is free
    here, which says nothing of the writer."""
    partial, _ = foreign_writer
    assert remove_stale_partials(tmp_path) == []
    assert remove_stale_partials(tmp_path, "X") == []
    assert (partial / "glance.onnx").read_bytes() == b"half an export"


def test_a_live_owners_decode_folder_in_another_pid_namespace_stays(foreign_writer, tmp_path):
    """Another container's decoder pool in a shared /tmp, with a client's upload in its folder."""
    _, owned = foreign_writer
    assert remove_orphans(tmp_path, DECODE) == []
    assert (owned / "upload").read_bytes() == b"a client's video"


def test_a_dead_writer_of_our_namespace_is_still_removed(tmp_path):
    """What a SIGKILLed writer of our namespace leaves is removed; a live one's (ours) stays."""
    child = textwrap.dedent(
        """
        import sys, tempfile, time
        from pathlib import Path
        from adafocus.files import owner_prefix, partial_path
        folder = Path(sys.argv[1])
        partial = partial_path(folder / "X", ".pt2")
        partial.write_bytes(b"half a package")
        owned = tempfile.mkdtemp(prefix=owner_prefix("adafocus-decode-"), dir=folder)
        print(partial, owned, sep="\\n", flush=True)
        time.sleep(600)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        partial, owned = Path(process.stdout.readline().strip()), Path(process.stdout.readline().strip())
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(60)
        process.stdout.close()
    assert partial.is_file() and owned.is_dir(), "precondition: the child wrote both"
    mine = partial_path(tmp_path / "Y")
    mine.mkdir()
    my_folder = Path(tempfile.mkdtemp(prefix=owner_prefix(DECODE), dir=tmp_path))
    assert remove_stale_partials(tmp_path) == [partial]
    assert remove_orphans(tmp_path, DECODE) == [owned]
    assert mine.is_dir() and my_folder.is_dir()


def test_names_without_a_namespace_are_judged_by_their_pid_as_before(tmp_path):
    """Names made before the namespace was written in them: taken as our namespace's."""
    dead, live = _dead_pid(), os.getpid()
    old = [
        tmp_path / f".X.partial-{dead}",
        tmp_path / f".X.partial-{dead}.pt2",
        tmp_path / f"{DECODE}{dead}-5-abcd_123",
    ]
    kept = [
        tmp_path / f".X.partial-{live}",
        tmp_path / f".X.partial-{live}.ab12cd34",
        tmp_path / f"{DECODE}{live}-x-k2j4",
    ]
    for path in old + kept:
        path.mkdir()
    assert sorted(remove_stale_partials(tmp_path) + remove_orphans(tmp_path, DECODE)) == sorted(old)
    assert all(path.is_dir() for path in kept)


def test_a_leftover_of_another_host_stays(tmp_path):
    """Our namespace's inode with another host's name: a leftover of another machine whose namespace
    has the same inode, sharing the folder (a network volume); its writer may be alive there. The
    same names with our host's tag are removed (this host after a reboot: the first namespace's
    inode does not change)."""
    import hashlib

    if not os.path.exists("/proc/self/ns/pid"):
        pytest.skip("no PID namespaces here")
    dead = _dead_pid()
    inode = os.stat("/proc/self/ns/pid").st_ino
    for host, removed in ((os.uname().nodename + "-other", False), (os.uname().nodename, True)):
        where = f"ns{inode}_{hashlib.sha256(host.encode()).hexdigest()[:12]}"
        partial, owned = tmp_path / f".X.partial-{dead}-{where}", tmp_path / f"{DECODE}{dead}-5-{where}.abcd_123"
        partial.mkdir()
        owned.mkdir()
        expected = [[partial], [owned]] if removed else [[], []]
        assert [remove_stale_partials(tmp_path), remove_orphans(tmp_path, DECODE)] == expected, host
        for path in (partial, owned):  # the next host's names in an empty folder
            if path.exists():
                path.rmdir()


def test_a_proc_of_another_pid_namespace_gives_no_start_time():
    """After an unshare without a /proc of its own, /proc/1 is the outer namespace's PID 1, not
    this namespace's: its start time written as ours would make a live owner look like a reused PID
    to a process that reads the right /proc."""
    command = [part for part in _unshare() if part != "--mount-proc"]
    code = "import os; from adafocus.files import owner_prefix; print(os.getpid(), owner_prefix('p-'))"
    result = subprocess.run([*command, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    pid, prefix = result.stdout.split()
    assert pid == "1" and prefix.startswith("p-1-x-"), prefix
