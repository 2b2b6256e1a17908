"""INT8 (QDQ) graphs: calibrated on the inputs the loop really feeds, sealed into the manifest, run by
ONNX Runtime next to fp32 with (mostly) the same answers."""

import contextlib
import math
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from adafocus.bench import bench_videos
from adafocus.cli import calibrate
from adafocus.data.synthetic import SyntheticTask
from adafocus.errors import AdaFocusError
from adafocus.export.manifest import open_export
from adafocus.machine import RELEVANT_FLAGS, cpu_flags, hidden_flags, u8s8_may_saturate
from adafocus.model import adaptive_inference, load_checkpoint
from adafocus.quantize.int8 import kernels_exact, quantize_export, record_inputs
from adafocus.runtime import Runtime
from adafocus.runtime.backends import Int8PrecisionWarning, make_backend
from adafocus.weights import builtin_checkpoint
from conftest import run_as_avx2_cpu, strict_loads

CALIBRATION_VIDEOS = 64
HELDOUT = 256
# the demo model's calibrated default thresholds (adafocus-calibrate, 1000 'val' videos): on the held-out
# videos below, 6/25/29/67/129 of 256 exit after 0..4 cubes in fp32
THRESHOLDS = [1.6205726861953735, 1.1580216884613037, 1.4078255891799927, 1.823283314704895, 1e9]
# measured with these (calibration: 'val' 0..63; held-out: 'test' 0..255), ORT 1.32, 7-bit weights (the
# default, exact on every x86 CPU), AVX2-only EPYC: glance + local int8: same class 78.9 %, same exit step
# 86.7 %, accuracy 49.6 % -> 46.5 %; only the local encoder in int8: 95.3 % / 97.7 %. The integer arithmetic
# is the same on every x86 CPU (the fast kernels cannot saturate), so one threshold holds on all of them;
# the margin is for fp32 summation order, which does differ between AVX2 and AVX-512. (8-bit weights gave
# 65.2 % / 75.8 % on the AVX2 CPU and 79.3 % / 86.7 % on a VNNI one.) The demo model reads one-pixel
# textures and is fragile (fp32 with half a grey level of input noise changes ~9 % of its classes); the
# int8 glance moves ~1/4 of the policy's cube starts by a pixel.
MIN_SAME_CLASS, MIN_SAME_EXIT, MAX_ACCURACY_DROP = 0.74, 0.82, 0.06
LOCAL_ONLY_MIN_SAME_CLASS, LOCAL_ONLY_MIN_SAME_EXIT = 0.90, 0.95


@pytest.fixture(scope="module")
def task(exported):
    return SyntheticTask(exported("demo").preset, seed=0)


@pytest.fixture(scope="module")
def quantised(exported, task, tmp_path_factory):
    target = tmp_path_factory.mktemp("int8") / "demo"
    shutil.copytree(exported("demo").path, target)
    return quantize_export(target, [task.batch("val", range(CALIBRATION_VIDEOS))], threads=2)


@pytest.fixture(scope="module")
def local_only(quantised, task, tmp_path_factory):
    """The quantised export, re-quantised with only the local encoder in int8."""
    target = tmp_path_factory.mktemp("int8-local") / "demo"
    shutil.copytree(quantised.path, target)
    return quantize_export(target, [task.batch("val", range(CALIBRATION_VIDEOS))], graphs=("local",), threads=2)


@pytest.fixture(scope="module")
def full_range(exported, task, tmp_path_factory):
    """The demo quantised with full 8-bit weights, which clip on x86 CPUs without VNNI."""
    target = tmp_path_factory.mktemp("int8-8bit") / "demo"
    shutil.copytree(exported("demo").path, target)
    return quantize_export(target, [task.batch("val", range(CALIBRATION_VIDEOS))], weight_bits=8, threads=2)


@pytest.fixture(scope="module")
def heldout(task):
    videos, labels = task.batch("test", range(HELDOUT))
    return videos.numpy(), labels.numpy()


def compare(export, videos, labels) -> dict:
    """fp32 and int8 runs of `export` with THRESHOLDS: shares of equal classes and exits, accuracies."""
    results = {}
    for precision in ("fp32", "int8"):
        runtime = Runtime.load(export.path, "onnxruntime", threads=2, precision=precision)
        assert runtime.backend.describe()["precision"] == precision
        runtime.set_thresholds(THRESHOLDS)
        results[precision] = runtime.predict(videos)
    fp32, int8 = results["fp32"], results["int8"]
    assert len(set(fp32.exit_step.tolist())) == 5  # every step is exercised
    assert not np.array_equal(fp32.logits, int8.logits)  # int8 really ran
    return {
        "same_class": float((fp32.prediction == int8.prediction).mean()),
        "same_exit": float((fp32.exit_step == int8.exit_step).mean()),
        **{p: float((r.prediction == labels).mean()) for p, r in results.items()},
    }


def test_int8_graphs_are_qdq_per_channel_and_pass_the_checker(quantised):
    graphs = quantised.manifest["graphs"]
    record = quantised.manifest["int8"]
    for name in ("glance", "local"):
        path = quantised.graph_path(name, "int8")
        assert path.name == f"{name}.int8.onnx" and record["graphs"][name]["quantized"]
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QuantizeLinear") > 5 and ops.count("DequantizeLinear") > 5
        # every Conv reads int8 weights through a per-channel DequantizeLinear
        init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        assert convs
        for conv in convs:
            dq = producer[conv.input[1]]
            assert dq.op_type == "DequantizeLinear"
            assert init[dq.input[0]].dtype == np.int8
            assert init[dq.input[1]].size == init[dq.input[0]].shape[0] > 1  # one scale per output channel
    for name in ("crop", "policy", "classifier"):  # kept in fp32, and the manifest says so
        assert graphs[name]["variants"]["int8"] == graphs[name]["file"]
        assert not record["graphs"][name]["quantized"] and record["graphs"][name]["reason"]
    assert "int8" not in graphs["dense"].get("variants", {})
    assert record["calibration_videos"] == CALIBRATION_VIDEOS and record["method"] == "MinMax"
    assert record["graphs"]["local"]["calibration_rows"] == CALIBRATION_VIDEOS * quantised.preset.max_cubes
    assert record["onnxruntime"] and record["activations"] == "uint8" and record["tensorrt_ready"] is False


def test_export_stays_sealed(quantised, local_only, tmp_path):
    reopened = open_export(quantised.path)  # schema, own hash, every file's hash, no stray files
    assert {"glance.int8.onnx", "local.int8.onnx"} <= set(reopened.manifest["files"])
    assert not [p.name for p in quantised.path.iterdir() if p.name.startswith(".")]  # no staging left

    # re-quantising another set of graphs: the stale int8 glance goes, with its manifest entry
    assert not (local_only.path / "glance.int8.onnx").exists()
    assert "glance.int8.onnx" not in open_export(local_only.path).manifest["files"]
    assert local_only.manifest["graphs"]["glance"]["variants"]["int8"] == "glance.onnx"

    copy = tmp_path / "demo"
    shutil.copytree(quantised.path, copy)
    local = copy / "local.int8.onnx"
    local.write_bytes(local.read_bytes() + b"\0")
    with pytest.raises(AdaFocusError, match="local.int8.onnx does not match"):
        open_export(copy)


def test_int8_runtime_agrees_with_fp32(quantised, heldout):
    got = compare(quantised, *heldout)
    assert got["same_class"] >= MIN_SAME_CLASS and got["same_exit"] >= MIN_SAME_EXIT, got
    assert got["int8"] >= got["fp32"] - MAX_ACCURACY_DROP, got


def test_int8_calls_on_the_cpu_hold_four_times_the_work_of_fp32_ones(quantised):
    """Activations of one byte instead of four: the same memory holds four times the work a call."""
    from adafocus.runtime.backends.base import CPU_CALL_GFLOPS, CPU_CALL_GFLOPS_INT8

    fp32 = Runtime.load(quantised.path, "onnxruntime", call_cache_mib=None).backend
    int8 = Runtime.load(quantised.path, "onnxruntime", precision="int8", call_cache_mib=None).backend
    assert (fp32.max_call_gflops, int8.max_call_gflops) == (CPU_CALL_GFLOPS, CPU_CALL_GFLOPS_INT8)
    assert CPU_CALL_GFLOPS_INT8 == 4 * CPU_CALL_GFLOPS
    per_video = fp32.specs["glance"].gflops
    assert int8.rows_per_call("glance") == int(CPU_CALL_GFLOPS_INT8 / int8.call_workers // per_video)
    assert fp32.rows_per_call("glance") == int(CPU_CALL_GFLOPS / fp32.call_workers // per_video)


def test_int8_weights_are_7_bit_so_no_x86_kernel_saturates(quantised, heldout):
    record = quantised.manifest["int8"]
    assert record["weight_bits"] == 7 and record["exact_on_every_x86_cpu"] is True
    assert record["made_on"]["cpu"] and "vnni" in record["made_on"]
    for name in ("glance", "local"):
        model = onnx.load(str(quantised.graph_path(name, "int8")))
        weights = [numpy_helper.to_array(i) for i in model.graph.initializer]
        int8 = [w for w in weights if w.dtype == np.int8 and w.ndim == 4]  # the Conv kernels
        assert int8 and all(w.min() >= -64 and w.max() <= 64 for w in int8), name
        assert max(int(np.abs(w).max()) for w in int8) == 64  # the 7-bit range is used, not less
        assert record["graphs"][name]["fast_kernels_exact_here"] is True
    # the fast kernels give the exact kernels' integers on real inputs of this CPU, whatever it is
    assert kernels_exact(quantised.graph_path("glance", "int8"), [{"videos": heldout[0][:32]}])


def test_8_bit_weights_run_exactly_and_warn_once_where_the_cpu_would_clip(full_range, heldout):
    record = full_range.manifest["int8"]
    assert record["weight_bits"] == 8 and record["exact_on_every_x86_cpu"] is False
    clips = u8s8_may_saturate()
    if clips:  # measured on an AVX2-only CPU: the fast kernels change the glance's outputs
        assert record["graphs"]["glance"]["fast_kernels_exact_here"] is False
    expect = pytest.warns(Int8PrecisionWarning, match="exact, slower U8U8 mode") if clips else contextlib.nullcontext()
    with expect:
        got = compare(full_range, *heldout)
    assert got["same_class"] >= MIN_SAME_CLASS and got["same_exit"] >= MIN_SAME_EXIT, got
    Runtime.load(full_range.path, "onnxruntime", precision="int8")  # once per export: no second warning


# Run with AVX-512, VNNI and AMX hidden from CPUID: what the CPU reports, and whether ONNX Runtime's fast
# kernels give its exact mode's integers on the glance of the 7-bit and of the 8-bit export.
AVX2_KERNELS = """
import json, sys
from pathlib import Path
import numpy as np
from adafocus.machine import cpu_record, u8s8_may_saturate
from adafocus.quantize.int8 import kernels_exact
feeds = [{"videos": np.load(sys.argv[1])}]
exact = {bits: kernels_exact(Path(path), feeds) for bits, path in zip(("7", "8"), sys.argv[2:])}
print(json.dumps({"cpu": cpu_record(), "may_saturate": u8s8_may_saturate(), "exact": exact}))
"""


def test_avx2_kernels_clip_8_bit_weights_and_not_the_7_bit_default(quantised, full_range, heldout, tmp_path):
    """Why the weights have 7 bits, checked on whatever x86 CPU this is: with AVX-512, VNNI and AMX
    hidden from CPUID, ONNX Runtime picks its AVX2 uint8 x int8 kernels, whose int16 sums of product
    pairs clip 8-bit weights (its fast kernels then differ from its exact mode) and not 7-bit ones."""
    videos = tmp_path / "videos.npy"
    np.save(videos, heldout[0][:32])
    graphs = [str(export.graph_path("glance", "int8")) for export in (quantised, full_range)]
    done = run_as_avx2_cpu(["-c", AVX2_KERNELS, str(videos), *graphs])
    assert done.returncode == 0, done.stderr
    got = strict_loads(done.stdout.splitlines()[-1])
    assert got["cpu"]["flags"] == ["sse4_1", "avx2", "fma"] and got["cpu"]["vnni"] is False, got["cpu"]
    has = set(cpu_flags()) | set(hidden_flags())  # this machine's (this test may itself run with some hidden)
    assert got["cpu"].get("flags_hidden", []) == [f for f in RELEVANT_FLAGS if f in has - set(got["cpu"]["flags"])]
    assert got["may_saturate"] is True
    assert got["exact"] == {"7": True, "8": False}


def test_int8_local_encoder_alone_agrees_closely(local_only, heldout):
    got = compare(local_only, *heldout)
    assert got["same_class"] >= LOCAL_ONLY_MIN_SAME_CLASS and got["same_exit"] >= LOCAL_ONLY_MIN_SAME_EXIT, got
    assert got["int8"] >= got["fp32"] - MAX_ACCURACY_DROP, got


def test_int8_without_int8_graphs_is_a_clear_error(exported):
    with pytest.raises(AdaFocusError, match="no int8 graphs") as caught:
        Runtime.load(exported("demo").path, "onnxruntime", precision="int8")
    assert "adafocus-calibrate --int8" in str(caught.value)
    with pytest.raises(AdaFocusError, match="runs fp32 or int8"):
        Runtime.load(exported("demo").path, "onnxruntime", precision="fp16")


def test_calibration_inputs_are_the_policys_cubes(exported, task):
    export = exported("demo")
    p = export.preset
    videos, _ = task.batch("val", range(6))
    inputs = record_inputs(export, [videos], ("local", "classifier"))
    # the policy's plan, from the PyTorch reference (not from the graphs that recorded)
    planned = adaptive_inference(load_checkpoint(builtin_checkpoint()).model, videos, [-math.inf] * 5).cube_starts
    np.testing.assert_array_equal(inputs.cube_starts, planned.numpy())
    assert len(np.unique(planned.numpy().reshape(-1, 3), axis=0)) > p.max_cubes  # places differ between steps
    assert len(inputs.feeds["local"]) == p.max_cubes  # one call per cube step, in loop order
    s, f = p.cube_size, p.cube_frames
    for k, feeds in enumerate(inputs.feeds["local"]):
        cubes = feeds["cubes"]
        assert cubes.shape == (6, f, 3, s, s)
        for i, (x0, y0, t0) in enumerate(planned[:, k].tolist()):
            np.testing.assert_array_equal(cubes[i], videos[i, t0 : t0 + f, :, y0 : y0 + s, x0 : x0 + s].numpy())
    classifier = inputs.feeds["classifier"]
    assert [c["step"].tolist() for c in classifier] == [[k] * 6 for k in range(1, p.max_cubes + 1)]
    assert not classifier[0]["local_state"].any() and classifier[1]["local_state"].any()


def test_cli_int8_reports_and_records(exported, tmp_path):
    target = tmp_path / "demo"
    shutil.copytree(exported("demo").path, target)
    args = [str(target), "--videos", "32", "--heldout", "32", "--batch-size", "32", "--int8", "--int8-videos", "16"]
    result = CliRunner().invoke(calibrate, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = strict_loads(result.stdout)["int8"]
    export = open_export(target)
    assert export.manifest["int8"] == report
    assert report["calibration_videos"] == 16 and report["heldout"]["videos"] == 32
    held = report["heldout"]
    assert held["thresholds"] == export.manifest["thresholds"]  # the calibrated default, for both
    assert 0 <= held["class_changed"] <= 1 and 0 <= held["exit_step_changed"] <= 1
    speed = report["speed"]
    assert speed["batch"] == 128 and speed["threads"] == 2 and speed["fp32_videos_per_s"] > 0
    assert speed["speedup"] == pytest.approx(speed["int8_videos_per_s"] / speed["fp32_videos_per_s"])
    assert Runtime.load(target, precision="int8").backend.describe()["precision"] == "int8"
    # calibrated again to the same thresholds, the comparison still holds and stays
    again = CliRunner().invoke(calibrate, args[:-3])
    assert again.exit_code == 0, again.output
    assert open_export(target).manifest["int8"] == report and "comparison" not in again.output
    # calibrated to other thresholds, it described the old ones: removed, and said so
    other = CliRunner().invoke(calibrate, [str(target), "--videos", "16", "--heldout", "0", "--batch-size", "16"])
    assert other.exit_code == 0, other.output
    manifest = open_export(target).manifest
    assert manifest["thresholds"] != held["thresholds"]
    assert not {"heldout", "speed"} & set(manifest["int8"]) and manifest["int8"]["graphs"] == report["graphs"]
    assert "comparison ran at the old thresholds and was removed" in other.stderr
    assert Runtime.load(target, precision="int8").backend.describe()["precision"] == "int8"


def test_bench_int8_runs_beside_fp32_with_an_int8_dense_graph(exported, task, tmp_path):
    from adafocus import cli
    from adafocus.export.graphs import DENSE

    target = shutil.copytree(exported("demo").path, tmp_path / "demo")
    export = quantize_export(target, [task.batch("val", range(16))], graphs=("glance", "local", DENSE), threads=2)
    assert (
        export.graph(DENSE).variants["int8"] == "dense.int8.onnx"
        and export.manifest["int8"]["graphs"][DENSE]["quantized"]
    )
    # a first threshold between one video's fp32 and int8 glance entropies (every later step exits), so
    # that the int8 loop and the fp32 loops spend different compute on the benchmark's videos
    videos = bench_videos(export, 8).numpy()
    step0 = {p: Runtime.load(target, precision=p, threads=2).step_outputs(videos)[0][:, 0] for p in ("fp32", "int8")}
    apart = int(np.argmax(np.abs(step0["fp32"] - step0["int8"])))
    first = float(step0["fp32"][apart] + step0["int8"][apart]) / 2
    assert np.abs(step0["fp32"] - first).min() > 1e-3  # no fp32 video near it: the two fp32 loops agree
    thresholds = ",".join(map(str, [first] + [1e9] * export.preset.max_cubes))
    out = tmp_path / "bench.json"
    args = [str(target), "--precision", "int8", "--batch", "8", "--repeats", "1", "--warmup", "0"]
    result = CliRunner().invoke(cli.bench, [*args, "--thresholds", thresholds, "--out", str(out)])
    assert result.exit_code == 0, result.output
    (b,) = strict_loads(out.read_text(encoding="utf-8"))["backends"]
    assert set(b["videos_per_s"]) >= {"adaptive", "dense", "adaptive_fp32", "dense_fp32", "torch_eager"}
    # the PyTorch loop runs fp32 beside int8: its compute is that of the fp32 exits, not the int8 loop's
    gflops = b["gflops_per_video"]
    assert gflops["adaptive"] != pytest.approx(gflops["adaptive_fp32"], rel=1e-6)
    assert gflops["torch_eager"] == pytest.approx(gflops["adaptive_fp32"], rel=1e-9)
    assert b["methods"]["dense"]["precision"] == "int8" and b["methods"]["dense_fp32"]["precision"] == "fp32"
    v, ratios = b["videos_per_s"], b["int8"]
    assert ratios["adaptive_int8_vs_dense_fp32"] == pytest.approx(v["adaptive"] / v["dense_fp32"])
    assert ratios["dense_int8_vs_dense_fp32"] == pytest.approx(v["dense"] / v["dense_fp32"])
    assert b["exits_per_step"] and b["methods"]["adaptive_fp32"]["exits_per_step"]
    assert "int8: adaptive" in result.stdout
    # the int8 dense graph really is another graph: its logits move, its classes mostly stay
    videos, _ = task.batch("test", range(32))
    outputs = {}
    for precision in ("fp32", "int8"):
        backend = make_backend(export, "onnxruntime", precision=precision, graphs=(DENSE,), threads=2)
        outputs[precision] = backend.run(DENSE, {"videos": backend.videos(videos.numpy())})["logits"]
    assert not np.array_equal(outputs["fp32"], outputs["int8"])
    assert (outputs["fp32"].argmax(1) == outputs["int8"].argmax(1)).mean() > 0.5
    # quantised again without it, the dense graph is fp32 again and its int8 file goes
    again = quantize_export(target, [task.batch("val", range(16))], graphs=("local",), threads=2)
    assert "int8" not in again.graph(DENSE).variants and not (target / "dense.int8.onnx").exists()


def test_int8_graphs_need_int8_and_known_names(exported):
    result = CliRunner().invoke(calibrate, [str(exported("demo").path), "--int8-graphs", "local,dense"])
    assert result.exit_code != 0 and "--int8-graphs is an option of --int8" in result.output
    with pytest.raises(AdaFocusError, match=r"cannot quantise \['crop'\]"):
        quantize_export(exported("demo").path, np.zeros((1, 8, 3, 128, 128), np.float32), graphs=("local", "crop"))


def test_cli_int8_graphs_are_the_librarys():
    from adafocus.cli.calibrate import DEFAULT_INT8_GRAPHS, INT8_GRAPHS
    from adafocus.export.graphs import DENSE
    from adafocus.quantize.int8 import DEFAULT_GRAPHS, QUANTISABLE

    assert DEFAULT_INT8_GRAPHS == DEFAULT_GRAPHS and INT8_GRAPHS == (*QUANTISABLE, DENSE)


def test_cli_refuses_unknown_int8_graphs_before_any_work(exported):
    args = [str(exported("demo").path), "--int8", "--int8-graphs", "local,crop"]
    result = CliRunner().invoke(calibrate, args)
    assert result.exit_code != 0 and "--int8-graphs: cannot quantise ['crop']" in result.output
    assert "calibration videos" not in result.output  # nothing ran


class _Unread:
    """Calibration videos that must not be read: an option check that comes first never reads them."""

    def __iter__(self):
        raise AssertionError("videos were read before the options were checked")


def test_bad_quantisation_options_are_refused_before_any_video_is_read(exported, tmp_path):
    target = shutil.copytree(exported("demo").path, tmp_path / "demo")
    refused = {
        "method": ("entropy", "unknown calibration method 'entropy'"),
        "activations": ("fp8", "unknown activation type 'fp8'"),
        "weight_bits": (6, "weights of 6 bits are not offered"),
    }
    for option, (value, message) in refused.items():
        with pytest.raises(AdaFocusError, match=message):
            quantize_export(target, _Unread(), threads=1, **{option: value})
    assert open_export(target).int8 is None


def test_a_nan_calibration_video_is_named_by_its_index_in_the_set(exported, task):
    videos, _ = task.batch("val", range(12))
    videos[9] = float("nan")
    with pytest.raises(AdaFocusError, match=r"videos \[9\]"):  # in the third pass of four videos
        record_inputs(exported("demo"), [videos], ("local",), per_pass=4, threads=1)


def test_comparing_no_videos_is_a_clear_error_before_any_runtime_loads(exported, monkeypatch):
    from adafocus.quantize.int8 import compare_precisions

    def load(*args, **kwargs):
        raise AssertionError("a runtime was loaded for no videos")

    monkeypatch.setattr(Runtime, "load", load)
    with pytest.raises(AdaFocusError, match="no videos to compare"):
        compare_precisions(exported("demo").path, [])


def test_percentile_ranges_do_not_depend_on_the_passes(exported, task, tmp_path):
    """The same videos recorded in one pass or in four give the same Percentile ranges, and they are
    those of ONNX Runtime's own calibrator given every value at once."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    from adafocus.quantize.int8 import _reader, activation_ranges

    export = exported("demo")
    videos, _ = task.batch("val", range(16))

    def plain(ranges) -> dict:
        return {name: tuple(float(x) for x in r.range_value) for name, r in ranges.data.items()}

    found, calls = {}, {}
    for per_pass in (16, 4):
        with record_inputs(export, [videos], ("glance",), per_pass=per_pass, threads=1) as inputs:
            feeds = inputs.feeds["glance"]
            calls[per_pass] = len(feeds)
            work = tmp_path / f"pass-{per_pass}"
            work.mkdir()
            found[per_pass] = plain(activation_ranges(export.graph_path("glance"), feeds, "percentile", work))
            if per_pass == 16:
                theirs = create_calibrator(
                    export.graph_path("glance"),
                    sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                    augmented_model_path=str(tmp_path / "theirs.onnx"),
                    calibrate_method=CalibrationMethod.Percentile,
                )
                theirs.collect_data(_reader([feeds[i] for i in range(len(feeds))]))  # one collect: all at once
                own = plain(theirs.compute_data())
    assert calls[4] > calls[16]  # the values really came in other pieces
    assert len(own) > 10 and found[16] == own
    assert found[4] == found[16]
