import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from adafocus import cli
from adafocus.errors import AdaFocusError
from adafocus.export import exporter
from adafocus.export.graphs import GRAPH_NAMES, graph_specs
from adafocus.export.manifest import MANIFEST, check_schema, open_export, update_manifest
from adafocus.export.onnx_flops import count_gmacs
from adafocus.export.validate import Case, cpu_session, validate_graph
from adafocus.files import partial_path
from adafocus.model import build_model, get_preset, load_checkpoint
from adafocus.model.flops import count_flops
from adafocus.weights import builtin_checkpoint
from conftest import WITHOUT_DENSE

PAPER_PRESETS = ["sthsth-v1-t8", "activitynet-p96"]


@pytest.mark.parametrize("name", ["demo", *PAPER_PRESETS])
def test_export_round_trips_within_tolerance(exported, name):
    export = exported(name)
    m = export.manifest
    expected = {*GRAPH_NAMES} if name in WITHOUT_DENSE else {*GRAPH_NAMES, "dense"}
    assert set(m["graphs"]) == expected == set(m["validation"])
    for graph, outputs in m["validation"].items():
        assert set(outputs) == {t["name"] for t in m["graphs"][graph]["outputs"]}
        for output, errors in outputs.items():
            assert errors["max_rel_error"] <= 1e-4, (graph, output, errors)
    # every graph takes a symbolic batch axis and passes the checker
    for graph in m["graphs"]:
        onnx.checker.check_model(str(export.graph_path(graph)), full_check=True)
        assert all(t["shape"][0] in ("batch", "pool") for t in m["graphs"][graph]["inputs"])


def test_temporal_shifts_export_without_pad_or_a_reshape_per_block(exported):
    """The form model/tsm.py chose for ONNX Runtime's INT8 kernels: no Pad (run in float between a
    Dequantize and a Quantize) and no Reshape per shifted block (its channels-last Transposes cannot
    cross one); the masks are Muls."""
    export = exported("sthsth-v1-t8")  # TSM in the glance (10 blocks) and the local ResNet-50 (16)
    for graph, blocks in (("glance", 10), ("local", 16)):
        ops = [n.op_type for n in onnx.load(str(export.graph_path(graph)), load_external_data=False).graph.node]
        assert "Pad" not in ops and ops.count("Mul") >= 2 * blocks, graph
        assert ops.count("Reshape") < blocks, graph


@pytest.mark.parametrize("name", ["demo", *PAPER_PRESETS])
def test_gflops_counted_from_the_graphs_match_pytorch(exported, name):
    m = exported(name).manifest
    torch_count = count_flops(get_preset(name))
    np.testing.assert_allclose(m["gflops"]["per_exit_step"], torch_count.exit_cumulative, rtol=1e-6)
    assert m["graphs"]["local"]["gflops"] == pytest.approx(torch_count.cube, rel=1e-6)
    assert m["graphs"]["crop"]["gflops"] == 0
    assert m["gflops"]["dense_baseline_pytorch"] == pytest.approx(torch_count.dense_baseline, rel=1e-6)
    head = get_preset(name).hidden_dim * get_preset(name).num_classes / 1e9  # the p0 head the dense graph lacks
    if name in WITHOUT_DENSE:  # no graph to count: the key is left out, not filled from PyTorch's count
        assert "dense_baseline" not in m["gflops"]
    else:
        assert m["gflops"]["dense_baseline"] == pytest.approx(torch_count.dense_baseline - head, rel=1e-6)


def test_onnx_mac_counter_on_a_hand_built_graph(tmp_path):
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
    linear = torch.nn.Linear(6 * 8 * 8, 5)
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), linear).eval()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(
        model,
        (torch.randn(2, 4, 8, 8),),
        str(path),
        dynamo=True,
        external_data=False,
        verbose=False,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    expected = 6 * 8 * 8 * (4 // 2) * 9 + 6 * 8 * 8 * 5
    assert count_gmacs(path) * 1e9 == pytest.approx(expected)


def test_demo_graphs_run_at_other_batches_in_onnx_runtime(exported):
    """Batch 7 was never seen by export or validation: the batch axis is really dynamic."""
    export = exported("demo")
    model = load_checkpoint(builtin_checkpoint()).model
    spec = graph_specs(model)["glance"]
    videos = torch.randn(7, *model.preset.video_shape)
    got = cpu_session(export.graph_path("glance")).run(["logits"], {"videos": videos.numpy()})[0]
    with torch.no_grad():
        want = spec.module(videos)[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4 * float(want.abs().max()))


def test_manifest_follows_its_schema_and_the_schema_can_fail(exported):
    m = exported("demo").manifest
    check_schema(m)
    broken = json.loads(json.dumps(m))
    del broken["validation"]["local"]["features"]["max_rel_error"]
    with pytest.raises(AdaFocusError, match="validation/local/features"):
        check_schema(broken)


@pytest.fixture
def demo_copy(exported, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(exported("demo").path, target)
    return target


@pytest.mark.parametrize("name", ["glance.onnx", "policy.onnx", "crop.onnx", "local.onnx", "classifier.onnx"])
def test_a_changed_byte_in_any_graph_is_detected(demo_copy, name):
    path = demo_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(AdaFocusError, match=f"{name} does not match its manifest"):
        open_export(demo_copy)


def test_a_changed_manifest_value_is_detected(demo_copy):
    path = demo_copy / MANIFEST
    path.write_text(path.read_text(encoding="utf-8").replace('"max_cubes": 4', '"max_cubes": 3', 1), encoding="utf-8")
    with pytest.raises(AdaFocusError, match="changed after it was written"):
        open_export(demo_copy)


def test_stray_and_missing_files_are_refused(demo_copy, exported):
    (demo_copy / "other.onnx").write_bytes(b"x")
    with pytest.raises(AdaFocusError, match="other.onnx, not part of this export"):
        open_export(demo_copy)
    (demo_copy / "other.onnx").unlink()
    (demo_copy / "local.onnx").unlink()
    with pytest.raises(AdaFocusError, match="lacks local.onnx"):
        open_export(demo_copy)


def test_update_manifest_reseals(demo_copy):
    update_manifest(demo_copy, lambda m: m.update(thresholds=[0.5, 1.0, 1.0, 1.0, 1.0]))
    assert open_export(demo_copy).manifest["thresholds"] == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_validation_names_the_output_past_tolerance(exported):
    """The demo's exported glance graph checked against another model's weights must fail on an output."""
    export = exported("demo")
    torch.manual_seed(1)
    other = build_model(get_preset("demo"))
    spec = graph_specs(other)["glance"]
    case = Case("random, batch 2", spec.random_inputs(2, torch.Generator().manual_seed(0)))
    with pytest.raises(AdaFocusError, match="glance graph, output 'logits'.*past the fp32 tolerance"):
        validate_graph(spec, export.graph_path("glance"), [case], other.preset)


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def fail_on_policy(spec, *args, **kwargs):  # the second graph: the glance's file is written by then
        if spec.name == "policy":
            raise AdaFocusError("injected failure")
        return {name: {"max_abs_error": 0.0, "max_rel_error": 0.0} for name in spec.outputs}

    monkeypatch.setattr(exporter, "validate_graph", fail_on_policy)
    out = tmp_path / "out"
    with pytest.raises(AdaFocusError, match="injected"):
        exporter.export_model(
            build_model(get_preset("demo")),
            out,
            class_names=[str(i) for i in range(10)],
            weights={"source": "random"},
            log=lambda _: None,
        )
    assert list(tmp_path.iterdir()) == []


def test_a_later_export_removes_what_a_killed_one_left(tmp_path, monkeypatch):
    """kill -9 leaves `.X.partial-PID` (the final X is never half-written); the next export in the
    same folder removes it, and leaves a live writer's partial directory alone."""
    import signal
    import subprocess
    import sys
    import time

    writer = subprocess.Popen([sys.executable, "-m", "adafocus", "export", "--out", str(tmp_path / "X")])
    partial = partial_path(tmp_path / "X", pid=writer.pid)  # what that process names it
    deadline = time.monotonic() + 120
    while not partial.exists() and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert partial.is_dir(), "the export never started its partial directory"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert partial.is_dir() and not (tmp_path / "X").exists()  # litter, and no half-written export

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".Y.partial-{live.pid}"
        busy.mkdir()

        def fail_at_once(spec, *args, **kwargs):  # the later export stops at its first graph
            raise AdaFocusError("injected failure")

        monkeypatch.setattr(exporter, "export_graph", fail_at_once)
        said = []
        with pytest.raises(AdaFocusError, match="injected"):
            exporter.export_model(
                build_model(get_preset("demo")),
                tmp_path / "Z",
                class_names=[str(i) for i in range(10)],
                weights={"source": "random"},
                log=said.append,
            )
        assert not partial.exists() and busy.is_dir()
        assert any(str(partial) in line and "killed" in line for line in said)
        assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name]
    finally:
        live.kill()
        live.wait()


def test_cli_refuses_an_existing_directory_without_force(exported):
    result = CliRunner().invoke(cli.export, ["--out", str(exported("demo").path)])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--force" in result.output


def test_cli_corrupt_and_foreign_checkpoints_give_one_clear_error(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(builtin_checkpoint().read_bytes()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"something.weight": torch.zeros(3)}, foreign)
    for path, message in [(corrupt, "is not a PyTorch checkpoint"), (foreign, "plain state dict with no preset")]:
        result = CliRunner().invoke(cli.export, ["--checkpoint", str(path), "--out", str(tmp_path / "x")])
        assert result.exit_code == 1, result.output
        assert message in result.output and str(path) in result.output
        assert "Traceback" not in result.output
    result = CliRunner().invoke(
        cli.export, ["--checkpoint", str(foreign), "--preset", "demo", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1 and "something.weight" in result.output
    assert not (tmp_path / "x").exists()


def test_cli_trt_without_tensorrt_stops_before_any_work(tmp_path):
    pytest.importorskip("adafocus.export.tensorrt")
    from adafocus.export.tensorrt import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present: --trt works here (tests/test_tensorrt.py)")
    result = CliRunner().invoke(cli.export, ["--trt", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--trt" in result.output and "drop --trt" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8:4:16", "is not MIN <= OPT <= MAX"),
        ("1:8", "is not MIN:OPT:MAX"),
        ("2:8:16", "starts at 2; the early-exit loop calls every graph with as few as one video"),
    ],
)
def test_cli_batch_range_is_checked(value, message):
    result = CliRunner().invoke(cli.export, ["--trt", "--batch-range", value])
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_batch_range_from_above_one_is_refused_before_any_work(tmp_path):
    from adafocus.export.aoti import compile_packages

    with pytest.raises(AdaFocusError, match="use --batch-range 1:8:16"):
        exporter.export_model(
            build_model(get_preset("demo")),
            tmp_path / "x",
            class_names=[str(i) for i in range(10)],
            weights={"source": "random"},
            batch_range=(2, 8, 16),
        )
    with pytest.raises(AdaFocusError, match="use --batch-range 1:8:16"):
        compile_packages(tmp_path / "no-export", batch_range=(2, 8, 16))
    assert not any(tmp_path.iterdir())


def test_a_manifest_holding_nan_is_refused_as_not_strict_json(demo_copy):
    path = demo_copy / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["tolerance"]["max_rel_error"] = float("nan")
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")  # Python writes NaN unless told not to
    with pytest.raises(AdaFocusError, match="holds NaN, not strict JSON") as caught:
        open_export(demo_copy)
    assert "adafocus-export" in caught.value.fix


def test_a_change_that_cannot_be_sealed_leaves_the_export_readable(demo_copy):
    from adafocus.errors import InternalError
    from adafocus.files import partial_path

    staged = partial_path(demo_copy / "extra.bin")
    staged.write_bytes(b"new file")
    before = open_export(demo_copy).manifest
    with pytest.raises((AdaFocusError, InternalError), match="non-finite|NaN"):
        update_manifest(
            demo_copy,
            lambda m: m.update(calibration={"note": float("nan")}),
            new_files={"extra.bin": staged},
            drop_files=["dense.onnx"],
        )
    assert open_export(demo_copy).manifest == before  # nothing moved, nothing deleted
    assert (demo_copy / "dense.onnx").is_file() and not (demo_copy / "extra.bin").exists()


def test_validation_refuses_an_output_holding_nan():
    """An engine whose output holds NaN must fail validation: `nan > rtol` is False, and max() then
    recorded an error of 0.0 for it."""
    from adafocus.export.validate import compare_outputs

    torch.manual_seed(0)
    model = build_model(get_preset("demo")).eval()
    spec = graph_specs(model)["local"]
    case = Case("random, batch 2", spec.random_inputs(2, torch.Generator().manual_seed(0)))

    def run(inputs):
        with torch.no_grad():
            features = spec.module(*inputs).numpy().copy()
        features[0, 0] = np.nan
        return [features]

    with pytest.raises(AdaFocusError, match="output 'features'.*relative error nan"):
        compare_outputs(spec, run, [case], model.preset, 1e-4, engine="test")


def test_force_replaces_only_an_export_or_an_empty_folder(tmp_path):
    """--force on a mistyped --out (a project folder) deleted everything in it after the export."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me", encoding="utf-8")
    plain_file = tmp_path / "file.txt"
    plain_file.write_text("keep me too", encoding="utf-8")
    for out in (folder, plain_file):
        refused = r"is not an adafocus export \(it holds (notes.txt|a file, not a folder)\); --force replaces only"
        with pytest.raises(AdaFocusError, match=refused):
            exporter.export_model(
                build_model(get_preset("demo")),
                out,
                class_names=[str(i) for i in range(10)],
                weights={"source": "random"},
                force=True,
                log=lambda _: None,
            )
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert plain_file.read_text(encoding="utf-8") == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "project"]
    # what a damaged export holds is still replaced (the built-in cache rebuilds such an entry)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("glance.onnx", "model.pt", "manifest.schema.json", "glance.aoti-cpu-fp32.pt2", ".x.partial-1"):
        (damaged / name).write_bytes(b"")
    assert exporter._not_of_an_export(damaged) is None


def test_an_out_that_cannot_be_created_is_one_clear_error(tmp_path):
    (tmp_path / "afile").write_text("", encoding="utf-8")
    result = CliRunner().invoke(cli.export, ["--out", str(tmp_path / "afile" / "x")])
    assert result.exit_code == 1, result.output
    assert "cannot create the export directory" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--precision", "fp32"], "--precision does nothing without --trt or --aoti"),
        (["--batch-range", "1:8:8"], "--batch-range does nothing without --trt or --aoti"),
        (["--device", "cuda"], "--device does nothing without --aoti or --triton-repo"),
        (["--triton-backend", "pytorch"], "--triton-backend does nothing without --triton-repo"),
        (["--seed", "3"], "--seed does nothing with trained weights"),
    ],
)
def test_cli_refuses_options_it_would_ignore(tmp_path, args, named):
    result = CliRunner().invoke(cli.export, [*args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and named in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_cli_into_refuses_the_options_of_a_fresh_export(tmp_path):
    result = CliRunner().invoke(
        cli.export, ["--into", str(tmp_path), "--aoti", "--preset", "demo", "--out", str(tmp_path / "x"), "--no-dense"]
    )
    assert result.exit_code == 1, result.output
    assert "--preset, --out and --no-dense do nothing with --into" in result.output, result.output


def test_an_export_without_the_dense_graph_refuses_each_use_of_it_before_any_work(exported, tmp_path):
    """`--no-dense` leaves out what adafocus-bench compares with, nothing the loop needs (test_runtime and
    test_protocol run this export's loop): each use of the dense graph names the fix, before any work."""
    from adafocus import bench
    from adafocus.data.synthetic import SyntheticTask, TaskVideos
    from adafocus.export.aoti import compile_packages
    from adafocus.quantize.int8 import quantize_export

    export = exported("activitynet-p96")
    assert not export.has_graph("dense") and not (export.path / "dense.onnx").exists()
    files = {p.name: p.stat().st_mtime_ns for p in export.path.iterdir()}
    videos = TaskVideos(SyntheticTask.for_preset(export.preset, seed=0), "val", 2)
    uses = {
        "bench": lambda: bench.run(export, batch=1, log=pytest.fail),  # fails the test if it logs any work
        "gflops": lambda: export.dense_gflops,
        "int8": lambda: quantize_export(export.path, videos, graphs=("glance", "dense")),
        "aoti": lambda: compile_packages(export.path, dense=True, log=pytest.fail),
    }
    for use, call in uses.items():
        with pytest.raises(AdaFocusError) as caught:
            call()
        assert caught.value.what.startswith(f"{export.path} has no dense graph"), (use, caught.value)
        assert caught.value.fix == "re-export it without --no-dense", (use, caught.value)
    result = CliRunner().invoke(cli.calibrate, [str(export.path), "--int8", "--int8-graphs", "glance,dense"])
    assert result.exit_code == 1 and "has no dense graph" in result.output, result.output
    assert "re-export it without --no-dense" in result.output and "calibrat" not in result.output.lower()
    assert {p.name: p.stat().st_mtime_ns for p in export.path.iterdir()} == files  # nothing written


def test_cli_refuses_a_non_empty_triton_repo_before_exporting(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "other_model").mkdir()
    result = CliRunner().invoke(cli.export, ["--triton-repo", str(repo), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "is not empty" in result.output, result.output
    assert not (tmp_path / "x").exists()  # refused before the export, not after it
