"""The built-in demo export: the shipped demo checkpoint exported once, on first use, into a cache
directory (`$ADAFOCUS_CACHE`, default ~/.cache/adafocus), then reused after verification."""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

from adafocus.errors import AdaFocusError
from adafocus.export.manifest import Export, open_export, sha256_file

REVISION = 2  # bump whenever the exporter's output changes, so stale cached exports are not reused


def cache_root() -> Path:
    return Path(os.environ.get("ADAFOCUS_CACHE", Path.home() / ".cache" / "adafocus"))


def demo_export(log=None) -> Export:
    from adafocus.export.exporter import export_model
    from adafocus.model.checkpoint import load_checkpoint
    from adafocus.weights import builtin_checkpoint

    checkpoint = builtin_checkpoint()
    digest = sha256_file(checkpoint)
    target = cache_root() / "exports" / f"demo-{digest[:12]}-{metadata.version('adafocus-deploy')}-r{REVISION}"
    if target.exists():
        try:
            return open_export(target)
        except AdaFocusError as e:  # a damaged cache entry is rebuilt, and said so
            print(f"re-exporting the built-in demo model: the cached export is unusable ({e.what})", file=sys.stderr)
    log = log or (lambda line: print(line, file=sys.stderr))
    log(f"exporting the built-in demo model once, to {target}")
    loaded = load_checkpoint(checkpoint)
    return export_model(
        loaded.model,
        target,
        class_names=loaded.class_names,
        weights={"source": "built-in demo model", "sha256": digest},
        force=True,
        log=log,
    )


def random_export(preset_name: str, seed: int = 0, log=None) -> Export:
    """An export of `preset_name` with random weights (seed), cached like the demo export: for
    benchmarks, where only speed and the exit mix matter."""
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
    return export_model(
        model,
        target,
        class_names=default_class_names(preset),
        weights={"source": "random", "seed": seed},
        force=True,
        log=log,
    )
