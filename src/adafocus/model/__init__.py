"""AdaFocusV3 and Uni-AdaFocus in PyTorch: sub-networks, presets, the crop rule, checkpoints, reference
inference."""

from adafocus.model.checkpoint import Checkpoint, LoadReport, load_checkpoint, save_checkpoint
from adafocus.model.cubes import crop_cubes, plan_cubes
from adafocus.model.families import build_model
from adafocus.model.networks import AdaFocusV3
from adafocus.model.presets import ALIASES, PRESETS, Preset, get_preset
from adafocus.model.reference import AdaptiveResult, adaptive_inference, entropy
from adafocus.model.uni import UniAdaFocus

__all__ = [
    "ALIASES",
    "PRESETS",
    "AdaFocusV3",
    "AdaptiveResult",
    "Checkpoint",
    "LoadReport",
    "Preset",
    "UniAdaFocus",
    "adaptive_inference",
    "build_model",
    "crop_cubes",
    "entropy",
    "get_preset",
    "load_checkpoint",
    "plan_cubes",
    "save_checkpoint",
]
