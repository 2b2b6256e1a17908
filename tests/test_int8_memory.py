"""INT8 calibration whose memory does not grow with the videos: recorded feeds spilled to disk and
replayed one recorded call at a time, the calibrator's session in a memory-bounded order. Same ranges
as recording everything at once, and as ONNX Runtime's own calibrator; no spill left behind by a
killed run; a mid-sized preset's `adafocus-calibrate --int8` under a stated peak (VmHWM)."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from adafocus.data.synthetic import SyntheticTask
from adafocus.files import PARTIAL
from adafocus.model.presets import get_preset
from adafocus.quantize.int8 import (
    SPILL_NAME,
    WORK_NAME,
    activation_ranges,
    quantize_export,
    quantize_graph,
    record_inputs,
)
from conftest import strict_loads

VIDEOS = 48


@pytest.fixture(scope="module")
def task(exported):
    return SyntheticTask(exported("demo").preset, seed=0)


def activation_qparams(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(scale, zero point) of every QuantizeLinear in an int8 graph, by the tensor it quantises: the
    activation ranges (the weights are stored quantised, behind DequantizeLinear only)."""
    model = onnx.load(str(path))
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantised = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            quantised[node.input[0]] = (constants[node.input[1]], constants[node.input[2]])
    return quantised


def assert_same_ranges(a: Path, b: Path) -> None:
    """Same tensors quantised with the same scales (to float noise: 1e-6 relative) and zero points."""
    qa, qb = activation_qparams(a), activation_qparams(b)
    assert qa.keys() == qb.keys() and len(qa) > 10
    for name, (scale, zero) in qa.items():
        np.testing.assert_allclose(qb[name][0], scale, rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(qb[name][1], zero, err_msg=name)


def test_recording_in_passes_gives_the_ranges_of_one_pass(exported, task, tmp_path):
    videos = task.batch("val", range(VIDEOS))
    made = {}
    for per_pass in (VIDEOS, 5):  # everything in one pass; ten passes of at most five videos
        target = shutil.copytree(exported("demo").path, tmp_path / f"pass-{per_pass}")
        made[per_pass] = quantize_export(target, [videos], per_pass=per_pass, threads=2)
        assert made[per_pass].manifest["int8"]["videos_per_pass"] == per_pass
    for graph in ("glance", "local"):
        assert_same_ranges(made[VIDEOS].path / f"{graph}.int8.onnx", made[5].path / f"{graph}.int8.onnx")


def test_ranges_are_onnx_runtimes_own(exported, task, tmp_path):
    """The bounded calibrator (one recorded call at a time, priority-based order) finds the ranges ONNX
    Runtime's own quantize_static calibration finds with every feed in memory at once."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData

    from adafocus.quantize.int8 import _reader, quantize_graph

    export = exported("demo")
    videos, _ = task.batch("val", range(VIDEOS))
    with record_inputs(export, [videos], ("local",), per_pass=7) as inputs:
        feeds = inputs.feeds["local"]
        assert len(feeds) == 7 * export.preset.max_cubes  # 7 passes, one call per cube step
        in_memory = [feeds[i] for i in range(len(feeds))]
        ours = quantize_graph(export.graph_path("local"), tmp_path / "ours.onnx", feeds, preprocess=False)
        ranges = activation_ranges(export.graph_path("local"), feeds, "minmax", tmp_path)
    assert isinstance(ranges, TensorsData) and ours["quantized"]
    quantize_static(  # what quantize_graph did before: the calibrator of quantize_static, all feeds at once
        str(export.graph_path("local")),
        str(tmp_path / "theirs.onnx"),
        _reader(in_memory),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    assert_same_ranges(tmp_path / "theirs.onnx", tmp_path / "ours.onnx")


def spills(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".{SPILL_NAME}{PARTIAL}*"))


def works(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".{WORK_NAME}{PARTIAL}*"))


def test_a_killed_calibration_leaves_no_spill_after_the_next_run(exported, task, tmp_path, monkeypatch):
    export = exported("demo")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    child = textwrap.dedent(
        f"""
        import sys, time
        from adafocus.data.synthetic import SyntheticTask
        from adafocus.export.manifest import open_export
        from pathlib import Path
        from adafocus.quantize.int8 import quantize_graph, record_inputs
        export = open_export({str(export.path)!r})
        videos, _ = SyntheticTask(export.preset, seed=0).batch("val", range(8))
        inputs = record_inputs(export, [videos], ("glance", "local"), per_pass=4)
        print(inputs.folder, flush=True)

        class Blocking(list):  # the calibrator waits on its second recorded call: killed mid-quantisation
            def __getitem__(self, index):
                if index > 0:
                    time.sleep(600)
                return super().__getitem__(index)

        feeds = Blocking(inputs.feeds["local"][i] for i in range(len(inputs.feeds["local"])))
        quantize_graph(export.graph_path("local"), Path(sys.argv[1]), feeds, preprocess=False)
        """
    )
    command = [sys.executable, "-c", child, str(tmp_path / "local.int8.onnx")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=os.environ | {"TMPDIR": str(temporary)})
    try:
        folder = Path(process.stdout.readline().strip())
        assert folder.parent == temporary and len(list(folder.glob("*.npy"))) > 4  # the feeds really went there
        deadline = time.monotonic() + 120  # until the quantiser's scratch folder holds its augmented graph
        while not list(temporary.glob(f".{WORK_NAME}{PARTIAL}*/augmented.onnx")) and time.monotonic() < deadline:
            assert process.poll() is None, "the child ended before it quantised"
            time.sleep(0.05)
        (work,) = works(temporary)
    finally:
        process.send_signal(signal.SIGKILL)  # nothing of the child's can clean up
        process.wait(60)
        process.stdout.close()
    assert spills(temporary) == [folder]
    alive = temporary / f".{SPILL_NAME}{PARTIAL}{os.getpid()}.0000"  # a live process's spill stays
    alive.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    videos, _ = task.batch("val", range(4))
    with record_inputs(export, [videos], ("local",)) as inputs:
        assert spills(temporary) == sorted([alive, inputs.folder])
        assert works(temporary) == [work]  # the killed quantiser's scratch folder, until the next one starts
        quantize_graph(
            export.graph_path("local"), tmp_path / "local.int8.onnx", inputs.feeds["local"], preprocess=False
        )
        assert works(temporary) == []
    assert spills(temporary) == [alive]


def test_an_unrecordable_batch_leaves_no_spill(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(Exception, match="NaN|non-finite|finite"):
        bad = np.full((2, *exported("demo").preset.video_shape), np.nan, np.float32)
        record_inputs(exported("demo"), [bad], ("local",))
    assert spills(tmp_path) == []


# A preset between the demo (8 x 128² frames, slim ResNet-10) and sthsth-v1 (16 x 224², TSM ResNet-50):
# TSM ResNet-18 on two 96²x4 cubes of 8 x 160² frames. Its INT8 stage (recording + quantising glance and
# local) on 384 videos in batches of 64 peaked at 1.4 GiB here (Intel Xeon, onnxruntime 1.32), the whole
# `adafocus-calibrate --int8` at 2.2 GiB (its fp32-vs-int8 speed run at batch 128); before the spill and the
# calibrator's bounded order the stage grew with the videos: 2.1 GiB at 256, ~2.5 GiB at 384. 256 videos
# are enough to tell the two apart (with 384 the test took 3 of the suite's 38 minutes).
MID = dataclasses.replace(
    get_preset("demo"),
    name="mid-size-test",
    frame_size=160,
    glance_size=128,
    glance_channels=640,
    cube_size=96,
    cube_frames=4,
    max_cubes=2,
    tsm=True,
    local_arch="resnet18",
    hidden_dim=512,
    policy_channels=64,
)
MID_VIDEOS = 256
MID_STAGE_PEAK_GIB, MID_PEAK_GIB = 1.8, 3.0


@pytest.fixture(scope="module")
def mid_export(tmp_path_factory):
    from adafocus.builtin import random_model
    from adafocus.export.exporter import export_model
    from adafocus.model.checkpoint import default_class_names

    return export_model(
        random_model(MID),
        tmp_path_factory.mktemp("mid") / "mid",
        class_names=default_class_names(MID),
        weights={"source": "random", "seed": 0},
        validate_batch=2,
        dense=False,  # adafocus-calibrate --int8 does not quantise it by default: half the export's time spared
        log=lambda _: None,
    )


def test_int8_calibration_of_a_mid_sized_preset_stays_under_its_peak(mid_export, tmp_path):
    """The whole command in a fresh process, its peak resident memory read from /proc (VmHWM: unlike
    ru_maxrss, not inherited from the forking test process)."""
    target = shutil.copytree(mid_export.path, tmp_path / "mid")
    report = tmp_path / "report.json"
    child = textwrap.dedent(
        f"""
        import json, sys
        from adafocus.cli import calibrate
        from adafocus.files import write_json
        from adafocus.machine import peak_rss_bytes
        args = [{str(target)!r}, "--videos", "16", "--heldout", "0", "--batch-size", "64", "--json",
                "--int8", "--int8-videos", "{MID_VIDEOS}"]
        try:
            calibrate.main(args, standalone_mode=False)
        finally:
            write_json({str(report)!r}, {{"peak_rss_bytes": peak_rss_bytes()}})
        """
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    peak = strict_loads(report.read_text(encoding="utf-8"))["peak_rss_bytes"]
    int8 = strict_loads(done.stdout)["int8"]
    assert int8["calibration_videos"] == MID_VIDEOS and int8["videos_per_pass"] < 64  # recorded in passes
    assert int8["peak_rss_of"].startswith("this stage")  # its VmHWM was reset at the start of the stage
    assert 0 < int8["peak_rss_bytes"] <= peak and 0 < int8["seconds"] < time.monotonic() - started
    assert int8["peak_rss_bytes"] < MID_STAGE_PEAK_GIB * 2**30, f"INT8 stage: {int8['peak_rss_bytes'] / 2**30:.2f} GiB"
    assert peak < MID_PEAK_GIB * 2**30, f"peak resident memory {peak / 2**30:.2f} GiB"
