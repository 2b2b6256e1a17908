"""A graph call larger than `max_call_gflops` allows is run in parts along the batch axis: the same
results (every graph is row-independent), with bounded memory per call."""

import numpy as np
import pytest

from adafocus.data.synthetic import SyntheticTask
from adafocus.errors import AdaFocusError
from adafocus.runtime import Runtime
from adafocus.runtime.backends.base import CPU_CALL_GFLOPS


@pytest.mark.parametrize(
    "backend", [{"backend": "onnxruntime"}, {"backend": "pytorch"}], ids=["onnxruntime", "pytorch"]
)
def test_split_calls_give_the_same_results(exported, backend):
    export = exported("demo")
    videos, _ = SyntheticTask(export.preset, seed=0).batch("test", range(24))
    thresholds = [1.9, 1.7, 1.7, 1.7, 1e9]
    whole = Runtime.load(export.path, **backend, max_call_gflops=None)
    whole.set_thresholds(thresholds)
    split = Runtime.load(export.path, **backend, max_call_gflops=0.05)  # local: 2 cubes a call, glance: 1 video
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


def test_the_cpu_default_bounds_calls_and_a_bad_limit_is_refused(exported):
    runtime = Runtime.load(exported("demo").path)
    assert runtime.backend.max_call_gflops == CPU_CALL_GFLOPS
    # the demo's calls are never split at the batches it runs (the bench's largest is 512)
    assert min(runtime.backend.rows_per_call(g) for g in ("glance", "local", "classifier")) > 512
    with pytest.raises(AdaFocusError, match="max_call_gflops must be positive"):
        Runtime.load(exported("demo").path, max_call_gflops=0)
