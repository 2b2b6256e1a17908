"""Run one TensorRT engine on torch CUDA tensors, with the name-based tensor API of TensorRT 10 and 11.

Inputs and outputs stay on the GPU and `run` does not synchronise: the cube loop chains engines on one stream
and syncs once. `import tensorrt` happens inside, so this module imports on machines without TensorRT.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adafocus.errors import AdaFocusError
from adafocus.export.tensorrt import require_tensorrt, tensorrt_messages, trt_logger

# TensorRT's start-address rule for every I/O buffer (IExecutionContext::setTensorAddress).
TENSOR_ALIGNMENT = 256

_DTYPE_NAMES = (
    ("FLOAT", torch.float32),
    ("HALF", torch.float16),
    ("BF16", torch.bfloat16),
    ("INT8", torch.int8),
    ("UINT8", torch.uint8),
    ("INT32", torch.int32),
    ("INT64", torch.int64),
    ("BOOL", torch.bool),
)


def _dtype_pairs(trt) -> list[tuple[object, torch.dtype]]:
    return [(getattr(trt.DataType, name), dtype) for name, dtype in _DTYPE_NAMES if hasattr(trt.DataType, name)]


def trt_to_torch_dtype(trt_dtype) -> torch.dtype:
    """torch dtype of a trt.DataType; AdaFocusError for the ones torch tensors cannot hold (FP8, INT4, ...)."""
    import tensorrt as trt

    for candidate, dtype in _dtype_pairs(trt):
        if candidate == trt_dtype:
            return dtype
    raise AdaFocusError(
        f"TensorRT dtype {trt_dtype} has no torch equivalent here", "keep engine inputs and outputs in ordinary dtypes"
    )


def _shape(dims) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


class TensorRTEngine:
    """One deserialised engine with one execution context.

    Not thread-safe, and one `run` at a time: the context owns the engine's activation memory.
    """

    def __init__(self, engine_path: Path, *, device: torch.device | str = "cuda"):
        trt = require_tensorrt()
        self.path = Path(engine_path)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise AdaFocusError(f"TensorRT engines run on CUDA devices, not {self.device}", "use device='cuda'")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if not self.path.is_file():
            raise AdaFocusError(f"TensorRT engine {self.path} does not exist", "build it on this machine first")
        blob = self.path.read_bytes()
        if not blob:
            raise AdaFocusError(f"TensorRT engine {self.path} is empty", "rebuild it")

        rebuild = (
            "rebuild it on this machine: an engine only loads with the TensorRT version and GPU model that built it "
            f"(here TensorRT {trt.__version__} on {torch.cuda.get_device_name(self.device)})"
        )
        self._logger = trt_logger()  # must outlive the runtime, engine and context
        with torch.cuda.device(self.device), self._logger.capture() as errors:
            self._runtime = trt.Runtime(self._logger)
            try:
                self._engine = self._runtime.deserialize_cuda_engine(blob)
            except (RuntimeError, TypeError, ValueError) as e:
                raise AdaFocusError(f"TensorRT could not load {self.path}: {e}", rebuild) from None
            if self._engine is None:
                raise AdaFocusError(
                    f"TensorRT {trt.__version__} could not load the engine {self.path}" + tensorrt_messages(errors),
                    rebuild,
                )
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise AdaFocusError(
                    f"TensorRT could not create an execution context for {self.path}" + tensorrt_messages(errors),
                    "free GPU memory (other engines, other processes) and try again",
                )

        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self._dtypes: dict[str, torch.dtype] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            mode = self._engine.get_tensor_mode(name)
            self._dtypes[name] = trt_to_torch_dtype(self._engine.get_tensor_dtype(name))
            location = getattr(self._engine, "get_tensor_location", None)
            if location is not None and location(name) != trt.TensorLocation.DEVICE:
                raise AdaFocusError(
                    f"engine {self.path} keeps tensor {name!r} in host memory (a shape tensor)",
                    "export the graph without shape-tensor inputs or outputs",
                )
            if mode == trt.TensorIOMode.INPUT:
                self.input_names.append(name)
            elif mode == trt.TensorIOMode.OUTPUT:
                self.output_names.append(name)
        # Profile 0 is the only one build_engine makes; engines without dynamic inputs still report min=opt=max.
        self._profiles = {
            name: tuple(_shape(dims) for dims in self._engine.get_tensor_profile_shape(name, 0))
            for name in self.input_names
        }

    def __repr__(self) -> str:
        return f"TensorRTEngine({str(self.path)!r}, inputs={self.input_names}, outputs={self.output_names})"

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype of an input or output tensor."""
        if name not in self._dtypes:
            raise AdaFocusError(f"engine {self.path.name} has no tensor {name!r}", f"use one of {list(self._dtypes)}")
        return self._dtypes[name]

    def profile_range(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes an input accepts, from the engine's optimisation profile."""
        if name not in self._profiles:
            raise AdaFocusError(f"engine {self.path.name} has no input {name!r}", f"use one of {self.input_names}")
        return self._profiles[name]

    def _check_input(self, name: str, tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise AdaFocusError(f"input {name!r} is a {type(tensor).__name__}, not a torch tensor", None)
        if tensor.dtype != self._dtypes[name]:
            raise AdaFocusError(
                f"input {name!r} of {self.path.name} is {tensor.dtype}; the engine expects {self._dtypes[name]}",
                f"convert it with .to({self._dtypes[name]}) (the engine's precision comes from its ONNX graph)",
            )
        if tensor.device != self.device:
            raise AdaFocusError(
                f"input {name!r} of {self.path.name} is on {tensor.device}; the engine runs on {self.device}",
                f"move it with .to({str(self.device)!r})",
            )
        if not tensor.is_contiguous():
            raise AdaFocusError(
                f"input {name!r} of {self.path.name} is not contiguous", "pass tensor.contiguous() (row-major)"
            )
        lo, _, hi = self._profiles[name]
        shape = tuple(tensor.shape)
        if len(shape) != len(lo):
            raise AdaFocusError(
                f"input {name!r} of {self.path.name} has shape {list(shape)}; the engine expects {len(lo)} dims "
                f"(between {list(lo)} and {list(hi)})",
                None,
            )
        for axis, (size, low, high) in enumerate(zip(shape, lo, hi)):
            if low == high and size != low:
                raise AdaFocusError(
                    f"input {name!r} of {self.path.name} has shape {list(shape)}; dim {axis} is fixed at {low}",
                    "re-export and rebuild the engine for this input size",
                )
            if not low <= size <= high:
                raise AdaFocusError(
                    f"input {name!r} of {self.path.name} has {size} along dim {axis}; the engine was built for "
                    f"{low}..{high} (profile min {list(lo)}, max {list(hi)})",
                    f"rebuild the engine with a wider --batch-range (one that covers {size}), or split the batch",
                )

    def run(self, inputs: dict[str, torch.Tensor], stream: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:
        """Enqueue the engine on `stream` (default: the current stream) and return its outputs, still on the GPU.

        Nothing is synchronised: the inputs must be ready on `stream`, and the outputs are valid once `stream` has
        done its work (e.g. after stream.synchronize(), or for later work queued on that stream).
        """
        names = set(inputs)
        if names != set(self.input_names):
            missing = [n for n in self.input_names if n not in names]
            extra = sorted(names - set(self.input_names))
            raise AdaFocusError(
                f"engine {self.path.name} takes inputs {self.input_names}; missing {missing}, unexpected {extra}", None
            )
        for name in self.input_names:
            self._check_input(name, inputs[name])

        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            stream = current if stream is None else stream
            context = self._context
            with torch.cuda.stream(stream):
                keep = []
                for name in self.input_names:
                    tensor = inputs[name]
                    if stream != current:
                        tensor.record_stream(stream)  # keep the caller's memory until this stream has read it
                    if tensor.data_ptr() % TENSOR_ALIGNMENT:
                        # A view that starts mid-allocation; the caching allocator's blocks are 512-byte aligned.
                        tensor = tensor.clone()
                    keep.append(tensor)
                    if not context.set_input_shape(name, _shape(tensor.shape)):
                        raise AdaFocusError(f"TensorRT rejected shape {list(tensor.shape)} for input {name!r}", None)
                    context.set_tensor_address(name, tensor.data_ptr())

                outputs: dict[str, torch.Tensor] = {}
                for name in self.output_names:
                    shape = _shape(context.get_tensor_shape(name))
                    if any(d < 0 for d in shape):
                        raise AdaFocusError(
                            f"output {name!r} of {self.path.name} has a data-dependent shape {list(shape)}",
                            "export the graph with output shapes that follow from the input shapes",
                        )
                    out = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                    context.set_tensor_address(name, out.data_ptr())
                    outputs[name] = out

                if not context.execute_async_v3(stream.cuda_stream):
                    raise AdaFocusError(f"TensorRT failed to enqueue {self.path.name}", None)
            del keep  # safe: allocations made or recorded on `stream` are not reused before it gets there
        return outputs
