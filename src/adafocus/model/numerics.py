"""What "fp32" means on a GPU, in one place for every path that runs fp32 on CUDA: the PyTorch
backend, AOTInductor's compile and run, the benchmark's dense and eager loops."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def strict_fp32():
    """fp32 means fp32: by default cuDNN runs fp32 convolutions in TF32 (a 10-bit mantissa) on
    Ampere and newer GPUs, which moves logits by ~1e-3. The user's own settings come back after."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before
