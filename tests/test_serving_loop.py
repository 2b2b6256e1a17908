"""The serving loop without Triton: concurrent submitters, per-request budgets, bad input, refusals,
shutdown and failure, each against `Runtime.predict` on the same export (adafocus.serve.loop)."""

import dataclasses
import importlib
import importlib.util
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from adafocus.data.synthetic import SyntheticTask
from adafocus.data.video import write_lossless
from adafocus.errors import AdaFocusError, InternalError
from adafocus.model.presets import get_preset
from adafocus.runtime import Runtime
from adafocus.runtime.backends import make_backend
from adafocus.serve.budgets import Budgets, LatencyTarget
from adafocus.serve.decoders import DecoderPool
from adafocus.serve.loop import Overloaded, ServingLoop, Unavailable
from adafocus.serve.service import ServeOptions, Service, failure_kind
from conftest import clear_front, near_thresholds

PROB_TOL = 1e-5


@pytest.fixture(scope="module")
def videos(calibrated_demo):
    return SyntheticTask(calibrated_demo.preset, seed=0).batch("test", range(96))[0].numpy()


def assert_matches(served, reference, rows, skip):
    """Served results equal `reference` (a BatchResult) at `rows`, except where `skip` says a video
    sits on a threshold; returns how many were compared."""
    compared = 0
    for got, row in zip(served, rows):
        assert got.result.ok, got.result.error
        if skip[row]:
            continue
        assert got.result.exit_step == reference.exit_step[row], row
        assert got.result.prediction == reference.prediction[row], row
        np.testing.assert_allclose(got.result.probs, reference.probs[row], atol=PROB_TOL, rtol=0)
        used = got.result.exit_step
        np.testing.assert_array_equal(got.result.cube_starts[:used], reference.cube_starts[row, :used])
        compared += 1
    return compared


def test_concurrent_submitters_get_what_predict_gives(calibrated_demo, videos):
    runtime = Runtime.load(calibrated_demo.path)
    reference = runtime.predict(videos)
    skip = near_thresholds(runtime, videos, runtime.thresholds)
    loop = ServingLoop(Runtime.load(calibrated_demo.path), batch_size=16)
    submitters, futures, submitter_of = 4, {}, {}
    start = threading.Barrier(submitters)

    def submit(first):  # a client sending every 4th video, a little apart, as independent requests come
        start.wait()
        for row in range(first, len(videos), submitters):
            futures[row] = loop.submit(videos[row])
            submitter_of[row] = first
            time.sleep(0.001)

    with ThreadPoolExecutor(submitters) as pool:
        list(pool.map(submit, range(submitters)))
    served = [futures[row].result(timeout=60) for row in range(len(videos))]
    loop.close(timeout=30)
    assert assert_matches(served, reference, range(len(videos)), skip) >= 0.9 * len(videos)
    # admissions interleaved: in the order the loop admitted them, the submitting thread changes often
    admitted = sorted(range(len(videos)), key=lambda row: served[row].result.index)
    threads = [submitter_of[row] for row in admitted]
    assert len(set(threads)) > 1
    assert sum(a != b for a, b in zip(threads, threads[1:])) >= len(set(threads))
    assert loop.runtime.stats.turns < sum(s.result.exit_step for s in served)  # videos shared turns


def test_budgets_of_one_batch_equal_separate_predicts(calibrated_demo, videos):
    runtime = Runtime.load(calibrated_demo.path)
    budgets = Budgets(calibrated_demo, runtime.thresholds)
    front = clear_front(runtime, videos, budgets)
    cheap, dear = front[len(front) // 4], front[-1]
    asked = [cheap.gflops if row % 3 == 0 else (dear.gflops if row % 3 == 1 else None) for row in range(len(videos))]
    points = [budgets.resolve(b) for b in asked]
    thresholds = np.stack([p.thresholds for p in points])
    skip = near_thresholds(runtime, videos, thresholds)
    loop = ServingLoop(Runtime.load(calibrated_demo.path), batch_size=32, max_queue_delay_ms=2000)
    futures = [loop.submit(videos[row], budget_gflops=asked[row]) for row in range(len(videos))]
    served = [f.result(timeout=60) for f in futures]
    loop.close(timeout=30)
    for point in {cheap.gflops, dear.gflops, budgets.default.gflops}:  # each group predicted on its own
        rows = [row for row in range(len(videos)) if points[row].gflops == point]
        reference = runtime.predict(videos[rows], thresholds=thresholds[rows[0]])
        local_skip = skip[rows]
        assert assert_matches([served[r] for r in rows], reference, range(len(rows)), local_skip) >= 0.8 * len(rows)
        assert all(served[r].budget_gflops == point for r in rows)
    assert loop.runtime.stats.mixed_threshold_turns > 0  # rows of different budgets shared graph calls
    # the same answers from one per-batch predict with a row of thresholds per video
    per_row = runtime.predict(videos, thresholds=thresholds)
    assert assert_matches(served, per_row, range(len(videos)), skip) >= 0.9 * len(videos)


def test_bad_requests_are_refused_or_answered_alone(calibrated_demo, videos):
    loop = ServingLoop(Runtime.load(calibrated_demo.path), batch_size=8, max_queue_delay_ms=500)
    cheapest = Budgets(calibrated_demo, loop.runtime.thresholds).cheapest.gflops
    with pytest.raises(AdaFocusError, match=rf"(?s)cheapest is {cheapest:.4f}.*ask for at least"):
        loop.submit(videos[0], budget_gflops=cheapest / 2)
    with pytest.raises(AdaFocusError, match=r"(?s)shape \(1, 4, 3, 128, 128\).*takes \(B, 8, 3, 128, 128\)"):
        loop.submit(videos[0][:4])
    with pytest.raises(AdaFocusError, match="dtype float64"):
        loop.submit(videos[0].astype(np.float64))
    bad = videos[1].copy()
    bad[3, 1, 5, 7] = np.inf
    first = loop.submit(videos[0])
    with pytest.raises(AdaFocusError, match="(?s)the upload holds NaN or inf values.*normalisation"):
        loop.submit(bad, name="the upload")
    served = [f.result(timeout=60) for f in (first, loop.submit(videos[2]))]
    assert all(s.result.ok for s in served)
    counters = loop.counters()
    assert counters.refused["bad_request"] == 4 and counters.failed == 0 and counters.answered == 2
    loop.close(timeout=30)


def test_a_full_queue_refuses_and_close_answers_what_it_accepted(calibrated_demo, videos):
    # a long max_queue_delay keeps the idle loop waiting for company, so the queue fills
    loop = ServingLoop(Runtime.load(calibrated_demo.path), batch_size=64, max_queue=8, max_queue_delay_ms=3000)
    accepted = [loop.submit(videos[row]) for row in range(8)]
    with pytest.raises(Overloaded, match=r"(?s)overloaded: 8 requests are queued.*retry later"):
        loop.submit(videos[8])
    loop.close(timeout=30)  # closing ends the wait: everything accepted is answered
    assert all(f.result(timeout=0).result.ok for f in accepted)
    with pytest.raises(Unavailable):
        loop.submit(videos[0])
    assert loop.counters().refused == {"overloaded": 1, "bad_request": 0, "unavailable": 1}


def test_under_overload_a_request_is_refused_before_its_file_is_decoded(calibrated_demo, videos):
    """A server that cannot take a request spends nothing on it: a corrupt file sent to a full queue is
    refused as overloaded (retryable), not decoded and refused as a bad file; with room, the same file
    reaches the decoder and gets its own error."""
    options = ServeOptions(
        export=str(calibrated_demo.path), batch_size=8, max_queue=2, max_queue_delay_ms=3000, decoders=1
    )
    service = Service(options, "continuous", log=lambda line: None)
    corrupt = {"VIDEO_FILE": np.array([b"not a video" * 100], np.object_)}
    answers: dict[str, list] = {"good": [], "full": [], "room": []}
    try:
        for row in range(2):  # the idle loop waits for company (max_queue_delay_ms), so the queue fills
            service.submit({"VIDEO": videos[row]}, {}, answers["good"].append)
        service.submit(corrupt, {}, answers["full"].append)
        assert len(answers["full"]) == 1, "refused before submit returned"
        assert isinstance(answers["full"][0], Overloaded) and failure_kind(answers["full"][0]) == "unavailable"
        assert service.loop.counters().refused["overloaded"] == 1
        deadline = time.monotonic() + 60
        while len(answers["good"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [type(a) for a in answers["good"]] == [dict, dict]
        service.submit(corrupt, {}, answers["room"].append)  # the queue has room again
        while not answers["room"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert isinstance(answers["room"][0], AdaFocusError) and failure_kind(answers["room"][0]) == "bad_request"
        assert service.loop.counters().refused["overloaded"] == 1
    finally:
        service.close()


def test_a_failing_loop_answers_every_request_with_its_error(calibrated_demo, videos):
    runtime = Runtime.load(calibrated_demo.path)
    loop = ServingLoop(runtime, batch_size=8, max_queue_delay_ms=1000)
    for sessions in (runtime.backend.sessions, runtime.backend.part_sessions):  # the local network's engine
        if "local" in sessions:  # is gone: its first call fails, in the loop's thread
            sessions["local"] = None
    futures = [loop.submit(videos[row]) for row in range(16)]
    outcomes = []
    for f in futures:
        try:
            outcomes.append(f.result(timeout=60).result.exit_step == 0)
        except InternalError as e:  # the engine's failure, as the cause of an internal error (HTTP 500)
            outcomes.append(type(e.__cause__).__name__)
    assert "AttributeError" in outcomes  # the videos that needed a cube got the failure
    assert all(o is True or o == "AttributeError" for o in outcomes)
    loop.close(timeout=30)
    with pytest.raises(Unavailable, match="stopped"):
        loop.submit(videos[0])


def test_the_latency_target_moves_along_the_front_and_refuses_only_at_its_end(calibrated_demo):
    front = Budgets(calibrated_demo, Runtime.load(calibrated_demo.path).thresholds).front
    target = LatencyTarget(front, 0.100, high=0.5, low=0.25)
    top = len(front) - 1
    assert target.cap() == front[top].gflops and target.accepts(1000)  # nothing measured: no cap, no refusal

    def answer(latency_s, count=LatencyTarget.STEP_AFTER):
        for _ in range(count):
            target.answered(latency_s, 0.0, 0.0, cap_steps=target.steps)

    answer(0.100)  # the tail at 2x high * target: down by log2(2) x len(front) / 4 points
    assert target.cap() == front[top - max(1, round(len(front) / 4))].gflops
    level = target.level
    answer(0.100, LatencyTarget.STEP_AFTER - 1)  # not yet enough answers admitted under the new cap
    assert target.level == level and target.cap() == front[level].gflops
    answer(0.010, LatencyTarget.WINDOW)  # far below low * target: back up, half as fast as down
    room = 0.025 / (0.010 * front[level + 1].gflops / front[level].gflops)
    assert room > 1 and target.cap() == front[level + max(1, round(len(front) * math.log2(room) / 8))].gflops
    level = target.level
    # a queue older than high * target / 2 that built up since the latest move: down now, once
    now = time.perf_counter() + 1
    assert target.cap(waited_s=0.030, now=now) == front[level - 1].gflops
    assert target.cap(waited_s=0.031, now=now + 0.001) == front[level - 1].gflops  # the same queue: no second step
    assert target.cap(waited_s=0.030, now=now + 0.031) == front[level - 2].gflops  # one that came after: down
    # refusals: only at the cheapest point, by Little's law on answers per busy second
    target = LatencyTarget(front, 0.100, high=0.5, low=0.25)
    target.level = 0
    for i in range(11):  # 10 answers in 2 s of which 1 s idle: 10 answers per busy second
        target.answered(0.010, 0.2 * i, 0.1 * i, cap_steps=target.steps)
    target.unloaded(0.005)
    assert target.answer_rate() == pytest.approx(10.0)
    # ahead videos wait ahead / 10 s, plus the 5 ms floor; the limit is 50 ms
    assert target.accepts(0) and not target.accepts(1) and target.predicted_s(1) == pytest.approx(0.105)
    fresh = LatencyTarget(front, 0.100, high=0.5, low=0.25)  # no rate known yet: the queue's age decides
    fresh.level = 0
    assert fresh.accepts(5, waited_s=0.020) and not fresh.accepts(5, waited_s=0.030)
    target.level = 1
    assert target.accepts(1000)  # a cheaper point is left: lower the budget rather than refuse
    capped = Budgets(calibrated_demo, front[-1].thresholds)
    assert capped.capped(front[-1], front[1].gflops).gflops == front[1].gflops
    assert capped.capped(front[1], front[-1].gflops).gflops == front[1].gflops  # a cap never raises a budget


def test_a_latency_target_lowers_budgets_under_a_burst_and_never_raises_them(calibrated_demo, videos):
    runtime = Runtime.load(calibrated_demo.path)
    default = Budgets(calibrated_demo, runtime.thresholds).default.gflops
    # 1 ms cannot be met for a burst of 96 videos on any CPU: the cap must step down the front
    loop = ServingLoop(runtime, batch_size=16, latency_slo_ms=1.0)
    outcomes = []
    for video in videos:
        try:
            outcomes.append(loop.submit(video))
        except Overloaded:
            outcomes.append(None)
    served = [f.result(timeout=60) for f in outcomes if f is not None]
    loop.close(timeout=30)
    budgets = [s.budget_gflops for s in served]
    assert all(s.result.ok for s in served) and len(served) >= 16
    assert max(budgets) <= default and min(budgets) < default
    assert loop.counters().budget_in_force < default


def test_the_dense_model_serves_with_the_backend_its_warm_up_ran_at_every_size(calibrated_demo, videos):
    """The warm-up runs every batch size a model will see on the very backend that then serves (a new
    backend per size, as before this test, threw the smaller sizes' warm-up away); a Triton batch's
    videos get the dense graph's answers, a NaN video its own error."""
    options = ServeOptions(export=str(calibrated_demo.path), batch_size=4, decoders=0)
    service = Service(options, "dense", log=lambda line: None)
    backend, run, sizes = service.dense, service.dense.run, []

    def recording(graph, feeds):
        sizes.append(int(feeds["videos"].shape[0]))
        return run(graph, feeds)

    backend.run = recording
    service._warm_up()
    assert service.dense is backend and sizes == [1, 1, 2, 2, 4, 4]

    bad = videos[2].copy()
    bad[0, 0, 0, 0] = np.nan
    outcomes = service.run_batch([({"VIDEO": videos[0]}, {}), ({"VIDEO": bad}, {}), ({"VIDEO": videos[1]}, {})])
    assert isinstance(outcomes[1], AdaFocusError) and "NaN" in str(outcomes[1])
    reference = make_backend(calibrated_demo, "onnxruntime", graphs=("dense",))
    logits = reference.run("dense", {"videos": reference.videos(videos[:2])})["logits"]
    for outcome, row in zip((outcomes[0], outcomes[2]), np.asarray(logits)):
        probabilities = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        np.testing.assert_allclose(outcome["PROBABILITIES"], probabilities, atol=PROB_TOL)
        assert outcome["CLASS_INDEX"][0] == np.argmax(row)
    assert sizes[6:] == [2]  # the two good videos in one graph call


class _FailsOnce:
    """An engine session whose first call fails (a transient fault, such as CUDA running out of
    memory), then runs the real session."""

    def __init__(self, real):
        self.real, self.failed = real, False

    def run(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("transient engine error")
        return self.real.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_an_engine_failure_answers_the_requests_it_held_and_the_loop_serves_on(calibrated_demo, videos):
    runtime = Runtime.load(calibrated_demo.path)
    for sessions in (runtime.backend.sessions, runtime.backend.part_sessions):
        if "glance" in sessions:
            sessions["glance"] = _FailsOnce(sessions["glance"])
    # the idle loop waits for a pool's worth (8), and admits it as one chunk: all 8 are held by the
    # stream whose glance fails
    loop = ServingLoop(runtime, batch_size=8, max_queue_delay_ms=60_000)
    calls: list[int] = []
    held = [loop.submit(videos[row], on_done=lambda f, row=row: calls.append(row)) for row in range(8)]
    for future in held:
        with pytest.raises(InternalError, match="the engine failed while serving this request.*transient"):
            future.result(timeout=60)
        assert failure_kind(future.exception()) == "internal"
    later = [loop.submit(videos[row], on_done=lambda f, row=row: calls.append(row)) for row in range(8, 16)]
    assert all(f.result(timeout=60).result.ok for f in later)  # a new stream serves them
    assert loop.alive
    counters = loop.counters()
    assert counters.answered == 16 and counters.failed == 8
    loop.close(timeout=30)
    assert sorted(calls) == list(range(16))  # every request answered exactly once


@pytest.fixture
def triton_model(monkeypatch):
    """adafocus.serve.triton_model over the [serve] wheel's own triton_python_backend_utils, with
    stand-ins for what Triton's stub adds to that module when it runs a model (tensors, responses,
    errors): what the model answers is recorded, as the stub would carry it to the server."""
    try:
        import pytriton
    except ImportError:
        pytest.skip("the [serve] extra (nvidia-pytriton) is not installed: pip install -e '.[serve]'")
    path = Path(pytriton.__file__).parent / "tritonserver" / "backends" / "python" / "triton_python_backend_utils.py"
    spec = importlib.util.spec_from_file_location("triton_python_backend_utils", path)
    pb_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb_utils)

    class Tensor:
        def __init__(self, name, value):
            self._name, self._value = name, value

        def name(self):
            return self._name

        def as_numpy(self):
            return self._value

    class TritonError:
        INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"

        def __init__(self, message, code):
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors, error

    pb_utils.Tensor, pb_utils.TritonError, pb_utils.InferenceResponse = Tensor, TritonError, InferenceResponse
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    monkeypatch.delitem(sys.modules, "adafocus.serve.triton_model", raising=False)
    return importlib.import_module("adafocus.serve.triton_model")


class _Sender:
    """A request's response sender; `fails` sends raise (the stub's "Unable to send response")."""

    def __init__(self, fails=0):
        self.fails, self.sent = fails, []

    def send(self, response, flags):
        if self.fails:
            self.fails -= 1
            raise RuntimeError("Unable to send response")
        self.sent.append((response, flags))


def test_the_responder_answers_on_after_a_response_it_could_not_send(triton_model):
    model = triton_model.TritonPythonModel()
    model.name = "adafocus_0"
    model._answers = triton_model.queue.SimpleQueue()
    model._responder = threading.Thread(target=model._respond)
    model._responder.start()
    once, always, next_one = _Sender(fails=1), _Sender(fails=2), _Sender()
    outputs = {"CLASS_INDEX": np.array([1], np.int64)}
    for sender in (once, always, next_one):
        model._answers.put((sender, outputs))
    model._answers.put(None)
    model._responder.join(timeout=60)
    assert not model._responder.is_alive()
    final = triton_model.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    [(error, flags)] = once.sent  # its answer could not be sent: the error that said so was, and final
    assert flags == final and error.error.code == "INTERNAL" and "Unable to send response" in error.error.message
    assert always.sent == []  # nothing could reach that client, and the responder went on
    [(answer, flags)] = next_one.sent
    assert flags == final and answer.error is None and answer.output_tensors[0].name() == "CLASS_INDEX"


def test_a_batched_request_without_inputs_is_a_bad_request(triton_model, calibrated_demo, videos):
    class Request:
        def __init__(self, *tensors):
            self.tensors = list(tensors)

        def inputs(self):
            return self.tensors

        def parameters(self):
            return ""

    model = triton_model.TritonPythonModel()
    model.batched = True
    model.service = Service(
        ServeOptions(export=str(calibrated_demo.path), batch_size=2, decoders=0), "per_batch", log=lambda line: None
    )
    empty, good = Request(), Request(triton_model.pb_utils.Tensor("VIDEO", videos[:1]))
    responses = model.execute([empty, good])
    assert responses[0].error.code == "INVALID_ARG"  # HTTP 400, as the error table says
    assert "a request carries none of FRAMES, VIDEO, VIDEO_FILE" in responses[0].error.message
    assert "send exactly one" in responses[0].error.message
    assert responses[1].error is None


class _AdmissionLog(ServingLoop):
    """A serving loop that notes, at each admission, how many videos were running already and how
    long the first admitted (the oldest queued) had been in the queue."""

    def __init__(self, *args, **kwargs):
        self.admissions: list[tuple[int, float]] = []
        super().__init__(*args, **kwargs)

    def _thresholds_of(self, indices):
        now = time.perf_counter()
        with self._cond:
            oldest = self._admitted[int(indices[0])]
            self.admissions.append((len(self._admitted) - len(indices), now - oldest.queued))
        return super()._thresholds_of(indices)


@pytest.mark.parametrize("admit_wait_ms", [math.inf, 300.0])
def test_a_busy_loop_admits_only_when_drained_or_after_admit_wait(calibrated_demo, videos, admit_wait_ms):
    # the idle loop waits for a pool's worth, and the rest queue up behind it while it runs
    loop = _AdmissionLog(
        Runtime.load(calibrated_demo.path), batch_size=8, admit_wait_ms=admit_wait_ms, max_queue_delay_ms=2000
    )
    futures = [loop.submit(video) for video in videos[:40]]
    assert all(f.result(timeout=120).result.ok for f in futures)
    loop.close(timeout=30)
    assert len(loop.admissions) > 1
    for running, waited in loop.admissions:
        if math.isinf(admit_wait_ms):
            assert running == 0  # inf: only into a drained pool
        elif running:
            assert waited >= admit_wait_ms / 1000  # into a running pool only once the oldest waited that long


def test_after_a_step_the_latency_target_judges_only_what_was_admitted_under_the_new_cap(calibrated_demo):
    front = Budgets(calibrated_demo, Runtime.load(calibrated_demo.path).thresholds).front
    target = LatencyTarget(front, 0.100)
    for _ in range(LatencyTarget.WINDOW):  # a burst: every latency far above 0.55 x target
        target.answered(0.080, 0.0, 0.0, cap_steps=target.steps)
    target.cap()
    stepped, before = target.level, target.steps - 1
    assert stepped < len(front) - 1
    for _ in range(2 * LatencyTarget.STEP_AFTER):  # the burst's last requests, admitted before the step
        target.answered(0.080, 0.0, 0.0, cap_steps=before)
    assert target.cap() == front[stepped].gflops  # they do not judge the new cap
    for _ in range(LatencyTarget.STEP_AFTER):  # the new cap's own: far below the target
        target.answered(0.010, 0.0, 0.0, cap_steps=target.steps)
    target.cap()
    assert target.level > stepped  # back up at once, not down again on the burst's latencies


def _write_video_file(folder: Path, preset) -> Path:
    task = SyntheticTask(preset, seed=0)
    frames = np.rint(task.raw_video("test", 0)[0] * 255).astype(np.uint8)
    path = folder / "video.mkv"
    write_lossless(path, frames.transpose(0, 2, 3, 1))
    return path


def test_files_being_decoded_count_toward_max_queue(calibrated_demo, tmp_path):
    upload = {"VIDEO_FILE": np.array([_write_video_file(tmp_path, calibrated_demo.preset).read_bytes()], np.object_)}
    # the idle loop waits for a pool's worth (until close), so no accepted request leaves the queue
    options = ServeOptions(
        export=str(calibrated_demo.path), batch_size=8, max_queue=2, max_queue_delay_ms=60_000, decoders=1
    )
    service = Service(options, "continuous", log=lambda line: None)
    answers: list = []
    try:
        for _ in range(10):  # far faster than one decoder decodes them
            service.submit(upload, {}, answers.append)
        assert len(answers) == 8 and all(isinstance(a, Overloaded) for a in answers)
        assert "2 requests are queued" in str(answers[0])
        assert service.metrics()["queue_length"] == 2  # decoding or queued: both wait
        assert service.loop.counters().refused["overloaded"] == 8
    finally:
        service.close()  # ends the wait: the two accepted are answered
    assert len(answers) == 10 and all(isinstance(a, dict) for a in answers[8:])
    assert service.metrics()["queue_length"] == 0


def test_a_files_decoding_time_is_no_time_in_the_queue(calibrated_demo, videos):
    # a latency target at its cheapest point refuses a request behind a queue older than
    # 0.55 x 1000 ms / 2; the first request's file took 2 s to decode, but it has just been queued
    loop = ServingLoop(Runtime.load(calibrated_demo.path), batch_size=8, latency_slo_ms=1000, max_queue_delay_ms=60_000)
    loop.target.level = 0
    decoded = loop.submit(videos[0], received=time.perf_counter() - 2.0, name="VIDEO_FILE")
    second = loop.submit(videos[1])  # accepted: the queue is fresh
    loop.close(timeout=30)
    served = [decoded.result(timeout=0), second.result(timeout=0)]
    assert all(s.result.ok for s in served)
    assert served[0].queued_s >= 2.0  # its latency still counts from when it was received
    assert loop.counters().refused["overloaded"] == 0


def test_requests_refused_before_the_loop_are_counted(calibrated_demo, videos):
    options = ServeOptions(export=str(calibrated_demo.path), batch_size=2, decoders=1, max_file_mib=0.001)
    service = Service(options, "continuous", log=lambda line: None)
    answers: list = []
    video = videos[0]
    nan = video.copy()
    nan[0, 0, 0, 0] = np.nan
    requests = [
        ({"VIDEO": video}, {"budget_gflops": 1e-6}),  # below the cheapest budget
        ({"VIDEO": video, "FRAMES": video.astype(np.uint8)}, {}),  # two inputs
        ({}, {}),  # none
        ({"VIDEO": video.astype(np.float64)}, {}),  # the wrong dtype
        ({"VIDEO": video[:4]}, {}),  # the wrong shape
        ({"VIDEO_FILE": np.array([b"x" * 2000], np.object_)}, {}),  # over --max-file-mib
        ({"VIDEO_FILE": np.array([b"not a video" * 50], np.object_)}, {}),  # does not decode
        ({"VIDEO": nan}, {}),  # NaN (refused by the loop's own check)
    ]
    try:
        for inputs, parameters in requests:
            service.submit(inputs, parameters, answers.append)
        deadline = time.monotonic() + 60
        while len(answers) < len(requests) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(answers) == len(requests)
        assert all(failure_kind(a) == "bad_request" for a in answers)
        assert service.metrics()["refused"]["bad_request"] == len(requests)
    finally:
        service.close()
    service = Service(dataclasses.replace(options, decoders=0), "continuous", log=lambda line: None)
    try:
        service.submit({"VIDEO_FILE": np.array([b"x"], np.object_)}, {}, answers.append)  # no decoders here
        assert failure_kind(answers[-1]) == "bad_request" and service.metrics()["refused"]["bad_request"] == 1
    finally:
        service.close()


@pytest.mark.parametrize("option", ["budget", "latency_slo_ms", "max_queue_delay_ms", "admit_wait_ms", "max_file_mib"])
def test_non_finite_options_are_refused_naming_the_option(calibrated_demo, option):
    flag = "--" + option.replace("_", "-")
    for value in (math.nan, -math.inf) + (() if option == "admit_wait_ms" else (math.inf,)):
        with pytest.raises(AdaFocusError, match=rf"{flag} is {value}, not a finite number"):
            ServeOptions(export=str(calibrated_demo.path), **{option: value})
    if option == "admit_wait_ms":
        assert ServeOptions(export=str(calibrated_demo.path), admit_wait_ms=math.inf).admit_wait_ms == math.inf
    from adafocus.cli.serve import serve

    result = CliRunner().invoke(serve, [str(calibrated_demo.path), flag, "nan"])  # refused before any server starts
    assert result.exit_code != 0 and not isinstance(result.exception, ValueError), result.output
    assert f"{flag} is nan, not a finite number" in result.output


def test_a_decoder_pool_refuses_files_after_close_and_one_that_cannot_start_says_why(calibrated_demo, monkeypatch):
    pool = DecoderPool(calibrated_demo.preset, 1)
    pool.close()
    with pytest.raises(Unavailable, match="decoders are shut down"):
        pool.submit(b"some bytes").result(timeout=60)
    # a worker that cannot be started: the error, not a constructor that waits for ever
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    raised: list[BaseException] = []

    def start():
        try:
            DecoderPool(calibrated_demo.preset, 2)
        except BaseException as e:  # noqa: BLE001 - checked below
            raised.append(e)

    starting = threading.Thread(target=start, daemon=True)  # daemon: a constructor that hangs is left behind
    starting.start()
    starting.join(120)
    assert not starting.is_alive(), "DecoderPool() still waits for its workers"
    assert isinstance(raised[0], FileNotFoundError) and "/nonexistent/python3" in str(raised[0])


_POOL_CHILD = """
import time
from adafocus.model.presets import get_preset
from adafocus.serve.decoders import DecoderPool
pool = DecoderPool(get_preset("demo"), 1)
print(pool.folder, flush=True)
time.sleep(600)
"""


def _pool_process(temporary: Path) -> tuple[subprocess.Popen, Path]:
    """Another process (a model process of a server) holding a DecoderPool in `temporary`."""
    command = [sys.executable, "-c", _POOL_CHILD]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=os.environ | {"TMPDIR": str(temporary)})
    return process, Path(process.stdout.readline().strip())


def test_the_decode_folder_of_a_killed_pool_is_removed_by_the_next_pool(tmp_path, monkeypatch):
    """A SIGKILLed model process cannot remove its folder (with a client's upload in it): the next
    pool does, and leaves alone a live process's, our own and a name it did not make."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    children = [_pool_process(temporary) for _ in range(2)]
    (killed, killed_folder), (live, live_folder) = children
    try:
        assert killed_folder.parent == temporary and killed_folder.is_dir() and live_folder.is_dir()
        (killed_folder / f"{killed.pid}-1").write_bytes(b"an uploaded video")  # a worker's file mid-decode
        killed.send_signal(signal.SIGKILL)
        killed.wait(60)
        assert killed_folder.is_dir() and any(killed_folder.iterdir()), "precondition: nothing cleaned up"
        monkeypatch.setattr(tempfile, "tempdir", str(temporary))
        pool = DecoderPool(get_preset("demo"), 1)
        try:
            assert not killed_folder.exists(), "the killed process's folder outlived the next pool's start"
            assert live_folder.is_dir() and pool.folder.is_dir()
            assert pool.folder.name.startswith(f"adafocus-decode-{os.getpid()}-")
            # the live process's PID with another start time: a dead owner whose PID was reused
            _, _, pid, started, _ = live_folder.name.split("-")
            reused = temporary / f"adafocus-decode-{pid}-{int(started) + 1}-abcd_123"
            reused.mkdir()
            unknown = temporary / "adafocus-decode-k2j4_x9q"  # an older name, without its owner: kept
            unknown.mkdir()
            again = DecoderPool(get_preset("demo"), 1)
            again.close()
            assert not reused.exists() and not again.folder.exists()
            assert live_folder.is_dir() and unknown.is_dir() and pool.folder.is_dir(), "this process's other pool"
        finally:
            pool.close()
        assert not pool.folder.exists()
    finally:
        for process, _ in children:
            process.kill()
            process.wait(60)
            process.stdout.close()
    assert live_folder.is_dir(), "SIGKILLed too: left for the next pool"


def test_an_on_done_that_raises_is_not_called_again(calibrated_demo, videos):
    options = ServeOptions(export=str(calibrated_demo.path), batch_size=2, decoders=0)
    service = Service(options, "continuous", log=lambda line: None)
    calls: list = []
    answered = threading.Event()

    def on_done(outcome):
        calls.append(outcome)
        answered.set()
        raise RuntimeError("a response sender that fails")

    try:
        service.submit({"VIDEO": videos[0]}, {}, on_done)
        assert answered.wait(60)
    finally:
        service.close()  # the loop answered everything: a second call would have come before this returns
    assert len(calls) == 1 and isinstance(calls[0], dict)
