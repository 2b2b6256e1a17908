"""Every backend, in both modes, reproduces the PyTorch reference loop (adafocus.model.reference)."""

import functools
import math

import numpy as np
import pytest
import torch

from adafocus.data.synthetic import SyntheticTask
from adafocus.errors import AdaFocusError
from adafocus.export.manifest import update_manifest
from adafocus.model import adaptive_inference, entropy, load_checkpoint
from adafocus.runtime import Runtime
from adafocus.runtime.arrivals import Arrivals
from adafocus.weights import builtin_checkpoint
from conftest import random_model

PROB_TOL = 1e-4
NO_CUDA = "no CUDA GPU: the PyTorch CUDA backend cannot run here"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


def _ort_gpu_reason():
    import onnxruntime as ort

    if not torch.cuda.is_available():
        return NO_CUDA.replace("PyTorch CUDA", "ONNX Runtime CUDA")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime without CUDAExecutionProvider: install onnxruntime-gpu (README, 'GPU hosts')"
    return None


ORT_GPU_REASON = _ort_gpu_reason()
# Runtime.load arguments of every backend the parity tests run on
BACKENDS = [
    pytest.param({"backend": "onnxruntime"}, id="onnxruntime"),
    pytest.param({"backend": "onnxruntime", "io_binding": True}, id="onnxruntime-iobinding"),
    pytest.param({"backend": "pytorch"}, id="pytorch"),
    pytest.param({"backend": "pytorch", "device": "cuda"}, id="pytorch-cuda", marks=needs_cuda),
    pytest.param(
        {"backend": "onnxruntime", "device": "cuda"},
        id="onnxruntime-cuda",
        marks=pytest.mark.skipif(ORT_GPU_REASON is not None, reason=str(ORT_GPU_REASON)),
    ),
]


def reference_model(name):
    if name == "demo":
        return load_checkpoint(builtin_checkpoint()).model
    return random_model(name)  # the weights of the `exported` fixture


def spread_thresholds(model, videos):
    """Thresholds that make videos exit at every step, placed midway between two videos' entropies
    (never on one) so that 1e-6 backend differences cannot flip an exit. Flat steps never exit."""
    all_steps = adaptive_inference(model, videos, [-math.inf] * model.preset.num_exits).step_logits
    thresholds = []
    for t in range(model.preset.num_exits):
        values = np.unique(entropy(all_steps[:, t]).numpy())
        gaps = np.flatnonzero(np.diff(values) > 1e-3)
        if len(gaps) == 0:
            thresholds.append(-math.inf)
            continue
        i = gaps[len(gaps) // 3]
        thresholds.append(float(values[i] + values[i + 1]) / 2)
    return thresholds


def assert_same(result_of, reference, n):
    """result_of(i) -> VideoResult; same exit step and class for every video, probabilities close."""
    for i in range(n):
        got = result_of(i)
        assert got.exit_step == int(reference.exit_step[i]), i
        assert got.prediction == int(reference.prediction[i]), i
        np.testing.assert_allclose(got.probs, reference.probs[i].double().numpy(), atol=PROB_TOL, rtol=0)
        used = got.exit_step
        np.testing.assert_array_equal(got.cube_starts[:used], reference.cube_starts[i, :used].numpy())


@pytest.fixture(scope="module")
def demo_data():
    model = reference_model("demo")
    videos, _ = SyntheticTask(model.preset, seed=0).batch("test", range(128))
    return model, videos, spread_thresholds(model, videos)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 7, 128])
def test_demo_backends_reproduce_the_reference_in_both_modes(exported, demo_data, backend, batch):
    model, videos, thresholds = demo_data
    videos = videos[:batch]
    reference = adaptive_inference(model, videos, thresholds)
    runtime = Runtime.load(exported("demo").path, **backend)
    runtime.set_thresholds(thresholds)
    on_device = videos.to(runtime.backend.device)
    result = runtime.predict(on_device)
    assert_same(result.video, reference, batch)
    streamed = {r.index: r for r in runtime.stream(iter(on_device), batch_size=max(batch // 2, 1))}
    assert sorted(streamed) == list(range(batch))
    assert_same(streamed.__getitem__, reference, batch)
    batches = torch.split(on_device, max(batch // 3, 1))  # as a DataLoader yields them: views, no copy
    streamed = {r.index: r for r in runtime.stream(iter(batches), batch_size=max(batch // 2, 1))}
    assert sorted(streamed) == list(range(batch))
    assert_same(streamed.__getitem__, reference, batch)
    if batch == 128:  # the thresholds really spread the exits
        assert sum(1 for c in np.bincount(reference.exit_step.numpy()) if c) >= 3


@pytest.mark.parametrize("backend", BACKENDS[:3])
def test_each_video_may_carry_its_own_thresholds(exported, demo_data, backend):
    """Per-row thresholds (what serving does with per-request budgets): one call equals the reference
    run on each group of rows with that group's thresholds, in both modes."""
    model, videos, spread = demo_data
    never = [-math.inf] * model.preset.num_exits
    rows = [spread if i % 3 else never for i in range(64)]
    runtime = Runtime.load(exported("demo").path, **backend)
    result = runtime.predict(videos[:64], thresholds=rows)
    by_row = dict(enumerate(rows))
    streamed = {
        r.index: r for r in runtime.stream(iter(videos[:64]), 16, row_thresholds=lambda ids: [by_row[i] for i in ids])
    }
    for thresholds in (spread, never):
        group = [i for i in range(64) if rows[i] is thresholds]
        reference = adaptive_inference(model, videos[group], thresholds)
        assert_same(lambda j, group=group: result.video(group[j]), reference, len(group))
        assert_same(lambda j, group=group: streamed[group[j]], reference, len(group))
    assert runtime.stats.mixed_threshold_turns > 0
    with pytest.raises(AdaFocusError, match="thresholds of shape"):
        runtime.predict(videos[:4], thresholds=rows[:3])


@pytest.mark.parametrize(
    ("rows", "error"),
    [
        (lambda ids: np.full((len(ids), 5), np.nan), r"gave video 0 the thresholds \[nan, .*with NaN(?s:.*)use -inf"),
        (lambda ids: [[1.0, None, 1.0, 1.0, 1.0]] * len(ids), r"gave video 0 the thresholds \[1.0, nan, .*with NaN"),
        (lambda ids: np.zeros((len(ids), 4)), r"shape \(4, 4\) for 4 videos from video 0(?s:.*)shape \(4, 5\)"),
        (lambda ids: [[1.0] * 5, [1.0] * 4] * (len(ids) // 2), r"shape ragged for 4 videos"),
    ],
    ids=["nan", "none", "too-few", "ragged"],
)
def test_stream_refuses_row_thresholds_it_cannot_use(exported, rows, error):
    """A NaN threshold compares False with every entropy: its video would exit at step 0 unnoticed."""
    runtime = Runtime.load(exported("demo").path)
    assert runtime.preset.num_exits == 5  # the rows above give 5 (4 where too few)
    videos = torch.zeros(8, *runtime.preset.video_shape)
    with pytest.raises(AdaFocusError, match=error):
        list(runtime.stream(iter([videos]), batch_size=4, row_thresholds=rows))


@functools.cache
def paper_case(name: str):
    """Seven videos of a paper preset, thresholds spread over its exits, and the reference loop's
    result: computed once per preset for all backends (two full reference passes each)."""
    model = reference_model(name)
    videos = torch.randn(7, *model.preset.video_shape, generator=torch.Generator().manual_seed(3))
    thresholds = spread_thresholds(model, videos)
    return videos, thresholds, adaptive_inference(model, videos, thresholds)


@pytest.mark.parametrize("name", ["sthsth-v1-t8", "activitynet-p96"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_presets_reproduce_the_reference(exported, name, backend):
    videos, thresholds, reference = paper_case(name)
    runtime = Runtime.load(exported(name).path, **backend)
    runtime.set_thresholds(thresholds)
    assert_same(runtime.predict(videos).video, reference, 7)
    assert_same(runtime.predict(videos[:1]).video, reference, 1)
    streamed = {r.index: r for r in runtime.stream(iter(videos), batch_size=3)}
    assert_same(streamed.__getitem__, reference, 7)


@pytest.mark.parametrize("pool", [4, 16])  # single videos as views (4), gathered into a chunk (16)
def test_stream_reports_a_bad_video_and_goes_on(exported, demo_data, pool):
    model, videos, thresholds = demo_data
    videos = list(videos[:6])
    reference = adaptive_inference(model, torch.stack(videos), thresholds)
    bad = videos[2].clone()
    bad[0, 0, 0, 0] = float("nan")
    inputs = videos[:2] + [bad, videos[2][:3]] + videos[2:]
    runtime = Runtime.load(exported("demo").path)
    runtime.set_thresholds(thresholds)
    results = {r.index: r for r in runtime.stream(iter(inputs), batch_size=pool)}
    assert "NaN" in results[2].error and "video 2" in results[2].error
    assert "shape" in results[3].error
    good = [i for i in range(len(inputs)) if i not in (2, 3)]
    assert all(results[i].ok for i in good)
    assert_same(lambda i: results[good[i]], reference, 6)


def test_stream_takes_batches_and_single_videos(exported, demo_data):
    """A DataLoader's batches, a single video and a batch of one mixed: `index` counts every video in
    input order, and each gets the reference's result."""
    model, videos, thresholds = demo_data
    videos = videos[:60]
    reference = adaptive_inference(model, videos, thresholds)
    items = [videos[0:5], videos[5], videos[6:46], videos[46:47], videos[47:60].numpy()]
    runtime = Runtime.load(exported("demo").path)
    runtime.set_thresholds(thresholds)
    streamed = {r.index: r for r in runtime.stream(iter(items), batch_size=16)}
    assert sorted(streamed) == list(range(60))
    assert_same(streamed.__getitem__, reference, 60)


@pytest.mark.parametrize("pool", [4, 64])  # the batch of 12 as views (4), gathered (64)
def test_stream_reports_bad_videos_of_a_batch_and_goes_on(exported, demo_data, pool):
    model, videos, thresholds = demo_data
    videos = videos[:12]
    with_nan = videos.clone()
    with_nan[3, 0, 0, 0, 0] = float("nan")
    with_nan[9, 1, 2, 3, 4] = float("inf")
    wrong_shape = videos[:2, :, :, :32]
    runtime = Runtime.load(exported("demo").path)
    runtime.set_thresholds(thresholds)
    results = {r.index: r for r in runtime.stream(iter([with_nan, wrong_shape]), batch_size=pool)}
    assert sorted(results) == list(range(14))
    assert "video 3 holds NaN or inf" in results[3].error and "video 9 holds NaN or inf" in results[9].error
    assert "the batch of videos 12..13 has shape" in results[12].error and "shape" in results[13].error
    good = [i for i in range(12) if i not in (3, 9)]
    assert all(results[i].ok for i in good)
    assert_same(lambda i: results[good[i]], adaptive_inference(model, videos[good], thresholds), len(good))


def test_stream_reads_a_batch_before_asking_for_the_next(exported, demo_data):
    """An iterator that refills one buffer for every batch (as a decoder's pinned buffer may) gets
    the same results as fresh batches: each batch is admitted before the next is asked for."""
    model, videos, thresholds = demo_data
    videos = videos[:40]
    reference = adaptive_inference(model, videos, thresholds)
    buffer = torch.empty(10, *videos.shape[1:])

    def refilled():
        for start in range(0, 40, 10):
            buffer.copy_(videos[start : start + 10])
            yield buffer

    runtime = Runtime.load(exported("demo").path)
    runtime.set_thresholds(thresholds)
    streamed = {r.index: r for r in runtime.stream(refilled(), batch_size=16)}
    assert_same(streamed.__getitem__, reference, 40)


def test_stream_admits_a_large_enough_batch_without_a_copy(exported):
    """Arrivals: a batch of at least a quarter of the pool is a view of the caller's memory, its last
    rows too; single videos and smaller batches are gathered into the staging batch."""
    runtime = Runtime.load(exported("demo").path)
    preset, arrays = runtime.preset, runtime.backend.arrays
    batch = np.random.default_rng(0).random((18, *preset.video_shape), dtype=np.float32)
    arrivals = Arrivals([batch, batch[0], batch[:2], batch[:4]], arrays, preset, capacity=16)
    ids, videos, failed = arrivals(16)  # 16 rows of the batch
    assert ids.tolist() == list(range(16)) and not failed
    assert np.shares_memory(videos, batch)
    ids, videos, _ = arrivals(16)  # its last 2 rows, on their own
    assert ids.tolist() == [16, 17] and np.shares_memory(videos, batch)
    ids, videos, _ = arrivals(16)  # a single video and a batch of 2: gathered, up to the next batch of 4
    assert ids.tolist() == [18, 19, 20] and not np.shares_memory(videos, batch)
    np.testing.assert_array_equal(videos, np.concatenate([batch[:1], batch[:2]]))
    ids, videos, _ = arrivals(16)
    assert ids.tolist() == [21, 22, 23, 24] and np.shares_memory(videos, batch)
    assert arrivals(16) is None


def test_bad_batches_get_one_clear_error(exported):
    runtime = Runtime.load(exported("demo").path)
    shape = runtime.preset.video_shape
    with pytest.raises(AdaFocusError, match="shape"):
        runtime.predict(torch.zeros(2, shape[0] - 1, *shape[1:]))
    with pytest.raises(AdaFocusError, match="float64"):
        runtime.predict(np.zeros((2, *shape)))
    nan = torch.zeros(3, *shape)
    nan[1, 0, 0, 0, 0] = float("inf")
    with pytest.raises(AdaFocusError, match=r"NaN or inf values \(videos \[1\]\)"):
        runtime.predict(nan)
    with pytest.raises(AdaFocusError, match="needs 5 exit thresholds"):
        runtime.set_thresholds([1.0, 1.0])


def test_a_manifest_of_another_preset_is_refused(exported):
    with pytest.raises(AdaFocusError, match="holds a 'demo' export, not 'sthsth-v1'"):
        Runtime.load(exported("demo").path, preset="sthsth-v1")


def test_inputs_are_not_copied_when_already_in_place(exported):
    runtime = Runtime.load(exported("demo").path)
    videos = torch.zeros(2, *runtime.preset.video_shape)
    assert np.shares_memory(runtime.backend.videos(videos), videos.numpy())
    assert runtime.predict(videos.numpy()).logits.shape == (2, 10)


def test_set_budget_picks_the_best_affordable_entry(exported, tmp_path):
    import shutil

    path = tmp_path / "demo"
    shutil.copytree(exported("demo").path, path)
    budgets = [
        {"gflops": 0.05, "accuracy": 0.30, "thresholds": [2.0, 2.0, 2.0, 2.0, 2.0]},
        {"gflops": 0.08, "accuracy": 0.45, "thresholds": [1.5, 1.5, 1.5, 1.5, 1.5]},
        {"gflops": 0.11, "accuracy": 0.47, "thresholds": [0.5, 0.5, 0.5, 0.5, 0.5]},
    ]
    update_manifest(path, lambda m: m.update(budgets=budgets))
    runtime = Runtime.load(path)
    assert runtime.set_budget(0.09)["gflops"] == 0.08
    assert runtime.thresholds.tolist() == [1.5] * 5
    with pytest.raises(AdaFocusError, match="cheapest is 0.0500"):
        runtime.set_budget(0.01)


def test_profile_is_off_by_default_and_adds_up_when_on(exported, demo_data):
    _, videos, thresholds = demo_data
    quiet = Runtime.load(exported("demo").path)
    quiet.predict(videos[:8])
    assert quiet.stats.seconds == {} and quiet.stats.videos == 8
    runtime = Runtime.load(exported("demo").path, profile=True)
    runtime.set_thresholds(thresholds)
    runtime.predict(videos[:32])
    report = runtime.profile_report()
    assert {"glance", "policy", "crop", "local", "classifier", "total"} <= set(report["seconds"])
    assert 0 <= report["host_loop_share"] < 1
    assert sum(report["exits_per_step"]) == 32


def test_onnxruntime_on_a_missing_provider_says_what_to_install(exported):
    if ORT_GPU_REASON is None:
        pytest.skip("this onnxruntime has the CUDA provider: the parity tests run it")
    with pytest.raises(AdaFocusError, match="(?s)needs CUDAExecutionProvider.*install onnxruntime-gpu"):
        Runtime.load(exported("demo").path, "onnxruntime", "cuda")


def test_onnxruntime_on_tensorrt_takes_batches_up_to_its_profile(exported):
    """The TensorRT provider's one optimisation profile ends at TRT_EP_MAX_BATCH: per-batch mode splits
    larger batches there (test_batches_past_the_backends_largest_are_split), streaming refuses a larger
    pool. Needs the provider: opening it elsewhere is refused (the test above)."""
    import onnxruntime as ort

    from adafocus.runtime.backends.onnxruntime import TRT_EP_MAX_BATCH

    if ORT_GPU_REASON is not None or "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"the TensorRT provider cannot run here: {ORT_GPU_REASON or 'onnxruntime-gpu without it'}")
    runtime = Runtime.load(exported("demo").path, "onnxruntime", "tensorrt")
    assert runtime.backend.max_batch == TRT_EP_MAX_BATCH
    with pytest.raises(AdaFocusError, match=f"batch_size {TRT_EP_MAX_BATCH + 1} is past the largest batch"):
        next(runtime.stream(iter([]), batch_size=TRT_EP_MAX_BATCH + 1))


def test_loop_sessions_do_not_spin_and_a_lone_graph_keeps_the_default(exported):
    """The loop's sessions take turns on the same cores: threads left spinning by one would slow the
    next (the demo ran at 0.55x). One session alone (the dense baseline) keeps ONNX Runtime's default."""
    from adafocus.runtime.backends.onnxruntime import SPINNING, OnnxRuntimeBackend

    export = exported("demo")
    loop = OnnxRuntimeBackend(export)
    assert {g: s.get_session_options().get_session_config_entry(SPINNING) for g, s in loop.sessions.items()} == {
        g: "0" for g in loop.graphs
    }
    lone = OnnxRuntimeBackend(export, graphs=("dense",))
    with pytest.raises(RuntimeError):  # never set: ONNX Runtime's own default (spinning)
        lone.sessions["dense"].get_session_options().get_session_config_entry(SPINNING)
    assert (loop.describe()["thread_spinning"], lone.describe()["thread_spinning"]) == ("off", "default")


def test_io_binding_keeps_results_on_the_backend_device(exported):
    runtime = Runtime.load(exported("demo").path, "onnxruntime", io_binding=True)
    videos = torch.randn(2, *runtime.preset.video_shape)
    glance = runtime.backend.run("glance", {"videos": runtime.backend.videos(videos)})
    assert all(isinstance(v, torch.Tensor) and v.device == runtime.backend.device for v in glance.values())
    with pytest.raises(AdaFocusError, match="policy input maps is torch.float64"):
        runtime.backend.run("policy", {"maps": glance["maps"].double()})


def test_a_backend_on_cuda_without_an_index_takes_its_own_tensors(exported, monkeypatch):
    """torch.device("cuda") is the current GPU, and a tensor put there reports "cuda:0": a backend
    built with "cuda" must take it. Without a GPU here, torch's current device is stood in for and the
    tensor is one that reports cuda:0; what is checked is the device comparison of every backend
    on torch arrays (pytorch, aoti, tensorrt)."""
    from adafocus.runtime.arrays import TorchArrays

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    backend = Runtime.load(exported("demo").path, "pytorch").backend
    backend.arrays = TorchArrays(torch.device("cuda"))  # what a backend built with device "cuda" holds
    assert backend.device == torch.device("cuda", 0)

    class OnCuda0(torch.Tensor):  # a tensor moved .to("cuda"): its device names the index
        @property
        def device(self):
            return torch.device("cuda", 0)

    videos = torch.zeros(2, *backend.export.preset.video_shape).as_subclass(OnCuda0)
    backend._check_feeds("glance", {"videos": videos})  # accepted
    with pytest.raises(AdaFocusError, match="on cpu, the graph takes float32 on cuda:0"):
        backend._check_feeds("glance", {"videos": torch.zeros(2, *backend.export.preset.video_shape)})


@needs_cuda
def test_cuda_inputs_are_not_copied_and_results_come_back_to_the_host(exported):
    runtime = Runtime.load(exported("demo").path, "pytorch", "cuda")
    videos = torch.randn(3, *runtime.preset.video_shape, device="cuda")
    assert runtime.backend.videos(videos).data_ptr() == videos.data_ptr()
    result = runtime.predict(videos)
    assert isinstance(result.logits, np.ndarray) and np.isfinite(result.logits).all()


FP16_AGREEMENT = 0.95  # share of the demo's 128 videos with the fp32 reference's exit step and class


@needs_cuda
def test_pytorch_cuda_fp16_agrees_with_the_fp32_reference(exported, demo_data):
    """fp16 changes the arithmetic, so exits near a threshold may move: most videos must agree, and
    the probabilities of those that do within 5e-2 (measured on an H200: 2.9e-2)."""
    model, videos, thresholds = demo_data
    reference = adaptive_inference(model, videos, thresholds)
    runtime = Runtime.load(exported("demo").path, "pytorch", "cuda", precision="fp16")
    runtime.set_thresholds(thresholds)
    assert_fp16_agrees(runtime.predict(videos.cuda()), reference, "PyTorch CUDA fp16")


def assert_fp16_agrees(result, reference, engine: str) -> None:
    """fp16's agreement criterion: most videos keep the reference's exit step and class, and their
    probabilities stay within 5e-2."""
    same = (result.exit_step == reference.exit_step.numpy()) & (result.prediction == reference.prediction.numpy())
    assert same.mean() >= FP16_AGREEMENT, f"{same.mean():.3f} of videos agree"
    diff = np.abs(result.probs[same] - reference.probs[same].double().numpy()).max()
    assert diff < 5e-2, diff
    print(f"{engine} vs fp32 reference: {same.mean():.3f} agree; max probability difference {diff:.2e}")


def test_tensorrt_backend_reproduces_the_reference_or_says_why_not(exported):
    from adafocus.export.tensorrt import unavailable_reason

    reason = unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT present: engine parity runs in tests/test_tensorrt.py on exports built with --trt")
    with pytest.raises(AdaFocusError, match="backend 'tensorrt'"):
        Runtime.load(exported("demo").path, "tensorrt")


def test_batches_past_the_backends_largest_are_split(exported, demo_data):
    """TensorRT engines end at their profile's largest batch: per-batch mode runs larger batches in
    parts (same results), streaming refuses a pool that large. Exercised here through an ONNX Runtime
    backend given such a limit."""
    _, videos, thresholds = demo_data
    runtime = Runtime.load(exported("demo").path)
    runtime.set_thresholds(thresholds)
    whole = runtime.predict(videos[:8])
    runtime.backend.max_batch = 3
    parts = runtime.predict(videos[:8])
    np.testing.assert_array_equal(parts.exit_step, whole.exit_step)
    np.testing.assert_allclose(parts.logits, whole.logits, rtol=0, atol=1e-5)
    with pytest.raises(AdaFocusError, match="batch_size 4 is past the largest batch"):
        next(runtime.stream(iter(videos), batch_size=4))
