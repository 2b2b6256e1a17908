"""The cube loop over backends (PyTorch, ONNX Runtime, TensorRT): see `Runtime`."""

from adafocus.runtime.runtime import BatchResult, Runtime, VideoResult

__all__ = ["BatchResult", "Runtime", "VideoResult"]
