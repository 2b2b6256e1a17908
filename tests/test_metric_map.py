"""--metric map: mean average precision for multi-label sets (ActivityNet, FCVID), in the solvers,
calibration, evaluation and the runtime's choice of budget."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from adafocus.calibration.calibrate import StepOutputs, calibrate_export
from adafocus.calibration.thresholds import (
    MIN_SPLIT,
    MeanAveragePrecision,
    budget_table,
    exit_steps,
    mean_average_precision,
    search_table,
    selection_halves,
)
from adafocus.data.synthetic import SyntheticTask, TaskVideos
from adafocus.errors import AdaFocusError
from adafocus.runtime import Runtime
from adafocus.runtime.runtime import budget_entry


def test_mean_average_precision_by_hand():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.2, 0.3], [0.7, 0.3, 0.3], [0.6, 0.4, 0.3], [0.5, 0.5, 0.3]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]], bool)
    # class 0: positives at ranks 1, 3, 5 -> (1/1 + 2/3 + 3/5) / 3; class 1: its one positive ranked 4th
    # -> 1/4; class 2 has no positive and is not averaged
    expected = ((1 + 2 / 3 + 3 / 5) / 3 + 1 / 4) / 2
    assert mean_average_precision(scores, targets) == pytest.approx(expected, abs=1e-12)
    tied = np.array([[0.5], [0.5]])  # equal scores keep video order: the positive second ranks 2nd
    assert mean_average_precision(tied, np.array([[0], [1]], bool)) == pytest.approx(0.5)
    assert mean_average_precision(tied, np.array([[1], [0]], bool)) == pytest.approx(1.0)
    with pytest.raises(AdaFocusError, match="no video has a label"):
        mean_average_precision(scores, np.zeros_like(targets))


def official_style_map(scores, targets):
    """The official cal_map's loop (sort per class, precision where the truth is 1, divided by the
    positives), written out plainly, on a set where every class has a positive."""
    aps = []
    for k in range(scores.shape[1]):
        order = sorted(range(len(scores)), key=lambda i: -scores[i, k])
        hits, total = 0, 0.0
        for rank, i in enumerate(order, start=1):
            if targets[i, k]:
                hits += 1
                total += hits / rank
        aps.append(total / max(int(targets[:, k].sum()), 1))
    return float(np.mean(aps))


def random_step_outputs(n=300, exits=5, classes=6, seed=0) -> StepOutputs:
    """Multi-label outputs whose later exits are more confident and more often right."""
    rng = np.random.default_rng(seed)
    labels = rng.random((n, classes)) < 0.25
    labels[np.arange(n), rng.integers(0, classes, n)] = True  # every video has a label
    logits = rng.normal(size=(n, exits, classes)) + labels[:, None, :] * np.linspace(0.2, 3.0, exits)[None, :, None]
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    entropy = -(scores * np.log(scores)).sum(-1)
    return StepOutputs(entropy.astype(np.float32), scores.argmax(-1), labels, scores.astype(np.float32))


def test_matches_the_official_loop_and_counts_multi_label_hits():
    outputs = random_step_outputs()
    metric = outputs.metric("map")
    for t in range(5):
        assert metric(np.full(300, t)) == pytest.approx(official_style_map(outputs.scores[:, t], outputs.labels))
    rows = np.arange(300)
    top = outputs.scores.argmax(-1)
    assert outputs.correct.tolist() == [[bool(outputs.labels[i, top[i, t]]) for t in range(5)] for i in rows]
    per_step = metric.per_step()
    assert per_step[-1] > per_step[0]  # the task's later exits are better: the metric sees it
    single = StepOutputs(outputs.entropy, outputs.predictions, outputs.labels.argmax(1), outputs.scores)
    one_hot = np.eye(6, dtype=bool)[outputs.labels.argmax(1)]
    assert single.metric("map")(np.zeros(300, int)) == pytest.approx(official_style_map(outputs.scores[:, 0], one_hot))
    assert single.metric("accuracy") is None
    with pytest.raises(AdaFocusError, match="unknown metric"):
        single.metric("top5")


@pytest.mark.parametrize("table", ["msdnet", "search"])
def test_fronts_are_kept_by_map_measured_where_they_are_chosen(table):
    outputs = random_step_outputs()
    assert len(outputs) >= MIN_SPLIT  # the search chooses on the half it did not fit
    cost = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    metric = MeanAveragePrecision(outputs.scores, outputs.labels)
    solve = budget_table if table == "msdnet" else search_table
    front = solve(outputs.entropy, outputs.correct, cost, metric=metric)
    assert len(front) >= 3
    rows = np.arange(300) if table == "msdnet" else selection_halves(300)[1]
    for entry in front:
        steps = exit_steps(outputs.entropy[rows], entry["thresholds"])
        assert entry["map"] == pytest.approx(mean_average_precision(outputs.scores[rows, steps], outputs.labels[rows]))
    assert all(a["map"] < b["map"] and a["gflops"] <= b["gflops"] for a, b in zip(front, front[1:]))
    by_accuracy = solve(outputs.entropy, outputs.correct, cost)
    assert "map" not in by_accuracy[0]  # without a metric, nothing changes


def test_the_runtime_picks_a_budget_by_the_tables_metric():
    entries = [
        {"gflops": 1.0, "accuracy": 0.50, "map": 0.60, "thresholds": [1.0]},
        {"gflops": 2.0, "accuracy": 0.70, "map": 0.55, "thresholds": [2.0]},  # more accurate, lower mAP
    ]
    by_map = SimpleNamespace(budgets=entries, budget_metric="map")
    by_accuracy = SimpleNamespace(budgets=entries, budget_metric="accuracy")
    assert budget_entry(by_map, 2.5) is entries[0]
    assert budget_entry(by_accuracy, 2.5) is entries[1]


def test_calibrate_export_by_map_writes_it_and_the_runtime_reads_it(exported, tmp_path):
    target = shutil.copytree(exported("demo").path, tmp_path / "demo")
    task = SyntheticTask(exported("demo").preset, seed=0)
    result = calibrate_export(
        target, TaskVideos(task, "val", 96), TaskVideos(task, "test", 64), progress=False, metric="map"
    )
    report = result.to_dict()
    assert report["metric"] == "map" and result.export.budget_metric == "map"
    assert result.export.calibration["metric"] == "map"
    assert "mAP" in result.export.calibration["default_rule"]
    held = result.heldout
    for entry in result.table:  # every entry: its mAP on the held-out videos, recomputed here
        steps = exit_steps(held.entropy, entry["thresholds"])
        assert entry["heldout_map"] == pytest.approx(
            mean_average_precision(
                held.scores[np.arange(64), steps], np.eye(held.scores.shape[2], dtype=bool)[held.labels]
            )
        )
    assert [e["map"] for e in result.table] == sorted({e["map"] for e in result.table})
    assert len(report["calibration_map_per_step"]) == 5 and len(report["heldout_map_per_step"]) == 5
    assert all("map" in point for point in report["baselines"]["fixed_cubes"])
    runtime = Runtime.load(target)
    last = result.table[-1]
    runtime.set_budget(last["gflops"])
    assert runtime.thresholds.tolist() == last["thresholds"]


def test_the_commands_take_metric_map(demo_copy, tmp_path):
    from click.testing import CliRunner

    from adafocus.cli import main
    from conftest import strict_loads

    runner = CliRunner()
    args = ["calibrate", str(demo_copy), "--videos", "48", "--heldout", "32", "--metric", "map"]
    text = runner.invoke(main, [*args, "--cache", str(tmp_path / "cache.json")])
    assert text.exit_code == 0, text.output
    assert "cal mAP" in text.stdout and "held mAP" in text.stdout and "best calibration mAP" in text.stdout
    again = runner.invoke(main, [*args, "--cache", str(tmp_path / "cache.json"), "--json"])
    assert again.exit_code == 0, again.output
    assert "from " + str(tmp_path / "cache.json") in again.stderr  # the probabilities came back from the cache
    report = strict_loads(again.stdout)
    assert report["metric"] == "map" and all("heldout_map" in e for e in report["budgets"])
    evaluated = runner.invoke(
        main, ["evaluate", "--export", str(demo_copy), "--videos", "32", "--metric", "map", "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    measured = strict_loads(evaluated.stdout)
    assert measured["metric"] == "map" and len(measured["map_per_step"]) == 5
    # the same 32 test videos through ONNX Runtime: each budget's mAP as calibration measured it held out
    for entry, budget in zip(report["budgets"], measured["budgets"]):
        assert budget["map"] == pytest.approx(entry["heldout_map"], abs=1e-3)
    refused = runner.invoke(main, ["evaluate", "--metric", "map"])
    assert refused.exit_code == 1 and "--export" in refused.output


VIDEOS = 64


def test_a_multi_label_list_of_files_calibrates_and_evaluates_by_map(own_videos, demo_copy, tmp_path):
    """Real video files with several classes per video (`path 3;7`): calibrate and evaluate read them,
    and the multi-label hits (top class among the labels) are what `accuracy` counts."""
    from click.testing import CliRunner

    from adafocus.cli import main
    from adafocus.data.labelled import read_labelled, top1_hits
    from conftest import strict_loads

    lists = {}
    for split in ("val", "test"):  # the first VIDEOS of each split: enough for a table, quick to decode
        folder = own_videos[split].parent
        lines = [line.split() for line in own_videos[split].read_text(encoding="utf-8").splitlines()[1:]]
        lines = lines[:VIDEOS]
        # every third video also carries the next class
        rows = [
            f"{folder / name} {label};{(int(label) + 1) % 10}" if i % 3 == 0 else f"{folder / name} {label}"
            for i, (name, label) in enumerate(lines)
        ]
        lists[split] = tmp_path / f"{split}-multi.txt"
        lists[split].write_text("\n".join(rows) + "\n", encoding="utf-8")
    single_list = tmp_path / "test-single.txt"  # the same test videos with their one label
    single_list.write_text("".join(f"{folder / name} {label}\n" for name, label in lines), encoding="utf-8")
    names = [f"class_{i}" for i in range(10)]
    assert read_labelled(lists["val"], names).multi_label
    runner = CliRunner()
    args = ["calibrate", str(demo_copy), "--data", str(lists["val"]), "--heldout", str(lists["test"])]
    calibrated = runner.invoke(main, [*args, "--metric", "map", "--json"])
    assert calibrated.exit_code == 0, calibrated.output
    report = strict_loads(calibrated.stdout)
    assert report["metric"] == "map" and report["heldout_map_per_step"][-1] > 0.5  # the demo model reads them
    args = ["evaluate", "--export", str(demo_copy), "--data", str(lists["test"]), "--metric", "map", "--json"]
    evaluated = runner.invoke(main, args)
    assert evaluated.exit_code == 0, evaluated.output
    measured = strict_loads(evaluated.stdout)
    # a video within rounding (~1e-6) of a threshold can exit a step apart on ONNX Runtime and in the
    # PyTorch reference (the retrained demo's entropies crowd ln 10 before the second cube): one such
    # flip moves the mAP of 64 videos by ~0.02, so two entries may differ, by no more than that
    off = [abs(budget["map"] - entry["heldout_map"]) for entry, budget in zip(report["budgets"], measured["budgets"])]
    assert len(off) == len(report["budgets"]) and sum(d > 1e-3 for d in off) <= 2 and max(off) < 0.05, off
    for entry, budget in zip(report["budgets"], measured["budgets"]):
        assert budget["accuracy"] == pytest.approx(entry["heldout_accuracy"], abs=2 / VIDEOS)
    # a second label can only add hits: the multi-label accuracy is at least the single-label one
    single = runner.invoke(main, ["evaluate", "--export", str(demo_copy), "--data", str(single_list), "--json"])
    assert single.exit_code == 0, single.output
    assert measured["accuracy_per_step"][-1] >= strict_loads(single.stdout)["accuracy_per_step"][-1]
    hits = top1_hits(np.array([1, 2, 0]), np.array([[0, 1, 1], [0, 1, 0], [1, 0, 0]], bool))
    assert hits.tolist() == [True, False, True]
    assert top1_hits(np.array([[1, 2]]), np.array([2])).tolist() == [[False, True]]
