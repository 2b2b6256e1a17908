"""The built-in exports, made on first use and cached (`adafocus.files.cache_root()`):

- `demo_export()`: the shipped demo checkpoint exported and calibrated once (1000 + 1000 synthetic
  videos), the default of every command;
- `random_export(preset)`: random weights of a paper preset with measured BatchNorm statistics, for
  benchmarks where only speed and the exit mix matter.

A cached export is verified each time it is reused, and rebuilt (saying so) when it is damaged.
Which export a command runs by default is this application layer's decision; the runtime itself
only opens the path it is given.
"""

from __future__ import annotations

import contextlib
import sys
from importlib import metadata
from pathlib import Path

import torch

from adafocus.calibration.calibrate import calibrate_export
from adafocus.data.synthetic import TASK_ID, SyntheticTask, TaskVideos
from adafocus.errors import AdaFocusError
from adafocus.export.exporter import export_model
from adafocus.export.manifest import Export, ManifestEncodingError, open_export, sha256_file
from adafocus.files import cache_root
from adafocus.model import Preset, build_model, get_preset, load_checkpoint
from adafocus.model.batchnorm import measure_batchnorm
from adafocus.model.checkpoint import default_class_names
from adafocus.model.families import Model
from adafocus.weights import DEMO, DEMO_PIXEL, DEMO_SOURCE, builtin_checkpoint

REVISION = 9  # bump whenever the exporter's output changes, so stale cached exports are not reused
CALIBRATION_VIDEOS = 1000  # the built-in demo export's calibration and held-out sets
BATCHNORM_VIDEOS = 8


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _cached(name: str) -> Path:
    return cache_root() / "exports" / f"{name}-{metadata.version('adafocus-deploy')}-r{REVISION}"


def demo_export(log=_stderr) -> Export:
    """The built-in demo model, exported and calibrated (once; then the verified cache)."""
    checkpoint = builtin_checkpoint()
    digest = sha256_file(checkpoint)
    target = _cached(f"demo-{digest[:12]}")
    export = _reusable(target, "the built-in demo model", None)
    if export is not None and export.budgets:
        return export
    with _building(target):
        export = _reusable(target, "the built-in demo model", log)  # built by another process meanwhile?
        if export is None:
            log(f"exporting and calibrating the built-in demo model once, to {target}")
            loaded = load_checkpoint(checkpoint)
            export = export_model(
                loaded.model,
                target,
                class_names=loaded.class_names,
                weights={"source": DEMO_SOURCE, "sha256": digest},
                force=True,
                log=log,
            )
        return export if export.budgets else _calibrate(export, log)


def _reusable(target: Path, what: str, log) -> Export | None:
    """The cached export at `target` if it opens; None if there is none or it is damaged (said with
    `log`, unless None: a damaged entry is rebuilt)."""
    if not target.exists():
        return None
    try:
        return open_export(target)
    except ManifestEncodingError:  # not damage: deleting the cache would not help
        raise
    except AdaFocusError as e:
        if log is not None:
            log(f"re-exporting {what}: the cached export is unusable ({e.what})")
        return None


@contextlib.contextmanager
def _building(target: Path):
    """Held while one process builds, repairs or calibrates the cached export `target`: a second
    process (two commands started at once on a fresh cache, parallel test runs) waits here and then
    reuses what the first built, instead of building it again and replacing the directory (rmtree,
    rename) under the first one while that one reads it. Without fcntl (Windows): no lock."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(target.parent / f".{target.name}.lock", "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, or the process dies
        yield


def _calibrate(export: Export, log) -> Export:
    videos = CALIBRATION_VIDEOS
    log(f"calibrating exit thresholds on {videos} + {videos} held-out synthetic videos")
    task, seed, _ = task_for_export(export)
    info = {"task": "synthetic 'find the detail' videos", "seed": seed, "calibration_split": "val"}
    result = calibrate_export(export.path, TaskVideos(task, "val", videos), TaskVideos(task, "test", videos), info=info)
    chosen = result.table[result.default]
    log(
        f"default operating point: {chosen['gflops']:.4f} GFLOPs/video, "
        f"held-out accuracy {100 * chosen['heldout_accuracy']:.1f} %"
    )
    return result.export


def random_export(preset_name: str, seed: int = 0, log=_stderr) -> Export:
    """An export of `preset_name` with random weights (seed) and BatchNorm statistics measured on
    generated videos (`adafocus.model.batchnorm`), cached like the demo export."""
    preset = get_preset(preset_name)
    target = _cached(f"{preset.name}-random{seed}")
    export = _reusable(target, preset.name, None)
    if export is not None:
        return export
    with _building(target):
        export = _reusable(target, preset.name, log)  # built by another process meanwhile?
        if export is not None:
            return export
        log(f"measuring BatchNorm statistics of random {preset.name} weights on generated videos")
        model = random_model(preset, seed)
        return export_model(
            model,
            target,
            class_names=default_class_names(preset),
            weights={
                "source": "random",
                "seed": seed,
                "batchnorm": f"statistics of {BATCHNORM_VIDEOS} generated videos",
            },
            force=True,
            log=log,
        )


def random_model(preset: Preset, seed: int = 0) -> Model:
    """Random weights (seed) with BatchNorm statistics measured on generated videos, so that the
    activations have a working network's scale: what speed-only benchmarks run."""
    torch.manual_seed(seed)
    model = build_model(preset)
    videos, _ = SyntheticTask.for_preset(preset, seed=seed).batch("train", range(BATCHNORM_VIDEOS))
    measure_batchnorm(model, videos)
    return model


# what an export was trained on -------------------------------------------------------------------
def _meta_of(path: Path) -> dict:
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a foreign or unreadable file simply has no training record
        return {}
    meta = record.get("meta") if isinstance(record, dict) else None
    return meta if isinstance(meta, dict) else {}


def training_meta(export: Export) -> dict:
    """The training record (meta) of the checkpoint an export was made from, or {}.

    The export's own model.pt keeps only the weights' provenance, so the original checkpoint is
    found by the sha256 in the manifest's `weights`: the built-in checkpoints, or the recorded path.
    """
    meta = _meta_of(export.model_path)
    if "train_config" in meta:
        return meta
    weights = export.weights
    digest = weights.get("sha256")
    if not digest:  # no digest to match: trust only the built-in model's own label
        return _meta_of(builtin_checkpoint(DEMO)) if weights.get("source") == DEMO_SOURCE else {}
    candidates = [builtin_checkpoint(DEMO), builtin_checkpoint(DEMO_PIXEL), Path(weights.get("source", ""))]
    for path in candidates:
        if path.is_file() and sha256_file(path) == digest:
            return _meta_of(path)
    return {}


def task_for_export(export: Export, seed: int | None = None) -> tuple[SyntheticTask, int, bool]:
    """The synthetic task for this export's preset (`SyntheticTask.for_preset`), with the training
    seed and easy share when the checkpoint records them; and whether its accuracy means anything
    (the model was trained on this task, with all of its classes)."""
    meta = training_meta(export)
    config = meta.get("train_config") or {}
    seed = int(config.get("seed", 0)) if seed is None else seed
    preset = export.preset
    task = SyntheticTask.for_preset(preset, seed=seed, easy_share=float(config.get("easy_share", 0.25)))
    meaningful = meta.get("task") == TASK_ID and task.preset.num_classes == preset.num_classes
    return task, seed, meaningful
