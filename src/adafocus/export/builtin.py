"""The built-in demo export: the shipped demo checkpoint exported and calibrated once, on first use,
into a cache directory (`$ADAFOCUS_CACHE`, default ~/.cache/adafocus), then reused after verification.
Calibration (1000 + 1000 synthetic videos) gives it the exit thresholds every command uses by default."""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

from adafocus.errors import AdaFocusError
from adafocus.export.manifest import Export, open_export, sha256_file

REVISION = 3  # bump whenever the exporter's output changes, so stale cached exports are not reused


def cache_root() -> Path:
    return Path(os.environ.get("ADAFOCUS_CACHE", Path.home() / ".cache" / "adafocus"))


def demo_export(log=None) -> Export:
    from adafocus.export.exporter import export_model
    from adafocus.model.checkpoint import load_checkpoint
    from adafocus.weights import builtin_checkpoint

    checkpoint = builtin_checkpoint()
    digest = sha256_file(checkpoint)
    target = cache_root() / "exports" / f"demo-{digest[:12]}-{metadata.version('adafocus-deploy')}-r{REVISION}"
    log = log or (lambda line: print(line, file=sys.stderr))
    if target.exists():
        try:
            export = open_export(target)
            return export if export.manifest["budgets"] else _calibrate(export, log)
        except AdaFocusError as e:  # a damaged cache entry is rebuilt, and said so
            log(f"re-exporting the built-in demo model: the cached export is unusable ({e.what})")
    log(f"exporting and calibrating the built-in demo model once, to {target}")
    loaded = load_checkpoint(checkpoint)
    export = export_model(
        loaded.model,
        target,
        class_names=loaded.class_names,
        weights={"source": "built-in demo model", "sha256": digest},
        force=True,
        log=log,
    )
    return _calibrate(export, log)


def _calibrate(export: Export, log, videos: int = 1000) -> Export:
    from adafocus.calibration.calibrate import TaskVideos, calibrate_export
    from adafocus.calibration.cli import synthetic_task

    log(f"calibrating exit thresholds on {videos} + {videos} held-out synthetic videos")
    task, seed, _ = synthetic_task(export, None)
    info = {"task": "synthetic 'find the detail' videos", "seed": seed, "calibration_split": "val"}
    result = calibrate_export(export.path, TaskVideos(task, "val", videos), TaskVideos(task, "test", videos), info=info)
    chosen = result.table[result.default]
    log(
        f"default operating point: {chosen['gflops']:.4f} GFLOPs/video, "
        f"held-out accuracy {100 * chosen['heldout_accuracy']:.1f} %"
    )
    return result.export


def random_export(preset_name: str, seed: int = 0, log=None) -> Export:
    """An export of `preset_name` with random weights (seed), cached like the demo export: for
    benchmarks, where only speed and the exit mix matter.

    Plain random weights make every video look the same (BatchNorm with its initial statistics
    squashes the differences: glance features differ by ~1e-11 between videos), so all videos would
    have one entropy and no threshold could split them. The BatchNorm statistics are therefore
    measured on generated videos first; the weights stay random."""
    import torch

    from adafocus.export.exporter import export_model
    from adafocus.model import build_model, get_preset
    from adafocus.model.checkpoint import default_class_names

    preset = get_preset(preset_name)
    target = cache_root() / "exports" / f"{preset.name}-random{seed}-{metadata.version('adafocus-deploy')}-r{REVISION}"
    if target.exists():
        try:
            return open_export(target)
        except AdaFocusError as e:
            print(f"re-exporting {preset.name}: the cached export is unusable ({e.what})", file=sys.stderr)
    log = log or (lambda line: print(line, file=sys.stderr))
    torch.manual_seed(seed)
    model = build_model(preset)
    log(f"measuring BatchNorm statistics of random {preset.name} weights on generated videos")
    measure_batchnorm(model, seed)
    return export_model(
        model,
        target,
        class_names=default_class_names(preset),
        weights={"source": "random", "seed": seed, "batchnorm": f"statistics of {BATCHNORM_VIDEOS} generated videos"},
        force=True,
        log=log,
    )


BATCHNORM_VIDEOS = 8


def measure_batchnorm(model, seed: int = 0) -> None:
    """Replace every BatchNorm's running statistics by those of generated videos passed through the
    whole loop (glance, policy, every cube), then return to eval mode."""
    import dataclasses
    import math

    import torch

    from adafocus.model.reference import adaptive_inference
    from adafocus.train.synthetic import SyntheticTask

    preset = model.preset
    task = SyntheticTask(dataclasses.replace(preset, num_classes=min(preset.num_classes, 10)), seed=seed)
    videos, _ = task.batch("train", range(BATCHNORM_VIDEOS))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches seen
    model.train()
    try:
        with torch.no_grad():
            adaptive_inference(model, videos, [-math.inf] * preset.num_exits)
    finally:
        model.eval()
