import functools

import pytest
import torch

from adafocus.model import build_model, get_preset


@functools.cache
def _model(name: str):
    torch.manual_seed(0)  # random weights, the same in every test that asks for this preset
    return build_model(get_preset(name))


@pytest.fixture
def model_of():
    """model_of("demo") -> a random-weight model of that preset in eval mode (built once)."""
    return _model


def random_videos(preset, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *preset.video_shape, generator=g)
