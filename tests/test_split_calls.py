"""A graph call larger than `max_call_gflops` or `call_cache_mib` allows is run in parts along the
batch axis: the same results (every graph is row-independent), with bounded memory per call."""

import numpy as np
import pytest

from adafocus.data.synthetic import SyntheticTask
from adafocus.errors import AdaFocusError
from adafocus.runtime import Runtime
from adafocus.runtime.backends import make_backend
from adafocus.runtime.backends.base import CPU_CALL_CACHE_MIB, CPU_CALL_GFLOPS


@pytest.mark.parametrize(
    "backend", [{"backend": "onnxruntime"}, {"backend": "pytorch"}], ids=["onnxruntime", "pytorch"]
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
    np.testing.assert_array_equal(a.exit_step, b.exit_step)
    np.testing.assert_array_equal(a.cube_starts, b.cube_starts)
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
    assert len(set(a.exit_step.tolist())) >= 2
    streamed = {r.index: r for r in split.stream(iter(videos), batch_size=8)}
    np.testing.assert_array_equal([streamed[i].exit_step for i in range(24)], a.exit_step)


def test_cache_sized_calls_give_the_same_results(exported):
    export = exported("demo")
    videos, _ = SyntheticTask(export.preset, seed=1).batch("test", range(24))
    thresholds = [1.9, 1.7, 1.7, 1.7, 1e9]
    whole = Runtime.load(export.path, max_call_gflops=None, call_cache_mib=None)
    cached = Runtime.load(export.path)  # the CPU defaults
    for runtime in (whole, cached):
        runtime.set_thresholds(thresholds)
    calls = []
    run = cached.backend._run
    cached.backend._run = lambda graph, feeds: calls.append(graph) or run(graph, feeds)
    a, b = whole.predict(videos), cached.predict(videos)
    assert calls.count("glance") == 3  # 24 videos at 10 a call
    np.testing.assert_array_equal(a.exit_step, b.exit_step)
    np.testing.assert_array_equal(a.cube_starts, b.cube_starts)
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
    assert len(set(a.exit_step.tolist())) >= 2


def test_the_cpu_defaults_bound_calls_and_a_bad_limit_is_refused(exported):
    runtime = Runtime.load(exported("demo").path)
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
    # a graph of which not two rows fit is left to the work bound (no cache would hold a part)
    backend.call_cache_mib = 1.0
    assert backend.rows_per_call("glance") == int(CPU_CALL_GFLOPS // backend.specs["glance"].gflops)
    for key in ("max_call_gflops", "call_cache_mib"):
        with pytest.raises(AdaFocusError, match=f"{key} must be positive"):
            Runtime.load(exported("demo").path, **{key: 0})
