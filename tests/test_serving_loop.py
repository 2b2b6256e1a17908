"""The serving loop without Triton: concurrent submitters, per-request budgets, bad input, refusals,
shutdown and failure, each against `Runtime.predict` on the same export (adafocus.serve.loop)."""

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from adafocus.data.synthetic import SyntheticTask
from adafocus.errors import AdaFocusError
from adafocus.runtime import Runtime
from adafocus.runtime.backends import make_backend
from adafocus.serve.budgets import Budgets, LatencyTarget
from adafocus.serve.loop import Overloaded, ServingLoop, Unavailable
from adafocus.serve.service import ServeOptions, Service, failure_kind
from conftest import near_thresholds

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
    cheap, dear = budgets.front[len(budgets.front) // 4], budgets.front[-1]
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
        except Exception as e:  # noqa: BLE001 - what the loop's failure was, to be checked below
            outcomes.append(type(e).__name__)
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
