"""Encoded video files sent to the server (`VIDEO_FILE`), decoded in worker processes.

FFmpeg is C code: a malformed file can crash the process that decodes it. Each worker is a process of
its own, driven by one thread here that hands it one file at a time; when a worker dies (or takes
longer than `timeout_s`), only the file it was decoding fails, with an error that says so, and a new
worker takes its place for the next file. Files are decoded by `adafocus.data.video` exactly as
`adafocus-predict` decodes them, from a temporary file that is removed afterwards (also, by the
driver, when its worker died holding it). The pool's folder of such files is named after the
process that owns it, and the next pool removes one whose owner was killed before it could.

Workers die with the process that started them (Linux: the parent-death signal; and a worker whose
pipe closes exits), so killing a server's model process leaves no decoder behind.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adafocus.errors import AdaFocusError, error_text
from adafocus.files import owner_prefix, remove_orphans
from adafocus.model.presets import Preset, get_preset

_STOP = None
FOLDER_PREFIX = "adafocus-decode-"  # `adafocus-decode-PID-START-WHERE.RANDOM` in $TMPDIR (files.owner_prefix)


@dataclass
class Decoded:
    """One decoded file: the model input and the source frames it was sampled from."""

    frames: np.ndarray  # (T, 3, S, S) float32, normalised
    indices: list[int]
    truncated: bool
    decoding: str  # "seek", or "sequential: <why>" (adafocus.data.video.VideoClip.decoding)


@dataclass
class _Job:
    data: bytes
    future: Future


class DecoderPool:
    """`workers` decoder processes for `preset`'s input; `submit(bytes)` -> Future[Decoded] (an
    AdaFocusError on the future for a file that cannot be decoded, or that crashed its decoder)."""

    def __init__(self, preset: Preset, workers: int = 2, *, timeout_s: float = 60.0):
        if workers < 1:
            raise AdaFocusError(f"{workers} decoder processes", "give at least 1")
        from adafocus.data.video import decoder_threads

        self.preset, self.timeout_s = preset, timeout_s
        self.threads = decoder_threads(workers)  # FFmpeg threads in each worker: the cores shared
        # A SIGKILLed model process (Triton's stub killed, the OOM killer) cannot remove its folder,
        # which may still hold a client's uploaded video: its name says whose it is, and each pool
        # that starts removes those of owners that are gone.
        temporary = Path(tempfile.gettempdir())
        remove_orphans(temporary, FOLDER_PREFIX)
        self.folder = Path(tempfile.mkdtemp(prefix=owner_prefix(FOLDER_PREFIX), dir=temporary))
        self.crashes = 0  # workers that died on a file (or were stopped for taking too long)
        self._lock = threading.Lock()  # for `crashes` (drivers) and `_closed` (submit against close)
        self._closed = False
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._workers: list[subprocess.Popen | None] = [None] * workers
        self._start_error: BaseException | None = None
        self._started = threading.Barrier(workers + 1)
        self._drivers = [
            threading.Thread(target=self._drive, args=(slot,), name=f"adafocus-decoder-{slot}", daemon=True)
            for slot in range(workers)
        ]
        for driver in self._drivers:
            driver.start()
        try:
            self._started.wait()
        except threading.BrokenBarrierError:  # a driver could not start its worker: say why, leave nothing
            for driver in self._drivers:
                driver.join()
            self._stop_workers()
            raise self._start_error from None

    def submit(self, data: bytes) -> Future:
        future: Future = Future()
        with self._lock:  # a job put after close's stops would never be taken: refused instead
            if self._closed:
                from adafocus.serve.loop import Unavailable  # here: the worker processes import this module

                future.set_exception(Unavailable("the decoders are shut down", "send the request to another replica"))
            elif not data:
                future.set_exception(AdaFocusError("VIDEO_FILE is empty (0 bytes)", "send the bytes of a video file"))
            else:
                self._jobs.put(_Job(bytes(data), future))
        return future

    def close(self) -> None:
        """Stop the workers (after the files already submitted) and remove the temporary folder."""
        with self._lock:
            self._closed = True
            for _ in self._drivers:
                self._jobs.put(_STOP)
        for driver in self._drivers:
            driver.join()
        self._stop_workers()

    def _stop_workers(self) -> None:
        for worker in self._workers:
            if worker is not None:
                _stop(worker)
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w is not None]

    def _start(self) -> subprocess.Popen:
        # a fresh interpreter running this module, talking over its stdin and stdout: nothing of this
        # (threaded) process is forked, and nothing depends on how this process was started
        command = [sys.executable, "-m", __name__, self.preset.name, str(self.folder), str(self.threads)]
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)

    def _drive(self, slot: int) -> None:
        # Each driver thread starts its own workers: the parent-death signal fires when the thread that
        # started a process ends, and this one lives as long as the pool.
        try:
            self._workers[slot] = self._start()
        except BaseException as e:  # noqa: BLE001 - raised by __init__, which the barrier's abort wakes
            self._start_error = e
            self._started.abort()
            return
        try:
            self._started.wait()
        except threading.BrokenBarrierError:  # another driver failed to start: __init__ stops our worker
            return
        while (job := self._jobs.get()) is not _STOP:
            if self._workers[slot] is None or self._workers[slot].poll() is not None:  # died between files
                self._workers[slot] = self._start()
            worker = self._workers[slot]
            try:
                _send(worker.stdin, job.data)
                if not select.select([worker.stdout], [], [], self.timeout_s)[0]:
                    worker.kill()
                    raise TimeoutError
                reply = pickle.loads(_receive(worker.stdout))
            except (EOFError, OSError, TimeoutError) as e:
                worker.kill()
                worker.wait()
                with self._lock:
                    self.crashes += 1
                self._workers[slot] = None
                for leftover in self.folder.glob(f"{worker.pid}-*"):
                    leftover.unlink(missing_ok=True)
                job.future.set_exception(_crash(e, worker.returncode, self.timeout_s))
                continue
            if isinstance(reply, str):
                job.future.set_exception(AdaFocusError(f"VIDEO_FILE: {reply}"))
            else:
                job.future.set_result(Decoded(*reply))


def _send(pipe, data: bytes) -> None:
    pipe.write(struct.pack("<Q", len(data)) + data)
    pipe.flush()


def _receive(pipe) -> bytes:
    header = pipe.read(8)
    if len(header) < 8:
        raise EOFError
    size = struct.unpack("<Q", header)[0]
    data = pipe.read(size)
    if len(data) < size:
        raise EOFError
    return data


def _crash(error: BaseException, exitcode: int | None, timeout_s: float) -> AdaFocusError:
    if isinstance(error, TimeoutError):
        return AdaFocusError(
            f"VIDEO_FILE: decoding took more than {timeout_s:g} s; the decoder was stopped",
            "send a shorter or smaller file, or re-encode it",
        )
    how = f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
    return AdaFocusError(
        f"VIDEO_FILE: the decoder process died on this file ({how})",
        "check the file plays in a video player, or re-encode it; other requests were not affected",
    )


def _stop(worker: subprocess.Popen) -> None:
    worker.kill()  # between files a worker holds nothing (and one still importing would take seconds)
    worker.wait()
    worker.stdin.close()
    worker.stdout.close()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _work(preset: Preset, folder: str, threads: int) -> None:
    """A worker: bytes in, (frames, indices, truncated, decoding) or an error text out, until its input ends."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the server, which drains, then stops us
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the replies
    requests = sys.stdin.buffer
    from adafocus.data.video import load_clip_for

    job = 0
    while True:
        try:
            data = _receive(requests)
        except (EOFError, OSError):
            return
        job += 1
        path = os.path.join(folder, f"{os.getpid()}-{job}")
        try:
            with open(path, "wb") as f:
                f.write(data)
            clip = load_clip_for(path, preset, threads=threads)
            reply: object = (clip.frames.numpy(), list(clip.indices), bool(clip.truncated), clip.decoding)
        except Exception as e:  # noqa: BLE001 - any decoding failure is this file's answer
            reply = error_text(e).replace(path, "the file")
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        _send(replies, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    _work(get_preset(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
