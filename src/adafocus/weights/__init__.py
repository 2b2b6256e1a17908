"""Weights that ship inside the package: the demo model trained on the synthetic task.

How they were made is recorded in each checkpoint's `meta` (command, training history, held-out
accuracy) and in README.md.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from adafocus.errors import AdaFocusError

DEMO = "demo.pt"  # the built-in default of every command
DEMO_PIXEL = "demo-pixel.pt"  # the same recipe with pixel-based gradients, for the ablation
DEMO_SOURCE = "built-in demo model"  # how an export's `weights.source` names these weights


def builtin_checkpoint(name: str = DEMO) -> Path:
    path = Path(str(resources.files(__package__) / name))
    if not path.is_file():
        raise AdaFocusError(
            f"the built-in checkpoint {name} is missing from this installation ({path})",
            "reinstall adafocus-deploy, or pass --checkpoint",
        )
    return path
