"""Starting and stopping the `tritonserver` that the [serve] extra's wheel (nvidia-pytriton) carries,
on a model repository of ours.

What the binary needs to run our Python models (measured: ../shared/ENVIRONMENT.md):
- a backend directory whose `python/` holds the wheel's `libtriton_python.so`, its
  `triton_python_backend_utils.py` and the Python stub of this interpreter's version, as symlinks
  (the stub finds its libraries through its own path), given as `--backend-directory`;
- this environment's `bin` first on PATH: the stub runs the first `python3` there (PYTHONPATH is not
  passed on), so the models import this adafocus;
- LD_LIBRARY_PATH starting with this interpreter's libpython folder, where it is not the system's
  (otherwise the stub embeds the system's libpython with this interpreter's standard library).

Triton 2.51 does not restart a model's stub process that died (its requests hang until the client
gives up, and that instance answers "Stub process ... is not healthy" from then on):
`TritonServer.dead_instances` tells, and `adafocus serve` stops when it happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from adafocus.errors import AdaFocusError
from adafocus.files import cache_root

INSTALL = "pip install -c constraints.txt -e '.[serve]' (or pip install 'adafocus-deploy[serve]')"
SHM = Path("/dev/shm")
# How long past its exit timeout a stopping server may take before it is killed. Triton 2.51 logs "Exit
# timeout expired. Exiting immediately." on time, but a process holding gRPC calls that will never be
# answered (those of a model process that died) then lives on until their clients give up (measured:
# it exited only when their 20 s deadline passed). Killed, it closes their connections: they fail at
# once (UNAVAILABLE) instead of waiting out their deadlines, or forever without one.
EXIT_GRACE_S = 5


def _wheel() -> Path:
    try:
        import pytriton
    except ImportError:
        raise AdaFocusError("serving needs nvidia-pytriton (its tritonserver): not installed", INSTALL) from None
    folder = Path(pytriton.__file__).parent / "tritonserver"
    if not (folder / "bin" / "tritonserver").is_file():
        raise AdaFocusError(f"{folder} holds no bin/tritonserver: a damaged nvidia-pytriton install", INSTALL)
    return folder


def backend_directory() -> Path:
    """The Python backend as tritonserver wants it, made once per wheel and interpreter (symlinks)."""
    wheel = _wheel()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise AdaFocusError(f"nvidia-pytriton has no Python backend stub for Python {version}", "use Python 3.10-3.12")
    sources = {
        "libtriton_python.so": wheel / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": wheel / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    key = hashlib.sha256(f"{wheel}|{version}".encode()).hexdigest()[:12]
    folder = cache_root() / "triton-backends" / key
    python = folder / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        link = python / name
        if not (link.is_symlink() and os.readlink(link) == str(source)):
            temporary = python / f".{name}.{os.getpid()}"
            temporary.unlink(missing_ok=True)
            temporary.symlink_to(source)
            os.replace(temporary, link)
    return folder


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and libdir not in ("/usr/lib", "/usr/lib64") and Path(libdir).is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonServer:
    """One tritonserver process on `repository`, its ports (0: a free one each) and its log file."""

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        log_file: str | os.PathLike | None = None,
        exit_timeout_s: int = 30,
    ):
        self.repository = Path(repository)
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.log_file = Path(log_file) if log_file else self.repository.parent / f"{self.repository.name}.log"
        self.exit_timeout_s = exit_timeout_s
        self.process: subprocess.Popen | None = None
        self.instances: dict[int, tuple[str, str]] = {}  # stub pid -> (model instance, its shared memory)

    @property
    def command(self) -> list[str]:
        return [
            str(_wheel() / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_directory()}",
            "--disable-auto-complete-config",  # our configs are complete: no stub start per model to fill them
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
        ]

    def start(self, ready_timeout_s: float = 300.0, *, stop: threading.Event | None = None) -> TritonServer:
        """Start the server and wait until it and every model are ready (warm-ups included), or until
        `stop` is set (a Ctrl-C while it starts: the caller then stops it without waiting for ready)."""
        command = self.command
        with open(self.log_file, "ab") as log:
            # a session of its own: a Ctrl-C in our terminal is ours to handle (drain, then stop it),
            # and does not reach the server's model processes directly
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=server_environment(), start_new_session=True
            )
        deadline = time.monotonic() + ready_timeout_s
        stop = stop or threading.Event()
        while not self.ready():
            if stop.is_set():
                self.instances = self._stubs()  # those started so far: stop() removes what they leave
                return self
            if self.process.poll() is not None:
                raise AdaFocusError(
                    f"tritonserver exited with code {self.process.returncode} while starting:\n{self.log_tail()}",
                    f"read {self.log_file}; check the export and options",
                )
            if time.monotonic() > deadline:
                self.stop()
                raise AdaFocusError(
                    f"tritonserver was not ready after {ready_timeout_s:g} s:\n{self.log_tail()}",
                    f"read {self.log_file}",
                )
            stop.wait(0.2)
        self.instances = self._stubs()
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def _stubs(self) -> dict[int, tuple[str, str]]:
        """The model processes this server started: pid -> (instance name, shared memory region)."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                # stub, model.py, shared memory region, 2 sizes, server pid, backend folder, ?, instance, kind
                args = (entry / "cmdline").read_bytes().split(b"\0")
                ours = len(args) > 8 and args[5] == str(self.pid).encode()
                if ours and args[0].endswith(b"triton_python_backend_stub"):
                    found[int(entry.name)] = (args[8].decode(), args[2].decode())
        return found

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def dead_instances(self) -> list[str]:
        """Model instances whose process died since the server became ready (Triton leaves it a zombie)."""
        return sorted(name for pid, (name, _) in self.instances.items() if not _alive(pid))

    def stop(self, timeout_s: float | None = None) -> int:
        """SIGTERM: Triton answers what is in flight, finalizes the models and exits. Then the shared
        memory of model processes that died without cleaning up is removed. Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s or self.exit_timeout_s + EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid, (_, region) in self.instances.items():
            if _alive(pid):  # a server that gave up waiting (exit timeout) leaves its model processes running
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            (SHM / region).unlink(missing_ok=True)
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"  # zombie or dead
