"""Frame normalisation shared by real videos and generated ones (ImageNet statistics, as the
official code and torchvision's backbones use)."""

from __future__ import annotations

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalize(frames: np.ndarray) -> np.ndarray:
    """(T, 3, H, W) float RGB in [0, 1] -> float32 network input."""
    return ((frames - MEAN[:, None, None]) / STD[:, None, None]).astype(np.float32)


def denormalize(frames: np.ndarray) -> np.ndarray:
    """The inverse of `normalize`, for display."""
    return frames * STD[:, None, None] + MEAN[:, None, None]
