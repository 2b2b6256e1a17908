"""The real server: `adafocus serve` as a subprocess (a real tritonserver on free 127.0.0.1 ports) and
real tritonclient clients over HTTP and gRPC. Results equal `Runtime.predict` video by video; budgets
mix in one batch; bad requests, a killed model process and Ctrl-C under load each get the answers
they should, and nothing is left behind.

Skipped with the reason where the [serve] extra is missing, except in CI, which sets
ADAFOCUS_REQUIRE_SERVE=1 to turn that skip into a failure.
"""

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from adafocus.data.synthetic import SyntheticTask
from adafocus.data.video import to_model_input, write_lossless
from adafocus.runtime import Runtime
from adafocus.serve.budgets import Budgets
from conftest import clear_front, near_thresholds, strict_loads


def _missing() -> str | None:
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401

        from adafocus.serve.triton_server import backend_directory

        backend_directory()
    except Exception as e:  # noqa: BLE001 - whatever is missing, it is the reason
        return f"the [serve] extra is not usable here ({e}): pip install -e '.[serve]'"
    return None


MISSING = _missing()
if MISSING and os.environ.get("ADAFOCUS_REQUIRE_SERVE") == "1":
    raise RuntimeError(f"ADAFOCUS_REQUIRE_SERVE=1 but {MISSING}")  # CI: a skip here would hide a broken install
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

PROB_TOL = 1e-5
VIDEOS = 24


@dataclass
class Served:
    process: subprocess.Popen
    http: str
    grpc: str
    metrics: str
    log: Path

    def metric(self, name: str, **labels) -> float:
        """The sum of a metric's samples whose labels include `labels`."""
        text = urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, sig=signal.SIGINT, timeout: float = 120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_server(export_path, folder: Path, *options: str) -> Served:
    from adafocus.serve.triton_server import free_port

    http, grpc, metrics = (free_port() for _ in range(3))
    log = folder / f"serve-{http}.log"
    args = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", "1"]
    command = [sys.executable, "-m", "adafocus", "serve", str(export_path), *args, *options]
    env = {**os.environ, "ADAFOCUS_CACHE": str(folder / "cache")}  # what a failed run keeps stays in tmp
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    served = Served(process, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}", log)
    deadline = time.monotonic() + 240
    while True:
        try:
            if urllib.request.urlopen(f"http://{served.http}/v2/health/ready", timeout=2).status == 200:
                return served
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            served.stop(signal.SIGKILL)
            pytest.fail(f"adafocus serve did not get ready:\n{log.read_text(encoding='utf-8')[-4000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def demo_frames(calibrated_demo):
    """Test videos as uint8 frames (what FRAMES and a lossless file carry) and their model input."""
    task = SyntheticTask(calibrated_demo.preset, seed=0)
    frames = np.stack([np.rint(task.raw_video("test", i)[0] * 255).astype(np.uint8) for i in range(VIDEOS)])
    videos = np.stack([to_model_input(f).numpy() for f in frames])
    return frames, videos


@pytest.fixture(scope="module")
def demo_files(demo_frames, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served-files")
    paths = []
    for i, frames in enumerate(demo_frames[0]):
        paths.append(folder / f"video-{i:02d}.mkv")
        write_lossless(paths[-1], frames.transpose(0, 2, 3, 1))
    return paths


@pytest.fixture(scope="module")
def server(calibrated_demo, tmp_path_factory):
    served = start_server(
        calibrated_demo.path, tmp_path_factory.mktemp("server"), "--batch-size", "16", "--max-file-mib", "1"
    )
    yield served
    assert served.stop() == 0, served.log.read_text(encoding="utf-8")[-3000:]


def grpc_requests(served, model, items, *, timeout=120):
    """Send every (inputs, parameters) at once over gRPC; [(result, error)] in order, each request
    answered exactly once (checked)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(served.grpc)
    answers = [[] for _ in items]
    done = threading.Semaphore(0)
    for i, (inputs, parameters) in enumerate(items):
        tensors = []
        for name, value in inputs.items():
            dtype = {"uint8": "UINT8", "float32": "FP32", "object": "BYTES"}[str(value.dtype)]
            tensors.append(grpcclient.InferInput(name, list(value.shape), dtype))
            tensors[-1].set_data_from_numpy(value)

        def callback(result=None, error=None, i=i):
            answers[i].append((result, error))
            done.release()

        client.async_infer(model, tensors, callback, parameters=parameters or None, client_timeout=timeout)
    for _ in items:
        assert done.acquire(timeout=timeout + 30), "a request got no answer"
    time.sleep(0.2)  # a second answer to any request would arrive now
    client.close()
    assert all(len(a) == 1 for a in answers), "a request was answered twice"
    return [a[0] for a in answers]


def file_input(path) -> np.ndarray:
    return np.array([Path(path).read_bytes()], dtype=np.object_)


def assert_outputs_match(outputs, reference, row, skip):
    if skip[row]:
        return 0
    assert int(outputs["CLASS_INDEX"].reshape(-1)[0]) == reference.prediction[row], row
    exit_step = int(outputs["EXIT_STEP"].reshape(-1)[0])
    assert exit_step == reference.exit_step[row], row
    np.testing.assert_allclose(outputs["PROBABILITIES"].reshape(-1), reference.probs[row], atol=PROB_TOL, rtol=0)
    starts = outputs["CUBE_STARTS"].reshape(-1, 3)
    np.testing.assert_array_equal(starts[:exit_step], reference.cube_starts[row, :exit_step])
    assert (starts[exit_step:] == -1).all() and np.isnan(outputs["CUBE_CENTRES"].reshape(-1, 3)[exit_step:]).all()
    return 1


OUTPUT_NAMES = ("CLASS_INDEX", "PROBABILITIES", "EXIT_STEP", "CUBE_STARTS", "CUBE_CENTRES", "BUDGET_GFLOPS")


@pytest.mark.parametrize("model", ["adafocus", "adafocus_per_batch"])
def test_http_and_grpc_answers_equal_predict_for_every_input(server, calibrated_demo, demo_frames, demo_files, model):
    import tritonclient.http as httpclient

    frames, videos = demo_frames
    runtime = Runtime.load(calibrated_demo.path)
    reference = runtime.predict(videos)
    skip = near_thresholds(runtime, videos, runtime.thresholds)
    batch = (lambda a: a[None]) if model == "adafocus_per_batch" else (lambda a: a)  # its first axis is Triton's batch
    default_budget = Budgets(calibrated_demo, runtime.thresholds).default.gflops
    compared = 0
    # HTTP, FRAMES and VIDEO, one request at a time
    client = httpclient.InferenceServerClient(server.http)
    try:  # an open HTTP connection would hold the server's shutdown
        for row in range(8):
            for name, value, dtype in (("FRAMES", frames[row], "UINT8"), ("VIDEO", videos[row], "FP32")):
                tensor = httpclient.InferInput(name, list(batch(value).shape), dtype)
                tensor.set_data_from_numpy(batch(value))
                result = client.infer(model, [tensor])
                compared += assert_outputs_match({n: result.as_numpy(n) for n in OUTPUT_NAMES}, reference, row, skip)
                assert result.as_numpy("BUDGET_GFLOPS").reshape(-1)[0] == pytest.approx(default_budget)
                assert result.as_numpy("FRAME_INDICES") is None  # only for files
    finally:
        client.close()
    # gRPC, all at once: VIDEO and VIDEO_FILE
    items = [({"VIDEO": batch(videos[row])}, None) for row in range(VIDEOS)]
    items += [({"VIDEO_FILE": batch(file_input(demo_files[row]))}, None) for row in range(VIDEOS)]
    for i, (result, error) in enumerate(grpc_requests(server, model, items)):
        assert error is None, error
        row = i % VIDEOS
        compared += assert_outputs_match({n: result.as_numpy(n) for n in OUTPUT_NAMES}, reference, row, skip)
        if i >= VIDEOS:
            assert result.as_numpy("FRAME_INDICES").reshape(-1).tolist() == list(range(8))  # 8 frames sampled to 8
    assert compared >= 0.9 * (16 + 2 * VIDEOS)


def test_budgets_of_one_batch_equal_separate_predicts(server, calibrated_demo, demo_frames):
    _, videos = demo_frames
    runtime = Runtime.load(calibrated_demo.path)
    budgets = Budgets(calibrated_demo, runtime.thresholds)
    front = clear_front(runtime, videos, budgets)
    asked = [front[1].gflops, front[len(front) // 2].gflops, None]
    turns_before = server.metric("adafocus_mixed_budget_turns_total", model="adafocus")
    rows = list(range(VIDEOS)) * 2
    items = [
        ({"VIDEO": videos[r]}, {} if asked[i % 3] is None else {"budget_gflops": asked[i % 3]})
        for i, r in enumerate(rows)
    ]
    answers = grpc_requests(server, "adafocus", items)
    points = [budgets.resolve(asked[i % 3]) for i in range(len(rows))]
    thresholds = np.stack([p.thresholds for p in points])
    skip = near_thresholds(runtime, videos[rows], thresholds)
    reference = runtime.predict(
        videos[rows], thresholds=thresholds
    )  # per row: equal to separate predicts (test_runtime)
    compared = 0
    for i, (result, error) in enumerate(answers):
        assert error is None, error
        outputs = {n: result.as_numpy(n) for n in OUTPUT_NAMES}
        compared += assert_outputs_match(outputs, reference, i, skip)
        assert outputs["BUDGET_GFLOPS"][0] == pytest.approx(points[i].gflops)
    assert compared >= 0.9 * len(rows)
    time.sleep(1.2)  # the metrics are refreshed every 0.5 s
    assert server.metric("adafocus_mixed_budget_turns_total", model="adafocus") > turns_before


def test_bad_requests_each_get_one_clear_error(server, calibrated_demo, demo_frames, demo_files, tmp_path):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    frames, videos = demo_frames
    cheapest = Budgets(calibrated_demo, Runtime.load(calibrated_demo.path).thresholds).cheapest.gflops
    nan = videos[1].copy()
    nan[2, 0, 3, 3] = np.nan
    big = tmp_path / "big.mkv"
    big.write_bytes(np.random.default_rng(0).bytes(int(1.5 * 2**20)))
    cases = {  # inputs, parameters -> (HTTP status, what the error says)
        "wrong shape": ({"VIDEO": videos[0][:4]}, None, 400, "unexpected shape for input 'VIDEO'"),
        "wrong dtype": ({"VIDEO": videos[0].astype(np.float16)}, None, 400, "expects 'FP32'"),
        "NaN frames": ({"VIDEO": nan}, None, 400, "VIDEO holds NaN or inf values"),
        "corrupt file": ({"VIDEO_FILE": np.array([b"not a video" * 100], np.object_)}, None, 400, "not a video FFmpeg"),
        "empty file": ({"VIDEO_FILE": np.array([b""], np.object_)}, None, 400, "VIDEO_FILE is empty"),
        "over-large file": ({"VIDEO_FILE": file_input(big)}, None, 400, "over this server's limit of 1 MiB"),
        "unknown budget": (
            {"VIDEO": videos[0]},
            {"budget_gflops": cheapest / 2},
            400,
            f"ask for at least {cheapest:.4f}",
        ),
        "two inputs": ({"VIDEO": videos[0], "FRAMES": frames[0]}, None, 400, "send exactly one"),
    }
    client = httpclient.InferenceServerClient(server.http)
    try:  # an open HTTP connection would hold the server's shutdown
        for what, (inputs, parameters, status, text) in cases.items():
            tensors = []
            for name, value in inputs.items():
                dtype = {"uint8": "UINT8", "float32": "FP32", "float16": "FP16", "object": "BYTES"}[str(value.dtype)]
                tensors.append(httpclient.InferInput(name, list(value.shape), dtype))
                tensors[-1].set_data_from_numpy(value)
            with pytest.raises(InferenceServerException) as caught:
                client.infer("adafocus", tensors, parameters=parameters)
            assert caught.value.status() == str(status), what
            assert text in caught.value.message(), (what, caught.value.message())
    finally:
        client.close()
    # neighbours are unaffected: good and bad requests at once, each answered on its own
    items = [({"VIDEO": videos[0]}, None), ({"VIDEO": nan}, None), ({"VIDEO_FILE": file_input(demo_files[2])}, None)]
    answers = grpc_requests(server, "adafocus", items)
    assert answers[0][1] is None and answers[2][1] is None and "NaN" in answers[1][1].message()


def test_200_requests_with_10_bad_get_190_results_and_10_errors(server, demo_frames, demo_files):
    _, videos = demo_frames
    nan = videos[3].copy()
    nan[0, 1, 2, 3] = np.inf
    corrupt = np.array([b"\x00\x00\x00\x18ftypmp42" + bytes(4000)], np.object_)
    items, bad = [], set()
    for i in range(200):
        if i % 20 == 7:
            items.append(({"VIDEO": nan} if i % 40 == 7 else {"VIDEO_FILE": corrupt}, None))
            bad.add(i)
        elif i % 3 == 0:
            items.append(({"VIDEO_FILE": file_input(demo_files[i % VIDEOS])}, None))
        else:
            items.append(({"VIDEO": videos[i % VIDEOS]}, None))
    answers = grpc_requests(server, "adafocus", items)
    errors = {i for i, (_, error) in enumerate(answers) if error is not None}
    assert errors == bad
    assert all(answers[i][1].status() == "StatusCode.INVALID_ARGUMENT" for i in bad)
    assert sum(result is not None for result, _ in answers) == 190


def test_predict_with_server_writes_the_lines_of_the_local_engine(server, calibrated_demo, demo_files, tmp_path):
    from click.testing import CliRunner

    from adafocus.cli import predict

    paths = [str(p) for p in demo_files[:12]]
    local = CliRunner().invoke(predict, [*paths, "--export", str(calibrated_demo.path), "--out", str(tmp_path / "l")])
    remote = CliRunner().invoke(predict, [*paths, "--server", server.grpc, "--out", str(tmp_path / "r")])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    here, there = ({r["path"]: r for r in map(strict_loads, read_lines(tmp_path / n))} for n in ("l", "r"))
    assert sorted(here) == sorted(there) == sorted(paths)
    for path in paths:
        a, b = here[path], there[path]
        assert a.keys() == b.keys()
        for key in ("class", "class_index", "exit_step", "frames"):
            assert a[key] == b[key], (path, key)
        assert [c["start"] for c in a["cubes"]] == [c["start"] for c in b["cubes"]]
        assert [n for n, _ in a["top_k"]] == [n for n, _ in b["top_k"]]
        np.testing.assert_allclose([p for _, p in a["top_k"]], [p for _, p in b["top_k"]], atol=PROB_TOL)
        assert a["gflops"] == pytest.approx(b["gflops"])
    nowhere = CliRunner().invoke(predict, [paths[0], "--server", "127.0.0.1:1"])
    assert nowhere.exit_code == 1 and "no server answers gRPC at 127.0.0.1:1" in nowhere.output


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def shm_regions() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("triton_python_backend_shm_region_*")}


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text(encoding="utf-8")
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def stub_of(served: Served, instance: str) -> int:
    for pid in children(served.process.pid):  # adafocus serve -> tritonserver -> stubs
        for stub in children(pid):
            args = Path(f"/proc/{stub}/cmdline").read_bytes().split(b"\0")
            if len(args) > 8 and args[8].decode() == instance:
                return stub
    raise AssertionError(f"no process of instance {instance}")


def test_ctrl_c_under_load_answers_everything_and_leaves_nothing(calibrated_demo, demo_frames, tmp_path):
    _, videos = demo_frames
    before = shm_regions()
    # requests wait in the idle loop for company (max queue delay), so they are in flight at Ctrl-C
    served = start_server(calibrated_demo.path, tmp_path, "--batch-size", "64", "--max-queue-delay-ms", "8000")
    results = []
    sender = threading.Thread(
        target=lambda: results.extend(grpc_requests(served, "adafocus", [({"VIDEO": v}, None) for v in videos]))
    )
    sender.start()
    # Ctrl-C once every request is the model's (accepted): sending 24 videos of 1.5 MB can take more
    # than a second on a busy machine, and a request that reaches a stopping server is refused, rightly.
    # (Triton waits for the requests the model holds before it stops the model: the stop takes up to
    # the 8 s queue delay, well inside Triton's exit timeout.)
    deadline = time.monotonic() + 6
    while served.metric("adafocus_queue_length") < VIDEOS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert served.metric("adafocus_answered_total") == 0 and served.metric("adafocus_queue_length") == VIDEOS
    assert served.stop(signal.SIGINT) == 0, served.log.read_text(encoding="utf-8")[-3000:]
    sender.join(60)
    errors = [f"{error.status()}: {error.message()}" for _, error in results if error is not None]
    assert len(results) == VIDEOS and not errors, errors
    assert shm_regions() <= before
    assert "answering the requests in flight first" in served.log.read_text(encoding="utf-8")


def test_ctrl_c_while_starting_stops_at_once_and_leaves_nothing(calibrated_demo, tmp_path):
    """A Ctrl-C during the warm-up stops the server then, not once every model is ready."""
    from adafocus.serve.triton_server import free_port

    before = shm_regions()
    log = tmp_path / "serve.log"
    ports = [arg for flag in ("--http-port", "--grpc-port", "--metrics-port") for arg in (flag, str(free_port()))]
    # a large pool: warming up every batch size up to it keeps the server from being ready for a while
    command = [sys.executable, "-m", "adafocus", "serve", str(calibrated_demo.path), *ports, "--batch-size", "64"]
    env = {**os.environ, "ADAFOCUS_CACHE": str(tmp_path / "cache")}
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while "starting tritonserver" not in log.read_text(encoding="utf-8") and time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(encoding="utf-8")
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    assert process.wait(120) == 0, log.read_text(encoding="utf-8")[-3000:]
    text = log.read_text(encoding="utf-8")
    assert "stopping: asked to before the server was ready" in text
    assert "serving " not in text  # what it prints once ready: it did not wait for that
    assert shm_regions() <= before


def test_a_killed_model_process_fails_only_its_requests_and_stops_the_server(calibrated_demo, demo_frames, tmp_path):
    _, videos = demo_frames
    before = shm_regions()
    served = start_server(
        calibrated_demo.path,
        tmp_path,
        "--instances",
        "2",
        "--batch-size",
        "64",
        "--max-queue-delay-ms",
        "4000",
        "--exit-timeout-s",
        "5",
    )
    # Triton spreads requests over the instances of a model
    warm = grpc_requests(served, "adafocus", [({"VIDEO": videos[i]}, None) for i in range(16)])
    assert all(error is None for _, error in warm)
    time.sleep(1.2)
    per_instance = [served.metric("adafocus_answered_total", instance=f"adafocus_0_{i}") for i in (0, 1)]
    assert sum(per_instance) == 16 and min(per_instance) > 0, per_instance
    victim = stub_of(served, "adafocus_0_0")
    decoders = children(victim)
    assert decoders, "each instance runs its decoder processes"
    results = []
    sender = threading.Thread(
        target=lambda: results.extend(
            grpc_requests(served, "adafocus", [({"VIDEO": v}, None) for v in videos[:16]], timeout=90)
        )
    )
    sender.start()
    time.sleep(1.0)
    assert served.metric("adafocus_answered_total") == 16  # the new requests are in flight, none answered yet
    os.kill(victim, signal.SIGKILL)
    code = served.process.wait(120)
    sender.join(120)
    log = served.log.read_text(encoding="utf-8")
    assert code == 1 and "model instance adafocus_0_0 died" in log and "Triton does not restart it" in log
    # every request got exactly one answer (grpc_requests checks), none by the client's deadline (90 s): a
    # result from the live instance, or for those the dead one held, the closed connection of the server
    # killed once its exit timeout (5 s) had passed (tritonserver waits for those calls: EXIT_GRACE_S)
    assert len(results) == 16
    lost = [error for _, error in results if error is not None]
    statuses = [f"{e.status()}: {e.message()}" for e in lost]
    assert 0 < len(lost) < len(results), statuses
    assert all(e.status() in ("StatusCode.UNAVAILABLE", "StatusCode.INTERNAL") for e in lost), statuses
    time.sleep(0.5)
    assert not [pid for pid in decoders if Path(f"/proc/{pid}").exists()], "a decoder process was left behind"
    assert shm_regions() <= before


def test_an_exported_repository_carries_its_export_and_serves_where_it_is_moved(calibrated_demo, demo_frames, tmp_path):
    from click.testing import CliRunner

    from adafocus.cli import export
    from adafocus.serve.triton_server import TritonServer

    written = CliRunner().invoke(export, ["--into", str(calibrated_demo.path), "--triton-repo", str(tmp_path / "repo")])
    assert written.exit_code == 0, written.output
    moved = tmp_path / "elsewhere" / "models"  # relative paths inside: the folder works wherever it is mounted
    moved.parent.mkdir()
    (tmp_path / "repo").rename(moved)
    assert sorted(p.name for p in moved.iterdir()) == ["adafocus", "adafocus_per_batch"]
    _, videos = demo_frames
    reference = Runtime.load(calibrated_demo.path).predict(videos[:4])
    with TritonServer(moved, log_file=tmp_path / "server.log") as server:
        served = Served(server.process, server.url.removeprefix("http://"), f"127.0.0.1:{server.grpc_port}", "", Path())
        answers = grpc_requests(served, "adafocus", [({"VIDEO": v}, None) for v in videos[:4]])
    assert [int(r.as_numpy("CLASS_INDEX")[0]) for r, _ in answers] == reference.prediction.tolist()


def test_serve_refuses_a_latency_target_without_calibration_before_starting(exported):
    done = subprocess.run(
        [sys.executable, "-m", "adafocus", "serve", str(exported("demo").path), "--latency-slo-ms", "50"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "needs a calibrated export" in done.stderr and "run adafocus-calibrate" in done.stderr


def test_a_uni_adafocus_export_serves_its_patches(exported, tmp_path):
    """The published-weights family through the same server: PATCH_FRAMES and PATCH_BOXES equal
    Runtime.predict's plan, and adafocus-predict --server writes the local engine's "patches"."""
    from click.testing import CliRunner

    from adafocus.cli import predict

    export = exported("uni-small")
    p = export.preset
    generator = np.random.default_rng(4)
    frames = generator.integers(0, 256, (6, p.num_frames, 3, p.frame_size, p.frame_size), dtype=np.uint8)
    videos = np.stack([to_model_input(f).numpy() for f in frames])
    expected = Runtime.load(export.path).predict(videos)
    files = []
    for i, clip in enumerate(frames):
        files.append(tmp_path / f"uni-{i}.mkv")
        write_lossless(files[-1], clip.transpose(0, 2, 3, 1))
    served = start_server(export.path, tmp_path, "--batch-size", "4")
    try:
        answers = grpc_requests(served, "adafocus", [({"FRAMES": f}, None) for f in frames])
        for row, (result, error) in enumerate(answers):
            assert error is None, error
            used = int(result.as_numpy("EXIT_STEP")[0])
            assert used == expected.exit_step[row] == p.max_cubes  # uncalibrated: every patch is used
            assert result.as_numpy("PATCH_FRAMES").tolist() == expected.cube_starts[row, :, 2].tolist()
            np.testing.assert_allclose(result.as_numpy("PATCH_BOXES"), expected.centres[row], atol=1e-4, rtol=0)
            np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), expected.probs[row], atol=PROB_TOL, rtol=0)
            assert result.as_numpy("CUBE_STARTS") is None  # this family answers patches, not cubes
        paths = [str(f) for f in files]
        local = CliRunner().invoke(predict, [*paths, "--export", str(export.path), "--out", str(tmp_path / "l")])
        remote = CliRunner().invoke(predict, [*paths, "--server", served.grpc, "--out", str(tmp_path / "r")])
        assert local.exit_code == 0 and remote.exit_code == 0, remote.output
        here, there = ({r["path"]: r for r in map(strict_loads, read_lines(tmp_path / n))} for n in ("l", "r"))
        for path in paths:
            assert "cubes" not in here[path] and here[path].keys() == there[path].keys()
            assert [x["frame"] for x in here[path]["patches"]] == [x["frame"] for x in there[path]["patches"]]
            np.testing.assert_allclose(
                [x["box"] for x in here[path]["patches"]], [x["box"] for x in there[path]["patches"]], atol=1e-4
            )
    finally:
        assert served.stop() == 0, served.log.read_text(encoding="utf-8")[-3000:]


def test_a_video_the_model_gives_nan_fails_alone_with_a_500(calibrated_demo, demo_files, tmp_path):
    """A broken export gives one video NaN logits: in both modes that request alone is answered
    INTERNAL (the engine's fault, not the request's) naming it, the requests around it get their
    results, and adafocus-predict --server writes that video's error line and goes on."""
    import shutil

    from click.testing import CliRunner

    from adafocus.cli import predict
    from test_predict import poison_glance, write_white_video

    poisoned = shutil.copytree(calibrated_demo.path, tmp_path / "poisoned")
    poison_glance(poisoned, level=2.2)
    white = tmp_path / "white.mp4"
    write_white_video(white)
    files = [demo_files[0], white, demo_files[1]]
    served = start_server(poisoned, tmp_path, "--batch-size", "4")
    try:
        for model in ("adafocus", "adafocus_per_batch"):
            batch = (lambda a: a[None]) if model == "adafocus_per_batch" else (lambda a: a)
            answers = grpc_requests(served, model, [({"VIDEO_FILE": batch(file_input(f))}, None) for f in files])
            (_, good_error), (_, nan_error), (_, other_error) = answers
            assert good_error is None and other_error is None, (model, good_error, other_error)
            assert nan_error.status() == "StatusCode.INTERNAL", (model, nan_error)
            assert "the model gave non-finite logits (NaN)" in nan_error.message(), nan_error.message()
        out = tmp_path / "remote.jsonl"
        remote = CliRunner().invoke(predict, [*map(str, files), "--server", served.grpc, "--out", str(out)])
        assert remote.exit_code == 0, remote.output
        lines = {r["path"]: r for r in map(strict_loads, read_lines(out))}
        assert "non-finite logits" in lines[str(white)]["error"]
        assert all("class" in lines[str(f)] for f in (demo_files[0], demo_files[1]))
    finally:
        assert served.stop() == 0, served.log.read_text(encoding="utf-8")[-3000:]
