"""The demo model that ships inside the package (src/adafocus/weights/)."""

import pytest
from click.testing import CliRunner

from adafocus.cli import main
from adafocus.data.synthetic import SyntheticTask
from adafocus.model import load_checkpoint
from adafocus.train.trainer import accuracy_per_step
from adafocus.weights import DEMO, DEMO_PIXEL, builtin_checkpoint
from conftest import strict_loads


@pytest.fixture(scope="module")
def demo():
    return load_checkpoint(builtin_checkpoint(DEMO))


@pytest.fixture(scope="module")
def heldout(demo):
    """The recorded held-out set and the accuracy after t cubes measured on it now."""
    recorded = demo.meta["heldout"]
    task = SyntheticTask(demo.preset, seed=demo.meta["train_config"]["seed"])
    return task, recorded, accuracy_per_step(demo.model, task, recorded["split"], recorded["videos"])


# the training time each checkpoint was allowed on 2 CPU cores (README, "The built-in demo model")
TRAINING_BUDGET_S = {DEMO: 60 * 60, DEMO_PIXEL: 15 * 60}


@pytest.mark.parametrize("name", [DEMO, DEMO_PIXEL])
def test_builtin_checkpoints_are_small_and_documented(name):
    path = builtin_checkpoint(name)
    assert path.stat().st_size <= 5 * 2**20
    loaded = load_checkpoint(path)
    assert loaded.preset.name == "demo" and loaded.report.complete
    assert loaded.meta["command"].startswith("adafocus train --preset demo")
    assert loaded.meta["train_seconds"] <= TRAINING_BUDGET_S[name]


def test_demo_reproduces_its_recorded_heldout_accuracy(heldout):
    _, recorded, measured = heldout
    assert measured == pytest.approx(recorded["accuracy_per_step"], abs=0.01)


def test_learned_policy_beats_a_random_one(demo, heldout):
    task, recorded, learned = heldout
    random = accuracy_per_step(demo.model, task, recorded["split"], recorded["videos"], policy="random")
    assert learned[1] >= random[1] + 0.10  # after one cube, where the policy matters most
    assert learned[-1] >= random[-1] + 0.05
    assert learned[0] == random[0]  # the glance does not depend on the policy


def test_evaluate_cli_json(demo):
    result = CliRunner().invoke(main, ["evaluate", "--videos", "64", "--json"])
    assert result.exit_code == 0, result.output
    data = strict_loads(result.stdout)  # the progress bar goes to stderr
    steps = data["accuracy_per_step"]
    assert set(steps) == {"learned", "random", "pixel"}
    assert all(len(steps[k]) == demo.preset.num_exits for k in steps)
    assert [p["threshold"] for p in data["early_exit"]] == [0.8, 1.2, 1.6, 2.0]
    for point in data["early_exit"]:
        assert sum(point["exit_fractions"]) == pytest.approx(1.0)


def test_one_pass_evaluation_agrees_with_separate_passes(demo):
    from adafocus.train.evaluate import evaluate

    task = SyntheticTask(demo.preset, seed=0)
    results = evaluate(demo.model, task, split="val", count=96, thresholds=(1.6,))
    assert results["accuracy_per_step"]["learned"] == accuracy_per_step(demo.model, task, "val", 96)
    assert results["accuracy_per_step"]["random"] == accuracy_per_step(demo.model, task, "val", 96, policy="random")
    assert results["accuracy_per_step"]["pixel"] is None
    point = results["early_exit"][0]
    assert point["gflops"] < results["gflops_per_exit_step"][-1]  # some videos did exit early


def test_two_processes_building_a_cached_export_at_once_build_it_once(exported, tmp_path, monkeypatch):
    """Two commands started at once on a fresh cache: one builds, the other waits and reuses it, rather
    than building it again and replacing the directory under the first. (Threads stand in for the
    processes: each opens the lock file itself, and flock locks belong to the open file.)"""
    import shutil
    import threading
    import time

    from adafocus import builtin
    from adafocus.export.manifest import open_export

    monkeypatch.setenv("ADAFOCUS_CACHE", str(tmp_path))
    source = exported("demo").path  # made before the threads start
    builds = []

    def slow_export(model, target, **_):  # a real export, copied into place as slowly as a real build
        builds.append(target)
        time.sleep(1.0)
        shutil.copytree(source, f"{target}.partial-{threading.get_ident()}")
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(f"{target}.partial-{threading.get_ident()}", target)
        return open_export(target)

    monkeypatch.setattr(builtin, "export_model", slow_export)
    monkeypatch.setattr(builtin, "random_model", lambda preset, seed: None)
    got, errors = [], []

    def build():
        try:
            got.append(builtin.random_export("demo", log=lambda line: None).path)
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(got) == 2 and got[0] == got[1]
    assert len(builds) == 1, builds
