"""Backends in a registry: `make_backend(export, name, device, ...)`. Importing this package
registers the built-in ones (ONNX Runtime, PyTorch, TensorRT, AOTInductor); see base.py for what a
backend is."""

from adafocus.runtime.backends import aoti, onnxruntime, pytorch, tensorrt  # noqa: F401  (they register)
from adafocus.runtime.backends.aoti import AotiBackend
from adafocus.runtime.backends.base import (
    BACKENDS,
    Backend,
    backend_names,
    device_names,
    largest_batch,
    make_backend,
    register,
)
from adafocus.runtime.backends.onnxruntime import EXACT_U8U8, Int8PrecisionWarning, OnnxRuntimeBackend
from adafocus.runtime.backends.pytorch import PyTorchBackend
from adafocus.runtime.backends.tensorrt import TensorRTBackend

__all__ = [
    "BACKENDS",
    "AotiBackend",
    "EXACT_U8U8",
    "Backend",
    "Int8PrecisionWarning",
    "OnnxRuntimeBackend",
    "PyTorchBackend",
    "TensorRTBackend",
    "backend_names",
    "device_names",
    "largest_batch",
    "make_backend",
    "register",
]
