"""ONNX -> TensorRT engines, strongly typed: the ONNX graph's own dtypes decide the engine's precision.

An fp32 graph gives an fp32 engine (TensorRT may still use TF32 for its matrix maths), an fp16 graph an fp16
engine, and explicit Q/DQ nodes INT8. There are no precision builder flags and no calibrators: TensorRT 11
removed them, and strong typing is the one mode that works the same on TensorRT 10 and 11.

`import tensorrt` happens inside the functions, so this module imports on machines without TensorRT.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from adafocus.errors import AdaFocusError
from adafocus.files import atomic_write

GET_GPU_EXTRA = (
    'pip install "adafocus-deploy[gpu]" (or `pip install -e ".[gpu]"` in a checkout) on a machine with an NVIDIA '
    "GPU and driver; the tensorrt wheel downloads from NVIDIA's package index"
)
MIN_TENSORRT_MAJOR = 10


def _missing() -> tuple[str, str] | None:
    """(what is missing, how to get it), or None when TensorRT and a CUDA GPU are both usable."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError when the wheel's CUDA libraries cannot load
        return f"TensorRT is not importable ({type(e).__name__}: {e})", GET_GPU_EXTRA
    major = tensorrt_major(trt)
    if major < MIN_TENSORRT_MAJOR:
        return f"TensorRT {trt.__version__} is too old (need {MIN_TENSORRT_MAJOR} or newer)", GET_GPU_EXTRA
    if not torch.cuda.is_available():
        return (
            "no usable CUDA GPU (torch.cuda.is_available() is False)",
            "run on a machine with an NVIDIA GPU and driver, with a CUDA build of torch",
        )
    return None


def unavailable_reason() -> str | None:
    """None when TensorRT engines can be built and run here; otherwise one line naming what is missing and how to
    get it (for skip messages and CLI errors)."""
    missing = _missing()
    return None if missing is None else f"{missing[0]}; {missing[1]}"


def require_tensorrt():
    """The `tensorrt` module, or AdaFocusError saying what is missing and how to get it."""
    missing = _missing()
    if missing is not None:
        raise AdaFocusError(missing[0], missing[1])
    import tensorrt as trt

    return trt


def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


_LOGGER = None


def trt_logger():
    """The process's one TensorRT logger.

    TensorRT warns when builders and runtimes get different loggers, so every builder and runtime here shares this
    one. It keeps the error messages of the current `capture()` (they explain why a parse, build or deserialisation
    returned None) and passes warnings and errors on to the capture's sink (stderr outside a capture)."""
    global _LOGGER
    if _LOGGER is None:
        import tensorrt as trt

        severity = trt.ILogger.Severity
        errors = (severity.INTERNAL_ERROR, severity.ERROR)

        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.sink: Callable[[str], object] | None = None
                self.errors: list[str] = []

            def log(self, level, msg):
                if level in errors:
                    self.errors.append(str(msg))
                    self._emit(f"TensorRT error: {msg}")
                elif level == severity.WARNING:
                    self._emit(f"TensorRT warning: {msg}")

            def _emit(self, text: str) -> None:
                if self.sink is None:
                    print(text, file=sys.stderr)
                else:
                    self.sink(text)

            @contextmanager
            def capture(self, sink: Callable[[str], object] | None = None):
                """Collect error messages (yielded list) and route messages to `sink` for the duration."""
                previous = self.sink, self.errors
                self.sink, self.errors = sink, []
                try:
                    yield self.errors
                finally:
                    self.sink, self.errors = previous

        _LOGGER = _Logger()
    return _LOGGER


def tensorrt_messages(errors: list[str]) -> str:
    """TensorRT's own error messages as indented lines for an AdaFocusError, or '' when it logged none."""
    return "".join(f"\n  TensorRT: {line}" for line in errors)


def _check_batch_range(batch_range) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(b) for b in batch_range)
    except (TypeError, ValueError):
        raise AdaFocusError(
            f"batch range {batch_range!r} is not three integers", "give it as min,opt,max, e.g. 1,16,64"
        ) from None
    if not 1 <= lo <= opt <= hi:
        raise AdaFocusError(f"batch range {lo},{opt},{hi} is not 1 <= min <= opt <= max", "e.g. 1,16,64")
    return lo, opt, hi


def _parser_error_line(error) -> str:
    """One parser error: node index, name and operator (where the parser knows them), code and description."""
    node = error.node()
    name = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    where = "graph" if node < 0 else f"node {node}" + (f" {name!r}" if name else "") + (f" ({op})" if op else "")
    return f"  {where}: {error.code()}: {error.desc()}"


def _load_timing_cache(trt, config, timing_cache: Path | None, log):
    """Attach a timing cache to `config`: the file's when it exists and fits this TensorRT/GPU, else a fresh one."""
    cache = None
    if timing_cache is not None and timing_cache.is_file():
        blob = timing_cache.read_bytes()
        try:
            cache = config.create_timing_cache(blob)
        except RuntimeError:  # unreadable blob; treated like a mismatch below
            cache = None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            log(f"reusing timing cache {timing_cache} ({len(blob)} bytes)")
            return cache
        log(f"timing cache {timing_cache} was written by another TensorRT version or GPU; starting a fresh one")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise AdaFocusError(f"TensorRT {trt.__version__} could not create a timing cache", None)
    return cache


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    batch_range: tuple[int, int, int],
    timing_cache: Path | None,
    workspace_gib: float | None = None,
    log=print,
) -> dict:
    """Build one strongly typed engine from `onnx_path` into `engine_path` and return its facts (JSON-able).

    Every network input with -1 dims gets one optimisation profile in which each dynamic dim (all of ours are
    batch-like: rows, pool size) spans batch_range's min/opt/max; static dims stay. The timing cache, when given,
    is read before and written back after the build, so rebuilding the other sub-networks is quick."""
    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    timing_cache = None if timing_cache is None else Path(timing_cache)
    lo, opt, hi = _check_batch_range(batch_range)
    if not onnx_path.is_file():
        raise AdaFocusError(f"ONNX file {onnx_path} does not exist", "export the model to ONNX first")
    if workspace_gib is not None and not workspace_gib > 0:
        raise AdaFocusError(f"workspace of {workspace_gib} GiB is not positive", "leave it unset or give e.g. 4")

    logger = trt_logger()
    with logger.capture(log) as errors:
        builder = trt.Builder(logger)
        network, _parser = _parse_network(trt, builder, logger, onnx_path)
        config = builder.create_builder_config()
        if workspace_gib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        shapes = _add_profile(builder, network, config, onnx_path, (lo, opt, hi), errors)
        cache = _load_timing_cache(trt, config, timing_cache, log)
        log(
            f"building {engine_path.name} from {onnx_path.name} with TensorRT {trt.__version__} (batch {lo}/{opt}/{hi})"
        )
        started = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        build_seconds = time.perf_counter() - started
        if serialized is None:
            raise AdaFocusError(
                f"TensorRT {trt.__version__} failed to build an engine from {onnx_path}" + tensorrt_messages(errors),
                "read the TensorRT messages above; a larger --workspace or a narrower --batch-range can help",
            )

    atomic_write(engine_path, bytes(serialized))
    if timing_cache is not None:
        atomic_write(timing_cache, bytes(cache.serialize()))
    log(f"wrote {engine_path} in {build_seconds:.1f} s")

    major, minor = torch.cuda.get_device_capability()
    return {
        "file": engine_path.name,
        "tensorrt_version": str(trt.__version__),
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "strongly_typed": True,
        "profile": shapes,
        "build_seconds": round(build_seconds, 3),
    }


def _parse_network(trt, builder, logger, onnx_path: Path) -> tuple:
    """The ONNX file as a strongly typed TensorRT network, or one error listing every parser complaint."""
    # TensorRT 11 types every network strongly (its STRONGLY_TYPED flag is deprecated and ignored); TensorRT 10
    # needs the flag, else it would be free to pick precisions itself.
    needs_flag = tensorrt_major(trt) < 11
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if needs_flag else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        lines = [_parser_error_line(parser.get_error(i)) for i in range(parser.num_errors)]
        raise AdaFocusError(
            f"TensorRT {trt.__version__} could not parse {onnx_path}:\n" + "\n".join(lines),
            "check that every operator and dtype in the graph is supported by this TensorRT version's ONNX "
            "parser, or re-export the ONNX file",
        )
    return network, parser  # the parser owns objects the network refers to: the caller keeps both alive


def _add_profile(builder, network, config, onnx_path: Path, batch_range, errors) -> dict[str, dict[str, list[int]]]:
    """One optimisation profile: every dynamic dim of every input spans the batch range."""
    lo, opt, hi = batch_range
    profile = builder.create_optimization_profile()
    shapes: dict[str, dict[str, list[int]]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = [int(d) for d in tensor.shape]
        if -1 not in dims:
            continue
        if getattr(tensor, "is_shape_tensor", False):
            raise AdaFocusError(
                f"input {tensor.name!r} of {onnx_path} is a shape tensor, which this builder does not profile",
                "export the graph with the shape as a static value",
            )
        picks = {key: [b if d == -1 else d for d in dims] for key, b in (("min", lo), ("opt", opt), ("max", hi))}
        try:
            profile.set_shape(tensor.name, picks["min"], picks["opt"], picks["max"])
        except RuntimeError as e:
            raise AdaFocusError(
                f"TensorRT rejected the profile {picks} for input {tensor.name!r} of {onnx_path}: {e}",
                "check --batch-range",
            ) from None
        shapes[tensor.name] = picks
    if shapes and config.add_optimization_profile(profile) < 0:
        raise AdaFocusError(
            f"TensorRT rejected the optimisation profile {shapes} for {onnx_path}" + tensorrt_messages(errors),
            "check --batch-range",
        )
    return shapes
