"""The handful of array operations the cube loop needs, on the arrays a backend computes on: numpy
for ONNX Runtime on the CPU, torch tensors (CPU or CUDA) for the others. A backend *has* one of these
(composition): what runs the graphs and what moves rows around are separate concerns.

Host-side values the loop needs (entropies, row indices, cube starts) cross with `to_host` /
`from_host` and are small; everything video-sized stays where the backend computes.
"""

from __future__ import annotations

import numpy as np
import torch

from adafocus.errors import AdaFocusError


class NumpyArrays:
    """numpy arrays in host memory: what ONNX Runtime's CPU provider reads without a copy."""

    device = "cpu"

    def videos(self, videos) -> np.ndarray:
        """The caller's batch without a copy where it already fits."""
        if isinstance(videos, torch.Tensor):
            if videos.device.type != "cpu":
                raise AdaFocusError("videos are on a GPU; this backend runs on the CPU", "pass CPU arrays")
            videos = videos.numpy()  # shares memory
        return np.ascontiguousarray(videos)

    def from_host(self, values: np.ndarray) -> np.ndarray:
        return values

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return array

    def take(self, array: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return array[rows]

    def zeros(self, rows: int, width: int) -> np.ndarray:
        return np.zeros((rows, width), dtype=np.float32)

    def concat(self, arrays: list) -> np.ndarray:
        return np.concatenate(arrays)

    def empty_pool(self, capacity: int, shape: tuple[int, ...]) -> np.ndarray:
        return np.empty((capacity, *shape), dtype=np.float32)

    def put(self, pool: np.ndarray, slots: np.ndarray, values: np.ndarray) -> None:
        pool[slots] = values

    def synchronize(self) -> None:
        """Nothing is queued on the host."""


class TorchArrays:
    """torch tensors on one device."""

    def __init__(self, device: torch.device):
        if device.type == "cuda" and device.index is None:
            # torch.device("cuda") means the current GPU, but a tensor put there reports its index
            # ("cuda:0"): name the index, so that a backend's device equals its own tensors' device
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device

    def videos(self, videos) -> torch.Tensor:
        if isinstance(videos, np.ndarray):
            videos = torch.from_numpy(videos)
        return videos.to(self.device)  # no copy when already there

    def from_host(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(self.device)

    def to_host(self, array: torch.Tensor) -> np.ndarray:
        return array.detach().cpu().numpy()

    def take(self, array: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        return array.index_select(0, torch.from_numpy(rows).to(self.device))

    def zeros(self, rows: int, width: int) -> torch.Tensor:
        return torch.zeros(rows, width, device=self.device)

    def concat(self, arrays: list) -> torch.Tensor:
        return torch.cat(arrays)

    def empty_pool(self, capacity: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(capacity, *shape, device=self.device)

    def put(self, pool: torch.Tensor, slots: np.ndarray, values: torch.Tensor) -> None:
        pool[torch.from_numpy(slots).to(self.device)] = values

    def synchronize(self) -> None:
        """Wait for queued GPU work, so that timings are honest."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
