import functools
import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from adafocus.calibration import (
    ALWAYS,
    NEVER,
    budget_table,
    calibrate_export,
    exit_proportions,
    exit_steps,
    simulate,
    solve_thresholds,
    thresholds_for_budget,
    thresholds_from_json,
    thresholds_to_json,
)
from adafocus.cli.calibrate import calibrate
from adafocus.data.synthetic import SyntheticTask
from adafocus.errors import AdaFocusError
from adafocus.export.manifest import open_export
from adafocus.runtime import Runtime
from conftest import strict_loads

INF = math.inf


# the solver on hand-made numbers ----------------------------------------------------------------
def test_exit_proportions():
    assert exit_proportions(1.0, 3).tolist() == [0.25, 0.25, 0.25, 0.25]
    q = exit_proportions(2.0, 2)
    assert np.allclose(q, np.array([1, 2, 4]) / 7)
    assert np.allclose(exit_proportions(1e3, 40).sum(), 1.0)  # no overflow


def test_hand_made_thresholds():
    # 10 samples, K = 2, q = (0.3, 0.4, 0.3): exit 0 takes 3, exit 1 takes 4, exit 2 the last 3
    e0 = [1.0, 0.25, 2.0, 0.5, 1.5, 0.125, 1.75, 0.75, 1.25, 2.25]
    # step 1: samples 1, 3, 5 (taken at step 0) get the lowest entropies: they must be ignored
    e1 = [1.5, 0.0, 0.5, 0.0, 1.0, 0.0, 0.25, 2.0, 0.75, 1.25]
    E = np.array([e0, e1, [9.0] * 10]).T
    thresholds = solve_thresholds(E, [0.3, 0.4, 0.3])
    # step 0 sorted: 0.125 0.25 0.5 | 0.75 ...          -> midway (0.5 + 0.75) / 2
    # step 1, samples left {0,2,4,6,7,8,9}: 0.25 0.5 0.75 1.0 | 1.25 1.5 2.0 -> (1.0 + 1.25) / 2
    assert thresholds.tolist() == [0.625, 1.125, INF]
    assert exit_steps(E, thresholds).tolist() == [2, 0, 1, 0, 1, 0, 1, 2, 1, 2]


def test_ties_take_fewer_samples():
    E = np.array([[0.25, 0.5, 0.5, 0.75], [1.0] * 4]).T
    # quota 2, but the 2nd and 3rd are tied at 0.5: only the one below the tie is taken
    assert solve_thresholds(E, [0.5, 0.5]).tolist() == [0.375, INF]
    # all tied: nothing can be taken, threshold -inf
    assert solve_thresholds(np.full((4, 2), 0.5), [0.5, 0.5]).tolist() == [-INF, INF]
    # neighbouring float32 values have nothing between them: a tie too
    lo = np.float32(1.0)
    hi = np.nextafter(lo, np.float32(2.0))
    E = np.array([[0.5, lo, hi, 1.5], [1.0] * 4], dtype=np.float32).T
    thr = solve_thresholds(E, [0.5, 0.5])
    assert thr.tolist() == [0.75, INF]
    assert np.bincount(exit_steps(E, thr), minlength=2).tolist() == [1, 3]


def test_all_remaining_and_none():
    E = np.array([[0.5, 0.25, 1.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]).T
    assert solve_thresholds(E, [1.0, 0.0, 0.0]).tolist() == [INF, -INF, INF]
    assert solve_thresholds(E, [0.0, 0.0, 1.0]).tolist() == [-INF, -INF, INF]


@functools.cache
def random_outputs(n=1000, exits=5, seed=0):
    rng = np.random.default_rng(seed)
    E = rng.random((n, exits)).astype(np.float32) * 2.3
    E[:, 1:] -= np.linspace(0, 0.6, exits - 1, dtype=np.float32)  # later exits more confident
    C = rng.random((n, exits)) < np.linspace(0.2, 0.6, exits)
    cost = np.linspace(0.1, 0.5, exits)
    return E, C, cost


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 1.7, 6.0])
def test_realised_fractions_match_quotas(p):
    E, C, cost = random_outputs()
    n, exits = E.shape
    for k in range(exits):
        assert len(np.unique(E[:, k])) == n  # no ties
    q = exit_proportions(p, exits - 1)
    expected = np.floor(n * q[:-1]).astype(int)
    expected = [*expected, n - expected.sum()]
    thresholds = solve_thresholds(E, q)
    outcome = simulate(E, C, cost, thresholds)
    assert outcome.exit_counts.tolist() == expected
    assert outcome.gflops == pytest.approx(float(np.dot(expected, cost)) / n)
    # no calibration sample sits on a finite threshold
    finite = np.isfinite(thresholds[:-1])
    assert (E[:, :-1][:, finite] != thresholds[:-1][finite].astype(np.float32)).all()


def check_monotone(table):
    gflops = [e["gflops"] for e in table]
    accuracy = [e["accuracy"] for e in table]
    assert gflops == sorted(gflops) and len(set(gflops)) == len(gflops)
    assert all(b >= a for a, b in zip(accuracy, accuracy[1:]))


def test_budget_thresholds_fit_the_budget_even_on_one_video():
    cost = [2.0, 18.0, 34.0]  # a budget between two steps' costs (sthsth-v1: 2.4, 18.9, 34.9)
    one = np.array([[1.5, 1.0, 0.5]])
    thresholds, realised = thresholds_for_budget(one, cost, 14.0)
    assert realised == 2.0 and exit_steps(one, thresholds).tolist() == [0]
    many = np.random.default_rng(0).uniform(0, 3, size=(128, 3))
    thresholds, realised = thresholds_for_budget(many, cost, 14.0)
    assert 12.0 < realised <= 14.0  # a mix of exits, as close to the budget as the sweep gets
    assert simulate(many, np.zeros(many.shape, bool), cost, thresholds).gflops == realised
    with pytest.raises(AdaFocusError) as caught:
        thresholds_for_budget(one, cost, 1.5)
    assert "ask for at least 2.000" in caught.value.fix


def test_table_is_monotone_and_spans_the_range():
    E, C, cost = random_outputs()
    table = budget_table(E, C, cost)
    assert len(table) >= 5
    check_monotone(table)
    assert table[0]["exit_fractions"][0] > 0.9  # nearly all exit at the glance
    full = budget_table(E, C, cost, ps=[1e-3, 1e3])
    assert full[-1]["exit_fractions"][-1] > 0.99  # nearly all use K cubes
    for entry in table:
        assert math.isclose(sum(entry["exit_fractions"]), 1.0)
        assert simulate(E, C, cost, entry["thresholds"]).gflops == entry["gflops"]


def test_infinities_round_trip_through_json():
    thresholds = [-INF, 0.625, INF, -INF, INF]
    text = json.dumps(thresholds_to_json(thresholds), allow_nan=False)
    assert json.loads(text) == [NEVER, 0.625, ALWAYS, NEVER, ALWAYS]
    assert thresholds_from_json(json.loads(text)) == thresholds
    assert thresholds_from_json([None, 1.0]) == [-INF, 1.0]
    E, C, cost = random_outputs()
    mixed = [-INF, 0.8, INF, -INF, INF]
    assert (exit_steps(E, mixed) == exit_steps(E, thresholds_to_json(mixed))).all()


# a real export ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_task(exported):
    return SyntheticTask(exported("demo").preset, seed=0)


def test_calibrate_export_and_runtime_agree(exported, demo_task, tmp_path):
    target = tmp_path / "demo"
    shutil.copytree(exported("demo").path, target)
    heldout = demo_task.batch("test", range(96))
    result = calibrate_export(target, demo_task.batch("val", range(96)), heldout, progress=False)

    export = open_export(target)  # hashes and schema still valid
    budgets = export.manifest["budgets"]
    assert budgets == result.table and len(budgets) >= 3
    check_monotone(budgets)
    assert export.manifest["thresholds"] == budgets[result.default]["thresholds"]
    cal = result.calibration
    for entry in budgets:  # the table is what the thresholds do on the calibration videos
        outcome = simulate(cal.entropy, cal.correct, export.exit_gflops, entry["thresholds"])
        assert (outcome.accuracy, outcome.gflops) == (entry["accuracy"], entry["gflops"])

    runtime = Runtime.load(target)
    assert runtime.thresholds.tolist() == budgets[result.default]["thresholds"]
    for i, entry in enumerate(budgets):  # set_budget(B) = the last entry that fits
        above = budgets[i + 1]["gflops"] if i + 1 < len(budgets) else entry["gflops"] + 1
        for budget in (entry["gflops"], (entry["gflops"] + above) / 2):
            assert runtime.set_budget(budget) is not None
            assert runtime.thresholds.tolist() == entry["thresholds"]
    with pytest.raises(AdaFocusError, match="no calibrated operating point"):
        runtime.set_budget(budgets[0]["gflops"] * 0.99)

    videos, labels = heldout
    held = result.heldout

    def margins(entry) -> np.ndarray:  # per video: how near a threshold the loop's comparisons come
        thr, steps = thresholds_from_json(entry["thresholds"]), exit_steps(held.entropy, entry["thresholds"])
        reached = [range(min(steps[i] + 1, 4)) for i in range(96)]  # the comparisons made before step K
        return np.array([min(abs(float(held.entropy[i, k]) - thr[k]) for k in reached[i]) for i in range(96)])

    # backend rounding (~1e-6) can flip an exit whose entropy lies that close to its threshold: the
    # retrained demo's entropies crowd ln 10 (2.3026) before the second cube, where most searched
    # thresholds fall within 1e-5 of some held-out video. Every entry's videos that are 1e-5 clear
    # must exit and answer as calibration says; entries with all videos clear, the default among
    # them, must reproduce its held-out figures exactly.
    clear = {}  # index in the table -> the loop's output, for the entries with every video clear
    for i, entry in enumerate(budgets):
        runtime.set_thresholds(entry["thresholds"])
        out, far = runtime.predict(videos), margins(entry) > 1e-5
        assert far.mean() > 0.8, f"{entry} lies within 1e-5 of {int((~far).sum())} held-out videos"
        expected = exit_steps(held.entropy, entry["thresholds"])
        assert (out.exit_step[far] == expected[far]).all()
        assert (out.prediction[far] == held.predictions[far, expected[far]]).all()
        if far.all():
            clear[i] = out
    assert 0 in clear and result.default in clear and len(clear) >= 3
    for i in (min(clear), sorted(clear)[len(clear) // 2], result.default):
        entry, out = budgets[i], clear[i]
        expected = exit_steps(held.entropy, entry["thresholds"])
        assert out.exit_step.tolist() == expected.tolist()
        assert float((out.prediction == labels.numpy()).mean()) == entry["heldout_accuracy"]
        assert float(out.gflops.mean()) == pytest.approx(entry["heldout_gflops"], rel=1e-12)
        assert np.bincount(out.exit_step, minlength=5).tolist() == [
            round(f * 96) for f in entry["heldout_exit_fractions"]
        ]


def test_cli_writes_budgets_and_plot(exported, tmp_path):
    target = tmp_path / "demo"
    shutil.copytree(exported("demo").path, target)
    png = tmp_path / "curve.png"
    runner = CliRunner()
    args = [str(target), "--videos", "32", "--heldout", "16", "--batch-size", "32", "--plot", str(png), "--json"]
    result = runner.invoke(calibrate, args)
    assert result.exit_code == 0, result.output
    report = strict_loads(result.stdout)
    assert report["seed"] == 0 and report["accuracy_meaningful"] is True  # found the demo's training record
    assert report["calibration_videos"] == 32 and report["heldout_videos"] == 16
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    budgets = open_export(target).manifest["budgets"]
    assert budgets == report["budgets"]
    assert len(report["baselines"]["fixed_cubes"]) == 5
    assert len(report["baselines"]["random_exit"]) == len(budgets)

    text = runner.invoke(calibrate, [str(target), "--videos", "8", "--heldout", "0", "--max-drop", "1"])
    assert text.exit_code == 0, text.output
    assert "budget" in text.stdout and "wrote" in text.stdout
    assert open_export(target).manifest["calibration"]["calibration_videos"] == 8
    bad = runner.invoke(calibrate, [str(tmp_path), "--videos", "8"])
    assert bad.exit_code == 1 and "manifest.json" in bad.output


def test_table_shows_a_dash_where_the_cost_has_no_spread():
    """A budget whose held-out videos all exit at one step has a standard error of float noise
    (~1e-19): diff/se would print ~-1.7e15; the table prints a dash instead."""
    from adafocus.calibration.report import format_table

    def entry(gflops, se, diff):
        return {
            "gflops": gflops,
            "accuracy": 0.2,
            "heldout_accuracy": 0.21,
            "heldout_gflops": gflops + diff,
            "heldout_gflops_stderr": se,
            "heldout_gflops_minus_budget": diff,
            "exit_fractions": [1.0, 0.0],
        }

    report = {
        "preset": "demo",
        "export": "x",
        "calibration_videos": 10,
        "calibration_split": "val",
        "heldout_videos": 10,
        "heldout_split": "test",
        "seed": 0,
        "exit_gflops": [0.029, 0.05],
        "calibration_accuracy_per_step": [0.2, 0.3],
        "heldout_accuracy_per_step": [0.21, 0.31],
        "budgets": [entry(0.0290, 2.1e-19, -3.5e-4), entry(0.0400, 8e-4, 6e-4)],
        "default_entry": 1,
        "default_rule": "cheapest entry within 0.01 of the best calibration accuracy",
    }
    rows = [line for line in format_table(report).splitlines() if "0.0290 " in line or "0.0400 " in line]
    assert len(rows) == 2
    assert "—" in rows[0] and "e+" not in rows[0]
    assert "0.75" in rows[1] and "—" not in rows[1]  # 6e-4 / 8e-4


def test_the_search_front_lies_on_or_above_every_fixed_msdnet_and_one_eta_point():
    """A weak glance whose entropy says nothing (as the demo's): MSDNet's q_k ∝ p^k always sends some
    videos out at the glance, while "every video uses one cube" is a threshold setting too, and so is
    one η for every step. The search fits on one half of the videos and chooses on the other, so the
    comparison is there."""
    from adafocus.calibration.thresholds import (
        MIN_SPLIT,
        fixed_cubes_thresholds,
        search_table,
        selection_halves,
        shared_thresholds,
    )

    rng = np.random.default_rng(0)
    n, exits = 1000, 5
    correct = rng.random((n, exits)) < np.array([0.15, 0.30, 0.37, 0.40, 0.48])
    entropies = (2 * rng.random((n, exits)) - 0.8 * correct * (np.arange(exits) > 0)).astype(np.float32)
    cost = [0.03, 0.05, 0.07, 0.09, 0.11]
    assert n >= MIN_SPLIT
    fit, check = selection_halves(n)
    assert len(fit) + len(check) == n and not set(fit) & set(check)
    E, C = entropies[check], correct[check]
    search = search_table(entropies, correct, cost)
    msdnet_thresholds = [e["thresholds"] for e in budget_table(entropies[fit], correct[fit], cost)]
    fixed_thresholds = [fixed_cubes_thresholds(t, exits - 1) for t in range(exits)]
    fixed_thresholds += shared_thresholds(entropies[fit])
    msdnet = [simulate(E, C, cost, t) for t in msdnet_thresholds]
    fixed = [simulate(E, C, cost, t) for t in fixed_thresholds]

    def best(front, budget):
        return max(e["accuracy"] for e in front if e["gflops"] <= budget + 1e-12)

    for outcome, thresholds in zip(msdnet + fixed, msdnet_thresholds + fixed_thresholds):
        assert best(search, simulate(entropies, correct, cost, thresholds).gflops) >= outcome.accuracy
    # more than MSDNet's family can express: strictly above it at many costs
    wins = [
        best(search, simulate(entropies, correct, cost, t).gflops) > o.accuracy
        for o, t in zip(msdnet, msdnet_thresholds)
    ]
    assert sum(wins) >= 5
    for e in search:  # every entry's accuracy is its thresholds' on the other half, its cost on all videos
        outcome = simulate(E, C, cost, e["thresholds"])
        assert e["accuracy"] == outcome.accuracy
        assert e["gflops"] == simulate(entropies, correct, cost, e["thresholds"]).gflops
        assert all(t in (ALWAYS, NEVER) or float(np.float32(t)) == t for t in e["thresholds"])
    assert [e["accuracy"] for e in search] == sorted({e["accuracy"] for e in search})  # a front


def test_the_search_fits_and_chooses_on_the_same_videos_only_when_few():
    from adafocus.calibration.thresholds import MIN_SPLIT, search_table

    rng = np.random.default_rng(1)
    n, exits = MIN_SPLIT - 1, 3
    correct = rng.random((n, exits)) < 0.5
    entropies = rng.random((n, exits)).astype(np.float32)
    cost = [0.03, 0.05, 0.07]
    for e in search_table(entropies, correct, cost):  # all videos: budget-bound entries keep their budget
        outcome = simulate(entropies, correct, cost, e["thresholds"])
        assert (outcome.gflops, outcome.accuracy) == (e["gflops"], e["accuracy"])
        assert e["gflops"] <= e.get("budget", np.inf) + 1e-12


def test_one_heldout_video_has_no_standard_error(exported, tmp_path):
    """A held-out set of one video is legal: its mean cost has no standard error (JSON null), the
    manifest is written and the table prints a dash where diff/se would be."""
    from adafocus.calibration.calibrate import StepOutputs
    from adafocus.calibration.report import format_table

    target = shutil.copytree(exported("demo").path, tmp_path / "demo")
    exits, classes = len(exported("demo").exit_gflops), len(exported("demo").class_names)
    rng = np.random.default_rng(0)

    def outputs(n):
        entropy = rng.uniform(0, 1, (n, exits)).astype(np.float32)
        return StepOutputs(entropy, rng.integers(0, classes, (n, exits)), rng.integers(0, classes, n))

    info = {"calibration_split": "val", "heldout_split": "test", "seed": 0}
    result = calibrate_export(target, outputs(50), outputs(1), progress=False, info=info)
    assert all(e["heldout_gflops_stderr"] is None for e in open_export(target).budgets)
    report = result.to_dict() | {"calibration_videos": 50, "heldout_videos": 1, "default_rule": "x"}
    rows = [line for line in format_table(report).splitlines() if line[:1] in ("*", " ") and "%" in line]
    assert rows and all("—" in row for row in rows)


def test_a_budget_of_exactly_the_glance_cost_is_met():
    """The mean of n equal costs can be an ulp above that cost: the glance's own cost still fits."""
    x, n = 8.458234303550809, 1372
    assert np.full(n, x).mean() > x  # the rounding that refused it
    E = np.random.default_rng(0).uniform(0, 1, (n, 3)).astype(np.float32)
    thresholds, realised = thresholds_for_budget(E, [x, x + 1, x + 2], x)
    assert exit_steps(E, thresholds).tolist() == [0] * n and realised == pytest.approx(x, rel=1e-12)
    cost = [0.0288, 0.0504, 0.0710]  # the demo's glance: the error's advice must itself be accepted
    with pytest.raises(AdaFocusError) as caught:
        thresholds_for_budget(E, cost, 0.02)
    assert "ask for at least 0.029" in caught.value.fix
    assert 0.0288 <= thresholds_for_budget(E, cost, 0.029)[1] <= 0.029


def test_labels_outside_the_classes_are_refused_before_any_work(exported, demo_task, tmp_path, monkeypatch):
    import torch

    from adafocus.calibration import calibrate as calibrate_module

    def ran(*args, **kwargs):
        raise AssertionError("the model ran before the labels were checked")

    monkeypatch.setattr(calibrate_module, "adaptive_inference", ran)
    target = shutil.copytree(exported("demo").path, tmp_path / "demo")
    videos, labels = demo_task.batch("val", range(8))
    for bad, metric in ((999, "accuracy"), (-1, "map"), (10, "map")):
        wrong = labels.clone()
        wrong[5] = bad
        with pytest.raises(AdaFocusError, match=f"video 5 has label {bad}, not one of the model's 10 classes"):
            calibrate_export(target, (videos, wrong), progress=False, metric=metric)
    with pytest.raises(AdaFocusError, match="multi-hot labels have 3 columns, the model 10 classes"):
        calibrate_module.collect(exported("demo"), videos, torch.zeros(8, 3, dtype=torch.bool), progress=False)
    assert open_export(target).calibration is None  # nothing written
    monkeypatch.undo()  # batches: each checked before it runs, its videos named by their place in the set
    batches = [(videos[:4], labels[:4]), (videos[4:], torch.full_like(labels[4:], 999))]
    with pytest.raises(AdaFocusError, match="video 4 has label 999"):
        calibrate_module.collect(exported("demo"), batches, progress=False)


def test_a_nan_video_is_named_by_its_index_in_the_set(exported, demo_task):
    from adafocus.calibration.calibrate import collect

    videos, labels = demo_task.batch("val", range(12))
    videos[10] = float("nan")
    with pytest.raises(AdaFocusError, match=r"videos \[10\]"):  # one array: checked before any batch runs
        collect(exported("demo"), videos, labels, batch_size=8, progress=False)
    batches = [(videos[:8], labels[:8]), (videos[8:], labels[8:])]  # batches: the second's offset is 8
    with pytest.raises(AdaFocusError, match=r"videos \[10\]"):
        collect(exported("demo"), batches, progress=False)


def test_an_engine_of_another_export_is_refused(exported, demo_task, tmp_path):
    """Thresholds computed by another model's graphs must not be written into this export."""
    import torch

    from adafocus.calibration.calibrate import collect
    from adafocus.export.manifest import update_manifest
    from adafocus.files import partial_path
    from adafocus.model.checkpoint import load_checkpoint, save_checkpoint

    demo = exported("demo")
    target = shutil.copytree(demo.path, tmp_path / "demo")
    other = shutil.copytree(demo.path, tmp_path / "other")  # the same graphs, other weights
    loaded = load_checkpoint(demo.model_path)
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1.0)
    staged = partial_path(other / "model.pt")
    save_checkpoint(staged, loaded.model, loaded.class_names)
    update_manifest(other, lambda m: None, new_files={"model.pt": staged})
    videos, labels = demo_task.batch("val", range(4))
    engine = Runtime.load(other, "onnxruntime", threads=1)
    with pytest.raises(AdaFocusError, match="whose weights or graphs are not those of"):
        calibrate_export(target, (videos, labels), engine=engine, progress=False)
    with pytest.raises(AdaFocusError, match="whose weights or graphs are not those of"):
        collect(target, videos, labels, engine=engine, progress=False)
    assert open_export(target).calibration is None
    own = Runtime.load(shutil.copytree(target, tmp_path / "copy"), "onnxruntime", threads=1)  # same files: same model
    assert len(collect(target, videos, labels, engine=own, progress=False)) == 4
