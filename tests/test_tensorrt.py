"""TensorRT engines: build from ONNX, run on torch CUDA tensors, compare with PyTorch.

Everything but the first test needs TensorRT and a CUDA GPU; without them those tests are reported as skipped
with the reason (never faked).
"""

import importlib.util
import warnings

import pytest
import torch
from torch import nn

from adafocus.errors import AdaFocusError
from adafocus.export.tensorrt import build_engine, unavailable_reason

REASON = unavailable_reason()
requires_trt = pytest.mark.skipif(REASON is not None, reason=str(REASON))

BATCH_RANGE = (1, 4, 8)
IMAGE = (3, 16, 16)


def test_unavailable_reason_matches_this_machine():
    """Runs everywhere: the reason is None exactly when tensorrt is installed and a CUDA GPU is usable."""
    have_trt = importlib.util.find_spec("tensorrt") is not None
    reason = unavailable_reason()
    if have_trt and torch.cuda.is_available():
        assert reason is None
    else:
        assert isinstance(reason, str) and reason.strip() and "\n" not in reason
        if not have_trt:
            assert "TensorRT" in reason and "pip install" in reason


class Tiny(nn.Module):
    """Conv + ReLU + global mean + Linear: the layer kinds of the real sub-networks, in miniature."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def _export(model: nn.Module, example: torch.Tensor, path):
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own notices are not what these tests check
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            dynamic_shapes={"x": {0: batch}},
            input_names=["x"],
            output_names=["logits"],
            external_data=False,
            verbose=False,
        )
    return path


@pytest.fixture(scope="module")
def fp32_build(tmp_path_factory):
    """An fp32 ONNX export of Tiny, its engine, and the timing cache that build wrote."""
    root = tmp_path_factory.mktemp("trt_fp32")
    onnx_path = _export(_tiny(), torch.randn(2, *IMAGE), root / "tiny.onnx")
    cache = root / "timing.cache"
    facts = build_engine(onnx_path, root / "tiny.engine", batch_range=BATCH_RANGE, timing_cache=cache, log=lambda m: 0)
    return onnx_path, root / "tiny.engine", cache, facts


@requires_trt
def test_fp32_engine_matches_pytorch(fp32_build):
    from adafocus.runtime.backends.tensorrt_engine import TensorRTEngine

    _, engine_path, _, facts = fp32_build
    assert facts["file"] == "tiny.engine" and facts["strongly_typed"] is True
    assert facts["profile"] == {"x": {"min": [1, *IMAGE], "opt": [4, *IMAGE], "max": [8, *IMAGE]}}
    assert facts["compute_capability"].count(".") == 1 and facts["build_seconds"] >= 0

    engine = TensorRTEngine(engine_path)
    assert engine.input_names == ["x"] and engine.output_names == ["logits"]
    assert engine.dtype("x") == torch.float32 and engine.dtype("logits") == torch.float32
    assert engine.profile_range("x") == ((1, *IMAGE), (4, *IMAGE), (8, *IMAGE))

    model = _tiny()
    for batch in (1, 8):
        x = torch.randn(batch, *IMAGE, generator=torch.Generator().manual_seed(batch))
        out = engine.run({"x": x.cuda()})["logits"]
        torch.cuda.synchronize()
        assert out.device.type == "cuda" and out.shape == (batch, 5)
        with torch.no_grad():
            expected = model(x)  # on the CPU: true fp32, no TF32
        # TensorRT may run fp32 convolutions and matrix products in TF32 (10-bit mantissa), hence ~1e-3, not 1e-6.
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-3, atol=1e-3)


@requires_trt
def test_fp16_graph_gives_fp16_engine(tmp_path):
    from adafocus.runtime.backends.tensorrt_engine import TensorRTEngine

    model = _tiny().cuda().half()
    onnx_path = _export(model, torch.randn(2, *IMAGE, device="cuda", dtype=torch.float16), tmp_path / "tiny16.onnx")
    build_engine(onnx_path, tmp_path / "tiny16.engine", batch_range=BATCH_RANGE, timing_cache=None, log=lambda m: 0)

    engine = TensorRTEngine(tmp_path / "tiny16.engine")
    assert engine.dtype("x") == torch.float16 and engine.dtype("logits") == torch.float16
    for batch in (1, 8):
        x = torch.randn(batch, *IMAGE, device="cuda", dtype=torch.float16)
        out = engine.run({"x": x})["logits"]
        with torch.no_grad():
            expected = model(x)
        torch.cuda.synchronize()
        # Both sides compute in fp16 but with different kernels and accumulation orders.
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@requires_trt
def test_bad_inputs_are_refused(fp32_build):
    from adafocus.runtime.backends.tensorrt_engine import TensorRTEngine

    engine = TensorRTEngine(fp32_build[1])
    with pytest.raises(AdaFocusError, match="--batch-range"):
        engine.run({"x": torch.randn(9, *IMAGE, device="cuda")})
    with pytest.raises(AdaFocusError, match="float16"):
        engine.run({"x": torch.randn(2, *IMAGE, device="cuda", dtype=torch.float16)})
    with pytest.raises(AdaFocusError, match="cpu"):
        engine.run({"x": torch.randn(2, *IMAGE)})
    with pytest.raises(AdaFocusError, match="contiguous"):
        engine.run({"x": torch.randn(2, 16, 16, 3, device="cuda").permute(0, 3, 1, 2)})
    with pytest.raises(AdaFocusError, match="missing"):
        engine.run({"y": torch.randn(2, *IMAGE, device="cuda")})


@requires_trt
def test_misaligned_view_still_runs(fp32_build):
    """A view may start mid-allocation; TensorRT needs 256-byte aligned buffers, so run copies such inputs."""
    from adafocus.runtime.backends.tensorrt_engine import TensorRTEngine

    engine = TensorRTEngine(fp32_build[1])
    flat = torch.randn(1 + 3 * 3 * 16 * 16, device="cuda")
    view = flat[1:].view(3, *IMAGE)  # starts 4 bytes into the allocation
    assert view.data_ptr() % 256 != 0
    whole = engine.run({"x": view.clone()})["logits"]
    view = engine.run({"x": view})["logits"]
    torch.cuda.synchronize()
    torch.testing.assert_close(view, whole)


@requires_trt
def test_unloadable_engines_give_clear_errors(tmp_path):
    from adafocus.runtime.backends.tensorrt_engine import TensorRTEngine

    garbage = tmp_path / "garbage.engine"
    garbage.write_bytes(b"this is not a TensorRT plan" * 64)
    with pytest.raises(AdaFocusError, match="rebuild"):
        TensorRTEngine(garbage)
    with pytest.raises(AdaFocusError, match="does not exist"):
        TensorRTEngine(tmp_path / "missing.engine")


@requires_trt
def test_unparsable_onnx_names_the_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(AdaFocusError, match="bad.onnx"):
        build_engine(bad, tmp_path / "bad.engine", batch_range=BATCH_RANGE, timing_cache=None, log=lambda m: 0)
    assert not (tmp_path / "bad.engine").exists()


@requires_trt
def test_timing_cache_is_written_and_reused(fp32_build, tmp_path):
    onnx_path, _, cache, _ = fp32_build
    assert cache.is_file() and cache.stat().st_size > 0
    messages = []
    build_engine(onnx_path, tmp_path / "again.engine", batch_range=BATCH_RANGE, timing_cache=cache, log=messages.append)
    assert any("reusing timing cache" in m for m in messages), messages
    assert (tmp_path / "again.engine").stat().st_size > 0
    assert cache.stat().st_size > 0
