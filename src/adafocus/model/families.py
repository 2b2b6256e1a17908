"""The model a preset builds: AdaFocusV3 or Uni-AdaFocus (presets.FAMILIES). Both offer the same
roles (glance, classifier, plan, cut, local), so the reference loop, the flop counter and the
checkpoint loader are written once."""

from __future__ import annotations

from adafocus.model.networks import AdaFocusV3
from adafocus.model.presets import Preset
from adafocus.model.uni import UniAdaFocus

Model = AdaFocusV3 | UniAdaFocus


def model_class(preset: Preset) -> type[AdaFocusV3] | type[UniAdaFocus]:
    return UniAdaFocus if preset.family == "uni" else AdaFocusV3


def build_model(preset: Preset) -> Model:
    """A model of `preset` with random weights, in eval mode."""
    return model_class(preset)(preset).eval()
