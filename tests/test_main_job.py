"""The README's main job, `adafocus-bench` with no arguments, as a newcomer runs it: it exports and
calibrates the built-in demo model on first use, measures, and writes its report to an untracked
folder, so the checkout (and its recorded results) are left as they were."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import strict_loads

REPO = Path(__file__).resolve().parents[1]


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _git_status() -> str | None:
    try:
        done = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def test_adafocus_bench_with_no_arguments_leaves_the_checkout_clean(tmp_path):
    command = Path(sys.executable).with_name("adafocus-bench")
    if not command.is_file():
        pytest.skip(f"{command} is not installed: install the project (README) to run its main job")
    recorded = _digests(REPO / "benchmarks" / "results")
    status = _git_status()
    env = {**os.environ, "ADAFOCUS_CACHE": str(tmp_path / "cache")}  # first use: export + calibrate
    done = subprocess.run([str(command)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]

    assert _digests(REPO / "benchmarks" / "results") == recorded  # recorded results untouched
    if status is not None:  # a git checkout: nothing new or modified that git would show
        assert _git_status() == status
    report_file = REPO / "adafocus-results" / "bench-demo-onnxruntime.json"
    assert f"wrote {report_file.relative_to(REPO)}" in done.stdout
    report = strict_loads(report_file.read_text(encoding="utf-8"))
    assert report["preset"] == "demo" and report["thresholds_from"] == "the export's default (calibrated) thresholds"
    assert report_file.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    (backend,) = report["backends"]
    assert set(backend["videos_per_s"]) == {
        "adaptive",
        "adaptive_stream",
        "adaptive_stream_batches",
        "dense",
        "torch_eager",
    }
    assert "calibrating exit thresholds" in done.stderr  # the built-in export was made on first use
