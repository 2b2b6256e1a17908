"""A graph call larger than `max_call_gflops` or `call_cache_mib` allows is run in parts along the
batch axis: the same results (every graph is row-independent), with bounded memory per call. On the
CPU, ONNX Runtime runs the parts at once (`call_workers`); the tests that count calls set it to 1."""

import threading

import numpy as np
import pytest

from adafocus.data.synthetic import SyntheticTask
from adafocus.errors import AdaFocusError
from adafocus.machine import usable_cores
from adafocus.runtime import Runtime
from adafocus.runtime.backends import make_backend
from adafocus.runtime.backends.base import CPU_CALL_CACHE_MIB, CPU_CALL_GFLOPS


def assert_same_results(a, b):
    """Same exits and cube starts, logits within 1e-5; the thresholds let videos out at several steps."""
    np.testing.assert_array_equal(a.exit_step, b.exit_step)
    np.testing.assert_array_equal(a.cube_starts, b.cube_starts)
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
    assert len(set(a.exit_step.tolist())) >= 2


@pytest.mark.parametrize(
    "backend", [{"backend": "onnxruntime", "call_workers": 1}, {"backend": "pytorch"}], ids=["onnxruntime", "pytorch"]
)
def test_split_calls_give_the_same_results(exported, backend):
    export = exported("demo")
    videos, _ = SyntheticTask(export.preset, seed=0).batch("test", range(24))
    thresholds = [1.9, 1.7, 1.7, 1.7, 1e9]
    whole = Runtime.load(export.path, **backend, max_call_gflops=None, call_cache_mib=None)
    whole.set_thresholds(thresholds)
    # local: 2 cubes a call, glance: 1 video
    split = Runtime.load(export.path, **backend, max_call_gflops=0.05, call_cache_mib=None)
    split.set_thresholds(thresholds)
    assert whole.backend.rows_per_call("local") is None
    assert split.backend.rows_per_call("local") == 2 and split.backend.rows_per_call("glance") == 1
    assert split.backend.rows_per_call("crop") is None  # no multiply-adds: never split
    calls = []
    run = split.backend._run
    split.backend._run = lambda graph, feeds: calls.append(graph) or run(graph, feeds)
    a, b = whole.predict(videos), split.predict(videos)
    assert calls.count("glance") == 24  # one video a call
    assert_same_results(a, b)
    streamed = {r.index: r for r in split.stream(iter(videos), batch_size=8)}
    np.testing.assert_array_equal([streamed[i].exit_step for i in range(24)], a.exit_step)


def test_cache_sized_calls_give_the_same_results(exported):
    export = exported("demo")
    videos, _ = SyntheticTask(export.preset, seed=1).batch("test", range(24))
    thresholds = [1.9, 1.7, 1.7, 1.7, 1e9]
    whole = Runtime.load(export.path, max_call_gflops=None, call_cache_mib=None, call_workers=1)
    cached = Runtime.load(export.path, call_workers=1)  # the CPU's bounds, parts in turn
    for runtime in (whole, cached):
        runtime.set_thresholds(thresholds)
    calls = []
    run = cached.backend._run
    cached.backend._run = lambda graph, feeds: calls.append(graph) or run(graph, feeds)
    a, b = whole.predict(videos), cached.predict(videos)
    assert calls.count("glance") == 3  # 24 videos at 10 a call
    assert_same_results(a, b)


def test_the_cpu_defaults_bound_calls_and_a_bad_limit_is_refused(exported):
    runtime = Runtime.load(exported("demo").path, call_workers=1)
    backend = runtime.backend
    assert (backend.max_call_gflops, backend.call_cache_mib) == (CPU_CALL_GFLOPS, CPU_CALL_CACHE_MIB)
    # the demo's calls are never split for their work at the batches it runs (the bench's largest is 512) ...
    backend.call_cache_mib = None
    assert min(backend.rows_per_call(g) for g in ("glance", "local", "classifier")) > 512
    # ... but for their largest tensors, read from the graphs: the glance's is MobileNetV2x0.5's first
    # expansion (4 frames x 48 channels x 32² float32 = 0.75 MiB a video), the dense graph's the slim
    # ResNet's stem (4 x 32 x 64² = 2 MiB), the local graph's its stem on one 64² cube (0.125 MiB)
    backend.call_cache_mib = CPU_CALL_CACHE_MIB
    rows = {g: backend.rows_per_call(g) for g in ("glance", "local", "classifier", "crop")}
    assert rows == {"glance": 10, "local": 64, "classifier": 8192, "crop": None}
    assert make_backend(exported("demo"), "onnxruntime", graphs=("dense",)).rows_per_call("dense") == 4
    # parts that run at once share the work bound: two workers, half the rows each
    two = Runtime.load(exported("demo").path, call_workers=2, call_cache_mib=None).backend
    assert two.rows_per_call("glance") == int(CPU_CALL_GFLOPS / 2 // backend.specs["glance"].gflops)
    # a graph of which not two rows fit gets parts of one row (a paper preset's video: ran faster)
    backend.call_cache_mib = 1.0
    assert backend.rows_per_call("glance") == 1
    backend.call_cache_mib = 0.1  # not even one row fits: still one
    assert backend.rows_per_call("glance") == 1
    for key in ("max_call_gflops", "call_cache_mib"):
        with pytest.raises(AdaFocusError, match=f"{key} must be positive"):
            Runtime.load(exported("demo").path, **{key: 0})


def test_parts_run_at_once_give_the_same_results(exported):
    """Three workers on any machine (threads may outnumber cores): every part of a split call runs in
    a worker thread on the graph's single-threaded session, with the same results as one call."""
    export = exported("demo")
    videos, _ = SyntheticTask(export.preset, seed=2).batch("test", range(24))
    thresholds = [1.9, 1.7, 1.7, 1.7, 1e9]
    whole = Runtime.load(export.path, max_call_gflops=None, call_cache_mib=None, call_workers=1)
    parallel = Runtime.load(export.path, call_workers=3)
    assert parallel.backend.call_workers == 3 and parallel.backend.describe()["call_workers"] == 3
    assert set(parallel.backend.part_sessions) == {"glance", "policy", "local", "classifier"}  # not the crop
    for runtime in (whole, parallel):
        runtime.set_thresholds(thresholds)
    parts: list[tuple[str, str, int]] = []  # (graph, thread name, rows)
    for graph, session in parallel.backend.part_sessions.items():
        run = session.run

        def counted(names, feeds, run=run, graph=graph):
            parts.append((graph, threading.current_thread().name, len(next(iter(feeds.values())))))
            return run(names, feeds)

        session.run = counted
    a, b = whole.predict(videos), parallel.predict(videos)
    glance = [p for p in parts if p[0] == "glance"]
    # 24 videos at most 10 a part make 3 parts, rounded up to a multiple of the workers: 3 parts of 8
    assert sorted(rows for _, _, rows in glance) == [8, 8, 8]
    assert all(name.startswith("adafocus-part") for _, name, _ in parts)
    assert_same_results(a, b)
    streamed = {r.index: r for r in parallel.stream(iter(videos), batch_size=8)}
    np.testing.assert_array_equal([streamed[i].exit_step for i in range(24)], a.exit_step)
    np.testing.assert_allclose([streamed[i].logits for i in range(24)], a.logits, rtol=0, atol=1e-5)


def test_call_workers_default_and_refusals(exported):
    export = exported("demo")
    assert Runtime.load(export.path).backend.call_workers == usable_cores()
    single = Runtime.load(export.path, threads=1).backend  # one thread: nothing to run at once
    assert single.call_workers == 1 and single.part_sessions == {}
    with pytest.raises(AdaFocusError, match="call_workers must be 1 or more"):
        Runtime.load(export.path, call_workers=0)
    with pytest.raises(AdaFocusError, match="not with io_binding"):
        Runtime.load(export.path, io_binding=True, call_workers=2)
