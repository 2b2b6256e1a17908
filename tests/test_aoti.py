"""AOTInductor packages: compiled and validated once per test run, run by the `aoti` backend through
the one loop (parity with the PyTorch reference), refused when tampered or foreign, and run from C++
by cpp/adafocus_run.cpp, which must agree with Runtime.predict video by video."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adafocus.errors import AdaFocusError
from adafocus.export.aoti import PACKAGE_REVISION, compile_packages, package_file, vector_isa
from adafocus.export.graphs import DENSE, GRAPH_NAMES
from adafocus.export.manifest import MANIFEST, open_export
from adafocus.model import adaptive_inference
from adafocus.runtime import Runtime
from adafocus.runtime.backends import make_backend
from test_protocol import resealed
from test_runtime import assert_fp16_agrees, assert_same

REPO = Path(__file__).resolve().parents[1]
PROB_TOL_CPP = 1e-4
# the same packages in other batch sizes (on a GPU, other kernels too): AdaFocusV3 centres lie in [0, 1],
# Uni-AdaFocus boxes in pixels; a box off by a pixel or a cube of another step is far outside
CENTRES_TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def demo_data(exported):
    from adafocus.data.synthetic import SyntheticTask
    from test_runtime import spread_thresholds

    model = exported("demo").load_model()
    videos, _ = SyntheticTask(model.preset, seed=0).batch("test", range(128))
    return model, videos, spread_thresholds(model, videos)


def test_packages_are_recorded_sealed_and_validated(aoti_export):
    records = aoti_export.manifest["engines"]["aoti"]["cpu"]["fp32"]
    assert set(records) == {*GRAPH_NAMES, "dense"}
    for graph, record in records.items():
        assert record["file"] == package_file(graph, "cpu", "fp32")
        assert aoti_export.files[record["file"]]["sha256"] == record["sha256"]  # sealed with the rest
        assert record["torch"] == torch.__version__ and record["vector_isa"] == vector_isa()
        assert record["batch_range"] == [1, 128, 128] and record["compile_seconds"] > 0
        assert record["package_revision"] == PACKAGE_REVISION
        for output, errors in record["validation"].items():
            assert errors["max_rel_error"] <= 1e-4, (graph, output, errors)
    open_export(aoti_export.path)  # the resealed directory passes every reader's checks


# Run in a child process: a package reads AOTI_RUNTIME_CHECK_INPUTS once, at its first call, and
# keeps what it read for as long as the process has it loaded.
CHECKED_RUN = """
import json, sys
import torch
from adafocus.export.graphs import graph_specs
from adafocus.export.manifest import open_export
from adafocus.export.validate import compare_outputs, validation_cases

export = open_export(sys.argv[1])
model = export.load_model()
specs = graph_specs(model)
records = export.manifest["engines"]["aoti"]["cpu"]["fp32"]
lo, _, hi = next(iter(records.values()))["batch_range"]
assert lo == 1  # validation_cases: real inputs at batch 1 and `hi` (random crop pools exceed `hi`)
cases = {g: [c for c in cs if c.label.startswith("real")] for g, cs in validation_cases(model, hi).items()}
for name, record in records.items():
    package = torch._inductor.aoti_load_package(str(export.path / record["file"]))
    def run(inputs):
        with torch.inference_mode():
            out = package(*[x.contiguous() for x in inputs])
        return [y.numpy() for y in ([out] if isinstance(out, torch.Tensor) else out)]
    compare_outputs(specs[name], run, cases[name], export.preset, 1e-4, engine="AOTInductor")
over = specs["classifier"].random_inputs(hi + 1, torch.Generator().manual_seed(0))
try:  # the check is on: a batch past the range is refused
    torch._inductor.aoti_load_package(str(export.path / records["classifier"]["file"]))(*over)
    refused = ""
except RuntimeError as e:
    refused = str(e)
print(json.dumps({"range": [lo, hi], "graphs": sorted(records), "refused": refused}))
"""


def test_packages_run_their_whole_recorded_range_with_input_checks_on(aoti_export):
    """AOTI_RUNTIME_CHECK_INPUTS=1 makes a package hold its inputs to the bounds it was compiled
    for: every package takes the recorded range's smallest and largest batch (real inputs, within
    the validation tolerance of PyTorch), and refuses the next batch up. torch.export assumed batch
    >= 2, and Inductor narrowed the glance graph to 3 videos at most, the local one to 15."""
    env = {**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHECKED_RUN, str(aoti_export.path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["range"] == [1, 128] and result["graphs"] == sorted([*GRAPH_NAMES, DENSE])
    assert "dim value is too large" in result["refused"], result


@pytest.mark.parametrize("batch", [1, 7, 128])
def test_aoti_backend_reproduces_the_reference_in_both_modes(aoti_export, demo_data, batch):
    model, videos, thresholds = demo_data
    videos = videos[:batch]
    reference = adaptive_inference(model, videos, thresholds)
    runtime = Runtime.load(aoti_export.path, "aoti")
    assert runtime.backend.describe()["backend"] == "aoti"
    runtime.set_thresholds(thresholds)
    assert_same(runtime.predict(videos).video, reference, batch)
    streamed = {r.index: r for r in runtime.stream(iter(videos), batch_size=max(batch // 2, 1))}
    assert sorted(streamed) == list(range(batch))
    assert_same(streamed.__getitem__, reference, batch)
    batches = torch.split(videos, max(batch // 3, 1))  # a DataLoader's batches: admitted as views
    streamed = {r.index: r for r in runtime.stream(iter(batches), batch_size=max(batch // 2, 1))}
    assert sorted(streamed) == list(range(batch))
    assert_same(streamed.__getitem__, reference, batch)
    if batch == 128:
        assert sum(1 for c in np.bincount(reference.exit_step.numpy()) if c) >= 3


def test_batches_past_the_packages_range_are_split(aoti_export, demo_data):
    _, videos, thresholds = demo_data
    runtime = Runtime.load(aoti_export.path, "aoti")
    runtime.set_thresholds(thresholds)
    assert runtime.backend.max_batch == 128
    doubled = torch.cat([videos, videos])  # 256 > the packages' largest batch
    result = runtime.predict(doubled)
    np.testing.assert_array_equal(result.exit_step[:128], result.exit_step[128:])


# --- CUDA packages (on a GPU host: benchmarks/gpu_host.sh runs these) --------------------------------
NO_CUDA = "no CUDA GPU: AOTInductor CUDA packages are compiled and run on one (benchmarks/gpu_host.sh)"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


@pytest.fixture(scope="session")
def aoti_cuda_export(exported, tmp_path_factory):
    """The demo export with CUDA packages of every graph in fp32 and fp16 (compiled once per test run)."""
    target = tmp_path_factory.mktemp("aoti-cuda") / "demo"
    shutil.copytree(exported("demo").path, target)
    for precision in ("fp32", "fp16"):
        started = time.perf_counter()
        lines = []
        compile_packages(target, device="cuda", precision=precision, log=lines.append)
        print(f"\nAOTInductor CUDA {precision} compile of the demo's six graphs: {time.perf_counter() - started:.0f} s")
        print("\n".join(lines))
    return open_export(target)


@needs_cuda
@pytest.mark.parametrize("batch", [1, 7, 128])
def test_aoti_cuda_fp32_reproduces_the_reference_in_both_modes(aoti_cuda_export, demo_data, batch):
    model, videos, thresholds = demo_data
    videos = videos[:batch]
    reference = adaptive_inference(model, videos, thresholds)
    runtime = Runtime.load(aoti_cuda_export.path, "aoti", "cuda", precision="fp32")
    runtime.set_thresholds(thresholds)
    assert_same(runtime.predict(videos.cuda()).video, reference, batch)
    for items in (videos.cuda(), torch.split(videos.cuda(), max(batch // 3, 1))):  # videos, then batches
        streamed = {r.index: r for r in runtime.stream(iter(items), batch_size=max(batch // 2, 1))}
        assert sorted(streamed) == list(range(batch))
        assert_same(streamed.__getitem__, reference, batch)


@needs_cuda
def test_aoti_cuda_fp16_agrees_with_the_fp32_reference(aoti_cuda_export, demo_data):
    """The agreement criterion of the PyTorch CUDA fp16 backend (tests/test_runtime.py)."""
    model, videos, thresholds = demo_data
    reference = adaptive_inference(model, videos, thresholds)
    runtime = Runtime.load(aoti_cuda_export.path, "aoti", "cuda", precision="fp16")
    runtime.set_thresholds(thresholds)
    assert_fp16_agrees(runtime.predict(videos.cuda()), reference, "AOTInductor CUDA fp16")


def _before_the_bounds_fix(manifest):  # packages compiled before revision 2 carry no revision
    del manifest["engines"]["aoti"]["cpu"]["fp32"]["policy"]["package_revision"]


def _from_batch_two(manifest):  # compiled with --batch-range 2:... before that was refused: batch 1 unchecked
    manifest["engines"]["aoti"]["cpu"]["fp32"]["local"]["batch_range"][0] = 2


def test_a_tampered_or_foreign_package_is_refused(aoti_export, exported, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(aoti_export.path, tampered)
    package = tampered / package_file("local", "cpu", "fp32")
    package.write_bytes(package.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(AdaFocusError, match="does not match its manifest entry"):
        Runtime.load(tampered, "aoti")

    def older_torch(manifest):
        for record in manifest["engines"]["aoti"]["cpu"]["fp32"].values():
            record["torch"] = "2.9.0+cpu"

    foreign = resealed(aoti_export.path, tmp_path / "foreign", older_torch)
    with pytest.raises(AdaFocusError, match=r"compiled with torch 2\.9\.0\+cpu") as caught:
        Runtime.load(foreign, "aoti")
    assert "--aoti --device cpu --precision fp32 --into" in str(caught.value)

    older = resealed(aoti_export.path, tmp_path / "older", _before_the_bounds_fix)
    with pytest.raises(AdaFocusError, match="of revision 1, compiled by an older adafocus-deploy") as caught:
        Runtime.load(older, "aoti")
    assert "recompile them: adafocus-export --aoti --device cpu --precision fp32 --into" in str(caught.value)

    from_two = resealed(aoti_export.path, tmp_path / "from-two", _from_batch_two)
    with pytest.raises(AdaFocusError, match="packages of local refuse batches below 2") as caught:
        Runtime.load(from_two, "aoti")
    assert "with a batch range from 1 (the default): adafocus-export --aoti" in str(caught.value)

    if vector_isa() != "amx":  # packages for a wider instruction set than this CPU has

        def wider(manifest):
            for record in manifest["engines"]["aoti"]["cpu"]["fp32"].values():
                record["vector_isa"] = "amx"

        with pytest.raises(AdaFocusError, match="use amx instructions"):
            Runtime.load(resealed(aoti_export.path, tmp_path / "wider", wider), "aoti")
    with pytest.raises(AdaFocusError, match="no AOTInductor cpu fp32 packages"):
        Runtime.load(exported("demo").path, "aoti")


# --- the C++ runner -----------------------------------------------------------------------------------
def _build_requirements() -> str | None:
    missing = [h for h in ("/usr/include/nlohmann/json.hpp", "/usr/include/openssl/evp.h") if not os.path.exists(h)]
    if shutil.which("g++") is None:
        missing.append("g++")
    if missing:
        return f"the C++ runner's build needs {', '.join(missing)}: apt-get install g++ nlohmann-json3-dev libssl-dev"
    return None


@pytest.fixture(scope="session")
def runner(tmp_path_factory) -> Path:
    reason = _build_requirements()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("cpp") / "adafocus-run"
    env = {**os.environ, "PYTHON": sys.executable}
    started = time.perf_counter()
    done = subprocess.run(["bash", str(REPO / "cpp" / "build.sh"), str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"\nbuilt {out} in {time.perf_counter() - started:.0f} s")
    return out


def run_cpp(runner: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "ADAFOCUS_RUN": str(runner)}
    return subprocess.run(
        ["bash", str(REPO / "cpp" / "adafocus-run.sh"), *map(str, args)], env=env, capture_output=True, text=True
    )


def _thresholds_args(thresholds) -> list[str]:
    return ["--thresholds", ",".join("-inf" if math.isinf(t) else repr(t) for t in thresholds)]


def _assert_cpp_agrees(done: subprocess.CompletedProcess, expected, skip=()) -> None:
    """The runner's JSON lines against Runtime.predict's result, video by video (but those in `skip`)."""
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["index"] for line in lines] == list(range(len(expected.exit_step)))
    for i, line in enumerate(lines):
        if i in skip:
            continue
        k = int(expected.exit_step[i])
        assert line["exit_step"] == k and line["class_index"] == int(expected.prediction[i]), i
        assert line["cube_starts"] == expected.cube_starts[i, :k].tolist(), i
        centres = np.reshape(line["centres"], (k, expected.centres.shape[-1]))
        np.testing.assert_allclose(centres, expected.centres[i, :k], **CENTRES_TOL)
        np.testing.assert_allclose(line["probabilities"], expected.probs[i], atol=PROB_TOL_CPP, rtol=0)
        assert line["gflops"] == pytest.approx(float(expected.gflops[i]))


def test_the_cpp_runner_agrees_with_runtime_predict_video_by_video(runner, aoti_export, demo_data, tmp_path):
    _, videos, thresholds = demo_data
    np.save(tmp_path / "videos.npy", videos.numpy())
    for chosen in (None, thresholds):  # the manifest's calibrated thresholds, then ones spread over every step
        args = [] if chosen is None else _thresholds_args(chosen)
        done = run_cpp(runner, aoti_export.path, tmp_path / "videos.npy", *args)
        runtime = Runtime.load(aoti_export.path, "aoti")
        if chosen is not None:
            runtime.set_thresholds(chosen)
        expected = runtime.predict(videos)
        _assert_cpp_agrees(done, expected)
        if chosen is not None:  # (this export is uncalibrated: its own thresholds never exit early)
            assert len(set(expected.exit_step.tolist())) >= 3


def test_the_cpp_runner_runs_the_uni_adafocus_family(runner, aoti_uni, tmp_path):
    """Its crop graph takes each step's patch box, which the runner feeds by the graph's input names."""
    export, (_, videos, thresholds, fragile) = aoti_uni
    np.save(tmp_path / "videos.npy", videos.numpy())
    done = run_cpp(runner, export.path, tmp_path / "videos.npy", *_thresholds_args(thresholds))
    runtime = Runtime.load(export.path, "aoti")
    runtime.set_thresholds(thresholds)
    expected = runtime.predict(videos)
    assert len(set(expected.exit_step.tolist())) >= 3
    # a frame position or box corner within float noise of an integer may round either way in another batch
    _assert_cpp_agrees(done, expected, skip=set(np.flatnonzero(fragile.numpy()).tolist()))


@needs_cuda
def test_the_cpp_runner_on_cuda_agrees_with_runtime_predict(runner, aoti_cuda_export, demo_data, tmp_path):
    _, videos, thresholds = demo_data
    np.save(tmp_path / "videos.npy", videos.numpy())
    args = ["--device", "cuda", "--precision", "fp32", *_thresholds_args(thresholds)]
    done = run_cpp(runner, aoti_cuda_export.path, tmp_path / "videos.npy", *args)
    runtime = Runtime.load(aoti_cuda_export.path, "aoti", "cuda", precision="fp32")
    runtime.set_thresholds(thresholds)
    _assert_cpp_agrees(done, runtime.predict(videos.cuda()))


def test_the_cpp_runner_verifies_the_export(runner, aoti_export, tmp_path):
    np.save(tmp_path / "videos.npy", np.zeros((2, *aoti_export.preset.video_shape), np.float32))
    tampered = tmp_path / "tampered"
    shutil.copytree(aoti_export.path, tampered)
    (tampered / "stray.txt").write_text("not part of the export", encoding="utf-8")
    done = run_cpp(runner, tampered, tmp_path / "videos.npy")
    assert done.returncode == 1 and "stray.txt, not part of this export" in done.stderr
    (tampered / "stray.txt").unlink()
    manifest = json.loads((tampered / MANIFEST).read_text(encoding="utf-8"))
    manifest["thresholds"] = [0.1] * 5  # changed by hand, not resealed
    (tampered / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    done = run_cpp(runner, tampered, tmp_path / "videos.npy")
    assert done.returncode == 1 and "content hash does not match" in done.stderr
    older = resealed(aoti_export.path, tmp_path / "older", _before_the_bounds_fix)
    done = run_cpp(runner, older, tmp_path / "videos.npy")
    assert done.returncode == 1 and "policy package is of revision 1" in done.stderr, done.stderr[-2000:]
    from_two = resealed(aoti_export.path, tmp_path / "from-two", _from_batch_two)
    done = run_cpp(runner, from_two, tmp_path / "videos.npy")
    assert done.returncode == 1 and "local package refuses batches below 2" in done.stderr, done.stderr[-2000:]
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 3, 3, 8, 8), np.float32))
    done = run_cpp(runner, aoti_export.path, wrong)
    assert done.returncode == 1 and "has shape" in done.stderr


def test_the_cpp_canonical_json_is_pythons(runner, tmp_path):
    """The manifest hash is over Python's json.dumps(sort_keys, compact, ensure_ascii=False): floats
    must come out digit for digit as Python's repr writes them."""
    value = {
        "floats": [0.1, 1e-05, 1e-4, 1e16, 1e15, 2.3019790649414062, -0.0, 5e-324, 1.7976931348623157e308, 1e9, -1e9],
        "more": [123456789.123, 0.028809, 3.0, -2.5e-07, 1.5e17, 100.0],
        "text": 'ü " \\ \n tab\t',
        "z": {"b": 1, "a": [True, False, None]},
    }
    path = tmp_path / "value.json"
    path.write_text(json.dumps(value), encoding="utf-8")
    done = run_cpp(runner, "--print-canonical", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@pytest.fixture(scope="module")
def aoti_uni(exported, tmp_path_factory):
    """uni-small with CPU packages of the loop's five graphs (the dense baseline's package took a third
    of the compile time), and small_plan_data's model, videos, thresholds and fragile videos."""
    from test_uni import small_plan_data

    target = tmp_path_factory.mktemp("aoti_uni") / "uni-small"
    shutil.copytree(exported("uni-small").path, target)
    export = compile_packages(target, device="cpu", batch_range=(1, 32, 32), dense=False, log=lambda _: None)
    return export, small_plan_data()


def test_aoti_backend_runs_the_uni_adafocus_family(aoti_uni):
    """The published-weights family compiled by AOTInductor (its crop resamples with grid_sample):
    the same exits, classes, frames and boxes as the PyTorch reference."""
    from test_uni import assert_reproduces

    export, (model, videos, thresholds, fragile) = aoti_uni
    assert set(export.manifest["engines"]["aoti"]["cpu"]["fp32"]) == set(GRAPH_NAMES)
    with pytest.raises(AdaFocusError, match="has no AOTInductor cpu fp32 package of the dense graph"):
        make_backend(export, "aoti", graphs=(DENSE,))
    reference = adaptive_inference(model, videos, thresholds)
    runtime = Runtime.load(export.path, "aoti")
    runtime.set_thresholds(thresholds)
    excluded = assert_reproduces(runtime.predict(videos).video, reference, fragile)
    streamed = {r.index: r for r in runtime.stream(iter(videos), batch_size=8)}
    assert_reproduces(streamed.__getitem__, reference, fragile)
    assert excluded <= 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "fp16"], "fp16 packages need a CUDA GPU"),
        (["--batch-range", "1:2:2"], "must include batch 3"),
    ],
)
def test_cli_aoti_options_are_refused_before_the_onnx_export(tmp_path, args, message):
    """Refused only after the minute the ONNX export takes, leaving that export behind."""
    from click.testing import CliRunner

    from adafocus import cli

    result = CliRunner().invoke(cli.export, ["--aoti", *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad", ["nan", "0.5x", "", "abc"])
def test_the_cpp_runner_refuses_thresholds_python_refuses(runner, exported, tmp_path, bad):
    """A NaN threshold compares false with every entropy (never exits, silently); text crashed std::stof
    (exit 2, "stof"). Thresholds are read before any package, so an export without them will do."""
    export = exported("demo")
    np.save(tmp_path / "videos.npy", np.zeros((1, *export.preset.video_shape), np.float32))
    thresholds = ",".join(["0.5", bad, *["0.5"] * (export.preset.max_cubes - 1)])
    done = run_cpp(runner, export.path, tmp_path / "videos.npy", "--thresholds", thresholds)
    assert done.returncode == 1 and f"--thresholds: '{bad}' is not a threshold" in done.stderr, done.stderr


def test_the_cpp_runner_reads_thresholds_as_python_does(runner, exported, tmp_path):
    """Spaces, case and `null` as Python's --thresholds takes them: past parsing, to the missing packages."""
    export = exported("demo")
    np.save(tmp_path / "videos.npy", np.zeros((1, *export.preset.video_shape), np.float32))
    thresholds = ",".join([" Inf", "NULL ", *["-inf"] * (export.preset.max_cubes - 1)])
    done = run_cpp(runner, export.path, tmp_path / "videos.npy", "--thresholds", thresholds)
    assert done.returncode == 1 and "has no AOTInductor cpu fp32 packages" in done.stderr, done.stderr
